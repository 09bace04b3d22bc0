"""What a generation produces, as types: encoded images and metadata with stable and volatile parts apart.

``GenerationMetadata.stable`` is everything that follows from the request and the model (seeds,
sizes, scheduler, prompt tokens, LoRAs, model hash): identical whichever process, machine or run
made the image, so batch sidecars stay byte-stable. ``GenerationMetadata.volatile`` is what differs
from run to run (timings, device, cache hits, how the images travelled). The worker's output
``metadata`` is both merged, with the volatile keys at their documented places.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

IMAGE_FORMATS = ("png", "jpeg", "webp")
MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


@dataclass(frozen=True)
class EncodedImage:
    """One finished image file: its bytes, format and the seed it was made with."""

    data: bytes
    format: str
    seed: int

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]

    @property
    def mime_type(self) -> str:
        return MIME_TYPES[self.format]

    def data_uri(self) -> str:
        return f"data:{self.mime_type};base64,{base64.b64encode(self.data).decode('ascii')}"

    @property
    def data_uri_length(self) -> int:
        """Length of :meth:`data_uri` without building it (base64 makes 4 characters of every 3 bytes)."""
        return len(f"data:{self.mime_type};base64,") + 4 * ((len(self.data) + 2) // 3)


@dataclass(frozen=True)
class Timings:
    """Seconds spent in each stage of one job (or one shared GPU call)."""

    lora_s: float = 0.0
    controlnet_s: float | None = None  # resolving, fetching and loading the job's ControlNets
    ip_adapter_s: float | None = None  # the same for its IP-Adapters and their image encoders, images encoded
    text_encoding_s: float = 0.0
    denoising_s: float = 0.0
    vae_decode_s: float = 0.0
    refiner_s: float | None = None
    hires_s: float | None = None  # the hires fix's second pass, its upscale included
    hires_upscale_s: float | None = None
    image_encoding_s: float | None = None
    total_s: float | None = None

    def to_dict(self) -> dict[str, float]:
        return {key: round(value, 4) for key, value in self.__dict__.items() if value is not None}


# Every volatile key, as it appears at the top level of the worker's output ``metadata`` (see ``to_dict``). Declared
# here so a reader of that plain dict (the batch runner's remote mode) splits it exactly as the worker built it.
VOLATILE_KEYS = frozenset({"device", "cache", "returned_as"})
TIMINGS_KEY = "timings"


@dataclass(frozen=True)
class GenerationMetadata:
    """Metadata of one request's images."""

    stable: dict[str, Any]
    timings: Timings = field(default_factory=Timings)
    volatile: dict[str, Any] = field(default_factory=dict)  # keys from VOLATILE_KEYS: device, cache hits, returned_as

    def __post_init__(self) -> None:
        undeclared = set(self.volatile) - VOLATILE_KEYS
        if undeclared:
            raise ValueError(f"volatile metadata keys {sorted(undeclared)} are not in core.results.VOLATILE_KEYS")
        misplaced = set(self.stable) & (VOLATILE_KEYS | {TIMINGS_KEY})
        if misplaced:
            raise ValueError(f"stable metadata must not hold the volatile keys {sorted(misplaced)}")

    @classmethod
    def from_output_dict(cls, metadata: Mapping[str, Any]) -> GenerationMetadata:
        """The inverse of :meth:`to_dict`: a worker output's ``metadata`` split back into its three parts.

        Timings a newer worker reports that :class:`Timings` does not know are dropped, never put among the
        stable keys.
        """
        known = {spec.name for spec in fields(Timings)}
        raw_timings = metadata.get(TIMINGS_KEY)
        timings = {
            key: value
            for key, value in (raw_timings.items() if isinstance(raw_timings, Mapping) else ())
            if key in known and isinstance(value, int | float)
        }
        return cls(
            stable={key: value for key, value in metadata.items() if key not in VOLATILE_KEYS and key != TIMINGS_KEY},
            timings=Timings(**timings),
            volatile={key: value for key, value in metadata.items() if key in VOLATILE_KEYS},
        )

    def with_timings(self, **changes: float) -> GenerationMetadata:
        return replace(self, timings=replace(self.timings, **changes))

    def with_volatile(self, **changes: Any) -> GenerationMetadata:
        return replace(self, volatile={**self.volatile, **changes})

    def with_stable(self, **changes: Any) -> GenerationMetadata:
        return replace(self, stable={**self.stable, **changes})

    def to_dict(self) -> dict[str, Any]:
        """The worker's ``metadata`` output: stable keys, then the volatile ones and ``timings``."""
        return {**self.stable, **self.volatile, TIMINGS_KEY: self.timings.to_dict()}
