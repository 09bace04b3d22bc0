"""What every request field group shares: the bounds, the :class:`Scope` each field declares, the common types.

A feature's fields live in their own module of this package as a ``BaseModel`` field group (see :mod:`.schema`):
they take their bounds and types from here, so a number means the same in every group.
"""

from __future__ import annotations

import enum
import secrets
from typing import Annotated, Any

from pydantic import ConfigDict, Field

# strict: no silent coercion ("7" is not 7); forbid: an unknown key is an error, as in the official worker;
# frozen: a request is a value (grouping hashes it).
REQUEST_CONFIG = ConfigDict(extra="forbid", strict=True, frozen=True)

# Seeds a request may give: torch's whole generator range, as the official worker (torch.Generator.manual_seed) takes.
MAX_SEED = 2**64 - 1
RANDOM_SEED = -1  # A1111's (and its clients') "random": the same as leaving seed out
# Seeds this worker draws itself stay below 2^32: JavaScript's JSON.parse rounds integers above 2^53, so a larger
# seed sent back by a browser client would silently make another image.
MAX_RANDOM_SEED = 2**32 - 1
# 64: the smallest side SDXL's UNet takes (8 latent pixels, two downsamplings); below 512 images are poor but valid,
# and the official worker serves them (diffusers only asks for multiples of 8).
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 64, 2048, 8
MAX_STEPS = 500  # the official worker has no bound; 500 steps of 1024² are about 20 s on an H200 (eager ~35 s)
MAX_GUIDANCE = 100.0  # the official worker and A1111's API have no bound; past ~30 images burn, but that is a choice
MAX_PROMPT_CHARS = 20_000
DEFAULT_MAX_JOB_PIXELS = 8 * 1024 * 1024  # core.settings' MAX_JOB_PIXELS default
MAX_LORAS = 8
# A data URI of up to 15 MB still fits RunPod's 20 MB /runsync payload with the rest of the request.
MAX_IMAGE_URL_CHARS = 15_000_000


def draw_seed() -> int:
    """A fresh random seed for a request that gave none (0..2^32-1, safe in JavaScript clients)."""
    return secrets.randbelow(MAX_RANDOM_SEED + 1)


def check_image_reference(value: str) -> None:
    """An input image is an http(s) URL, a data URI or bare base64; any other scheme (a local path) is refused."""
    if "://" in value[:16] and not value.lower().startswith(("http://", "https://")):
        raise ValueError("only http(s) URLs, data URIs or bare base64 are accepted; local paths are never read")


def number_from_int(value: Any) -> Any:
    # strict mode would refuse `1` for a float field; a JSON integer is a perfectly good float.
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class Scope(enum.Enum):
    """How a request field travels when requests share one pipeline call (the batch runner's GPU batches).

    Every field of :class:`GenerationRequest` carries exactly one (a test checks it), so a new field cannot be
    forgotten by :func:`group_key`: a call runs with its first request's value of every ``GROUP`` field.
    """

    REQUEST = "request"  # each request keeps its own value: prompts, seeds, output encoding
    GROUP = "group"  # requests share a call only when these are equal: shape, schedule, weights, inputs


REQUEST, GROUP = Scope.REQUEST, Scope.GROUP
Side = Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE)]
OptionalText = Annotated[str | None, Field(max_length=MAX_PROMPT_CHARS)]
Fraction = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
