"""What one ``batch run`` is asked to do, as small frozen objects: the shard and its folder, and how to make images.

:class:`RunOptions` is common to every run; the second object picks the run kind: a
:class:`LocalEngineOptions` runs the lines on a model loaded in this process, an
:class:`EndpointOptions` sends them to a RunPod-style endpoint. ``batch.execute.run_shard`` takes
one of each. Each object checks its own values, so a bad option is a ``ConfigurationError`` naming
the option before anything is read or written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batch.claims import DEFAULT_TTL_S
from batch.jobs import Shard
from core.errors import ConfigurationError

if TYPE_CHECKING:
    from core.settings import Settings
    from worker.generation.engine import Engine

POLL_S = 1.0
WHOLE_INPUT = Shard(0, 1)
# Free space an output folder needs at the start: room for a few hundred full-size PNGs and their sidecars. Less
# means the run would stop at its first images, so it is refused at once as a configuration error (not retried).
DEFAULT_MIN_FREE_MB = 256.0


@dataclass(frozen=True)
class RunOptions:
    """The input, the shard of it this process works on, and the output folder."""

    source: Path
    out: Path
    shard: Shard = WHOLE_INPUT
    claim_ttl_s: float = DEFAULT_TTL_S
    progress: bool = True
    poll_s: float = POLL_S
    max_seconds: float | None = None  # stop gracefully after this long (exit 143, resumable)
    min_free_mb: float = DEFAULT_MIN_FREE_MB
    handle_signals: bool = False  # SIGTERM finishes the work in flight (the CLI sets it; in-process callers not)

    def __post_init__(self) -> None:
        if not self.claim_ttl_s > 0:
            raise ConfigurationError(
                f"--claim-ttl {self.claim_ttl_s:g}: a claim needs a positive lifetime in seconds "
                f"(default {DEFAULT_TTL_S:g}; longer than one pipeline call is best)"
            )
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigurationError(f"--max-seconds {self.max_seconds:g}: must be a positive number of seconds")
        if not self.min_free_mb >= 0:
            raise ConfigurationError(f"--min-free-mb {self.min_free_mb:g}: must be 0 or more")


@dataclass(frozen=True, kw_only=True)
class LocalEngineOptions:
    """Run the lines on a model loaded here. ``engine``: one already loaded (tests, benchmarks) instead of loading.

    Keyword-only: ``LocalEngineOptions(3, engine=e)`` once passed the 3 as ``model_dir``, silently at batch size 1.
    """

    model_dir: Path | None = None  # None: MODEL_DIR, or the worker's volume/baked default
    refiner_dir: Path | None = None  # None: REFINER_DIR / REFINER_NAME, as the worker; without one, no refiner
    offload: str = "auto"
    batch_size: int = 1
    deterministic: bool = True
    encode_workers: int | None = None
    allow_model_change: bool = False
    engine: Engine | None = field(default=None, compare=False, repr=False)
    # Where the model is (MODEL_DIR, ...) and the engine's settings (LoRA folders, ...); None: the environment's.
    settings: Settings | None = field(default=None, compare=False, repr=False)

    mode = "local"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigurationError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.encode_workers is not None and self.encode_workers < 0:
            raise ConfigurationError(f"--encode-workers {self.encode_workers}: must be 0 or more")

    def summary_settings(self) -> dict[str, Any]:
        """What the shard summary records about how it ran."""
        return {"batch_size": self.batch_size, "deterministic": self.deterministic}


@dataclass(frozen=True)
class EndpointOptions:
    """Send the lines to a RunPod-style endpoint (``POST <url>/runsync``)."""

    url: str
    api_key: str | None = field(default=None, repr=False)  # RUNPOD_API_KEY, read once by the CLI's settings
    concurrency: int = 4
    retries: int = 5
    request_timeout_s: float = 600.0
    backoff_s: float = 1.0

    mode = "remote"

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigurationError(f"--endpoint {self.url!r}: expected an http:// or https:// URL")
        if self.concurrency < 1:
            raise ConfigurationError(f"--concurrency {self.concurrency}: must be at least 1")
        if self.retries < 0:
            raise ConfigurationError(f"--retries {self.retries}: must be 0 or more")
        if not self.request_timeout_s > 0:
            raise ConfigurationError(f"--request-timeout {self.request_timeout_s:g}: must be a positive number")

    def summary_settings(self) -> dict[str, Any]:
        return {"endpoint": self.url, "concurrency": self.concurrency}


RunKind = LocalEngineOptions | EndpointOptions
