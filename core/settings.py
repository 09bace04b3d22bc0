"""Every environment variable the worker, the batch runner and the converter read: one typed object.

:func:`load_settings` reads the environment once per process (the worker at start-up, the batch CLI and the
converter CLI at launch, tests with a dict of their own) and is the only reader of ``os.environ`` for settings;
library code takes a :class:`Settings` (or the values it needs) as an argument and never reads the environment
itself. Each field declares its variable, default, bounds, a one-line meaning and the commands that read it
(``read_by``): ``load_settings(command="convert")`` parses only the converter's variables, so a malformed
worker-only variable (``COMPILE=bogus``) cannot stop a conversion. A bad value is one line naming the variable,
the value and what is accepted. The README's table of variables is generated from :data:`SETTINGS_FIELDS` and
checked by a test, so the two cannot drift.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from core.errors import ConfigurationError
from core.setting_values import (
    choice as _choice,
)
from core.setting_values import (
    counts as _counts,
)
from core.setting_values import (
    flag as _flag,
)
from core.setting_values import (
    hosts as _hosts,
)
from core.setting_values import (
    log_level as _log_level,
)
from core.setting_values import (
    number as _number,
)
from core.setting_values import (
    offload as _offload,
)
from core.setting_values import (
    optional_index as _optional_index,
)
from core.setting_values import (
    optional_path as _optional_path,
)
from core.setting_values import (
    optional_sha256 as _optional_sha256,
)
from core.setting_values import (
    optional_text as _optional_text,
)
from core.setting_values import (
    paths as _paths,
)
from core.setting_values import (
    sizes as _sizes,
)
from core.setting_values import (
    whole_number as _whole_number,
)

VOLUME = Path("/runpod-volume")  # RunPod's network volume, mounted in every worker of an endpoint that has one
VOLUME_MODELS = VOLUME / "models"
BAKED_MODELS = Path("/models")  # models converted at image build time
BAKED_LORAS = Path("/loras")
BAKED_CONTROLNETS = Path("/controlnets")
BAKED_EMBEDDINGS = Path("/embeddings")
BAKED_IP_ADAPTERS = Path("/ip-adapters")


# The commands that read settings. ENGINE: the worker and the batch runner, which both run the engine.
WORKER, BATCH, CONVERT = "worker", "batch", "convert"
COMMANDS = (WORKER, BATCH, CONVERT)
ENGINE = (WORKER, BATCH)


def _setting(env: str, default: str, parse: Callable[[str], Any], doc: str, read_by: tuple[str, ...] = ENGINE) -> Any:
    metadata = {"env": env, "default": default, "parse": parse, "doc": doc, "read_by": read_by}
    return field(default=parse(default), metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """What the environment asks of this process. Build it with :func:`load_settings`."""

    # -- which model
    model_dir: Path | None = _setting(
        "MODEL_DIR", "", _optional_path, "converted model folder to serve (overrides MODEL_NAME and CHECKPOINT_PATH)"
    )
    model_name: str | None = _setting(
        "MODEL_NAME", "", _optional_text, "folder name under /runpod-volume/models or the baked /models (default sdxl)"
    )
    checkpoint_path: Path | None = _setting(
        "CHECKPOINT_PATH", "", _optional_path, "a .safetensors on the volume, converted on first start under a lock"
    )
    checkpoint: str | None = _setting(
        "CHECKPOINT",
        "",
        _optional_text,
        "volume path, hf://owner/repo/file@<commit> or https URL: downloaded to the volume, converted once",
    )
    checkpoint_sha256: str | None = _setting(
        "CHECKPOINT_SHA256",
        "",
        _optional_sha256,
        "sha256 of CHECKPOINT (required for a URL), checked before converting",
    )
    checkpoint_prediction_type: str = _setting(
        "CHECKPOINT_PREDICTION_TYPE",
        "",
        _choice("", "epsilon", "v_prediction"),
        "convert CHECKPOINT as this (a v-pred file without v_pred marker); empty: its markers decide",
    )
    checkpoint_zero_terminal_snr: str = _setting(
        "CHECKPOINT_ZERO_TERMINAL_SNR",
        "",
        _choice("", "1", "0"),
        "1: CHECKPOINT was trained at zero terminal SNR (v-prediction only); empty: its ztsnr marker decides",
    )
    refiner_dir: Path | None = _setting(
        "REFINER_DIR",
        "",
        _optional_path,
        "converted SDXL refiner folder: text-to-image jobs are refined, as officially",
    )
    refiner_name: str | None = _setting(
        "REFINER_NAME", "", _optional_text, "refiner folder name under /runpod-volume/models or the baked /models"
    )
    offload: str = _setting(
        "OFFLOAD", "auto", _offload, "auto (all on the GPU when it fits), none, model or sequential CPU offload"
    )
    # -- LoRAs
    lora_dirs: tuple[Path, ...] = _setting(
        "LORA_DIR", "/runpod-volume/loras", _paths, "LoRA folder(s), separated by ':'; the baked /loras is added"
    )
    allow_lora_download: bool = _setting(
        "ALLOW_LORA_DOWNLOAD",
        "0",
        _flag,
        "1 allows LoRAs by hf://owner/repo/file.safetensors@<commit> and LoRAs and embeddings by http(s) URL (with "
        "a sha256, or from LORA_URL_HOSTS)",
    )
    lora_url_hosts: frozenset[str] = _setting(
        "LORA_URL_HOSTS",
        "",
        _hosts,
        "host names whose https LoRA and embedding URLs need no sha256, comma-separated (exact names: list each "
        "subdomain)",
    )
    lora_download_timeout_s: float = _setting(
        "LORA_DOWNLOAD_TIMEOUT_S",
        "300",
        _number(1, 86400),
        "one deadline for a LoRA or embedding URL's download (DNS to last byte), s; a cut download resumes on the "
        "next job",
    )
    lora_download_max_mb: int = _setting(
        "LORA_DOWNLOAD_MAX_MB", "2048", _whole_number(1, 1 << 20), "largest LoRA file a URL may bring, MiB"
    )
    lora_download_dir: Path | None = _setting(
        "LORA_DOWNLOAD_DIR",
        "",
        _optional_path,
        "where downloaded LoRAs (hf:// and URLs) and embeddings are cached (default: on the volume when present)",
    )
    lora_cache_size: int = _setting(
        "LORA_CACHE_SIZE", "8", _whole_number(0, 1024), "LoRA adapters kept loaded between jobs"
    )
    lora_cache_mb: float = _setting("LORA_CACHE_MB", "2048", _number(0, 1 << 20), "memory those adapters may take, MiB")
    lora_fuse: bool = _setting(
        "LORA_FUSE", "1", _flag, "merge a job's LoRAs into the UNet's weights (no cost per step, compile kept)"
    )
    # -- ControlNets
    controlnet_dirs: tuple[Path, ...] = _setting(
        "CONTROLNET_DIR",
        "/runpod-volume/controlnets",
        _paths,
        "folder(s) of converted ControlNets (python -m model_build convert), ':'-separated; the baked /controlnets "
        "is added",
    )
    controlnet_cache_size: int = _setting(
        "CONTROLNET_CACHE_SIZE",
        "2",
        _whole_number(1, 16),
        "ControlNets kept loaded between jobs (memory planning reserves room for this many of the largest)",
    )
    # -- textual-inversion embeddings
    embeddings_dirs: tuple[Path, ...] = _setting(
        "EMBEDDINGS_DIR",
        "/runpod-volume/embeddings",
        _paths,
        "SDXL embedding folder(s) (.safetensors with clip_l and clip_g), ':'-separated; the baked /embeddings is "
        "added; a file's name is the word prompts use",
    )
    # -- IP-Adapters
    ip_adapter_dirs: tuple[Path, ...] = _setting(
        "IP_ADAPTER_DIR",
        "/runpod-volume/ip-adapters",
        _paths,
        "folder(s) laid out as h94/IP-Adapter (sdxl_models/*.safetensors, image_encoder/ folders), ':'-separated; "
        "the baked /ip-adapters is added",
    )
    ip_adapter_cache_size: int = _setting(
        "IP_ADAPTER_CACHE_SIZE",
        "2",
        _whole_number(1, 16),
        "IP-Adapters kept loaded between jobs, with their image encoders (memory planning reserves room for them)",
    )
    # -- outputs
    bucket_endpoint_url: str | None = _setting(
        "BUCKET_ENDPOINT_URL",
        "",
        _optional_text,
        "S3 bucket URL: images are uploaded and URLs returned",
        (WORKER,),
    )
    bucket_access_key_id: str | None = _setting(
        "BUCKET_ACCESS_KEY_ID",
        "",
        _optional_text,
        "the bucket's access key (RunPod's rp_upload reads it)",
        (WORKER,),
    )
    bucket_secret_access_key: str | None = _setting(
        "BUCKET_SECRET_ACCESS_KEY",
        "",
        _optional_text,
        "the bucket's secret key (RunPod's rp_upload reads it)",
        (WORKER,),
    )
    max_payload_bytes: int = _setting(
        "MAX_PAYLOAD_BYTES",
        "10000000",
        _whole_number(1, 1 << 30),
        "largest base64 result (RunPod's /run limit is 10 MB)",
        (WORKER,),
    )
    max_job_pixels: int = _setting(
        "MAX_JOB_PIXELS",
        "8388608",
        _whole_number(64 * 64, 8 * 4096 * 4096),
        "width x height x num_images a job may ask for (8 x 1024²)",
    )
    # -- user-supplied URLs (image_url and masks; LoRA URLs follow ALLOW_PRIVATE_URLS too)
    allow_private_urls: bool = _setting(
        "ALLOW_PRIVATE_URLS",
        "0",
        _flag,
        "1 lets job URLs (images, masks, LoRAs) reach loopback, private and link-local addresses (private "
        "deployments, tests)",
    )
    url_timeout_s: float = _setting(
        "URL_TIMEOUT_S", "30", _number(0.1, 3600), "one deadline for a job URL's whole transfer (DNS to last byte), s"
    )
    upload_timeout_s: float = _setting(
        "UPLOAD_TIMEOUT_S",
        "60",
        _number(1, 3600),
        "deadline for one image's S3 upload, retries included, s",
        (WORKER,),
    )
    # -- engine
    prompt_encoder_cuda_graphs: bool = _setting(
        "PROMPT_ENCODER_CUDA_GRAPHS", "1", _flag, "0 runs the text encoders eagerly instead of from CUDA graphs"
    )
    channels_last: bool = _setting("CHANNELS_LAST", "1", _flag, "UNet and VAE convolutions in channels-last layout")
    compile: str = _setting(
        "COMPILE",
        "off",
        _choice("off", "unet", "regional", "aot"),
        "torch.compile the whole UNet, its blocks, or off; aot: AOTInductor packages a warm start loads, no tracing",
    )
    compile_mode: str = _setting(
        "COMPILE_MODE",
        "default",
        _choice("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"),
        "torch.compile mode (reduce-overhead adds CUDA graphs, with COMPILE=aot too: captured around each package)",
    )
    compile_vae: bool = _setting(
        "COMPILE_VAE", "0", _flag, "1 also compiles the VAE decoder (with COMPILE=aot: a package of its own)"
    )
    quantize: str = _setting(
        "QUANTIZE", "off", _choice("off", "fp8"), "fp8: UNet transformer linears in float8 (compute capability 8.9+)"
    )
    compile_cache_dir: Path | None = _setting(
        "COMPILE_CACHE_DIR", "", _optional_path, "compiled code kept between starts (default: on the volume if mounted)"
    )
    prefetch_weights: bool = _setting(
        "PREFETCH_WEIGHTS",
        "1",
        _flag,
        "read the weight files on a thread while torch imports (cold page cache)",
        (WORKER,),
    )
    warmup: bool = _setting(
        "WARMUP", "1", _flag, "on a GPU, one short job at start-up so the first paid job runs at full speed"
    )
    warmup_sizes: tuple[tuple[int, int], ...] = _setting(
        "WARMUP_SIZES", "1024x1024", _sizes, "WIDTHxHEIGHT list compiled at start-up; other sizes run eagerly"
    )
    warmup_batch_sizes: tuple[int, ...] = _setting(
        "WARMUP_BATCH_SIZES", "1", _counts, "images per call compiled at start-up (one graph each; batch: --batch-size)"
    )
    warmup_guidance: str = _setting(
        "WARMUP_GUIDANCE",
        "cfg",
        _choice("cfg", "none", "both"),
        "UNet batch compiled at start-up: with guidance (cfg), without (none: guidance 0/1, Lightning/LCM/Turbo), both",
    )
    vae_dtype: str = _setting(
        "VAE_DTYPE",
        "",
        _choice("", "fp16", "bf16", "fp32"),
        "VAE dtype (default: fp32 when its config asks, else fp16)",
    )
    vae_tile_pixels: int = _setting(
        "VAE_TILE_PIXELS",
        "4194304",
        _whole_number(0, 8 * 4096 * 4096),
        "images of more pixels are VAE-decoded and encoded in tiles (the VAE's own size, 25% overlap); 0: never",
    )
    prompt_cache_mb: float = _setting(
        "PROMPT_CACHE_MB", "256", _number(0, 1 << 20), "memory for recent prompts' embeddings (LRU, on the GPU), MiB"
    )
    prompt_weighting: str = _setting(
        "PROMPT_WEIGHTING",
        "multiply",
        _choice("multiply", "restore_mean"),
        "weighted tokens: multiply (A1111's 'No norm') or restore_mean (A1111 1.10's default 'Original')",
    )
    log_level: str | None = _setting(
        "LOG_LEVEL",
        "",
        _log_level,
        "Python logging level (default: INFO in the worker, WARNING in the batch CLI)",
        (WORKER, BATCH, CONVERT),
    )
    # -- batch and converter
    runpod_api_key: str | None = _setting(
        "RUNPOD_API_KEY", "", _optional_text, "API key for `batch run --endpoint` against RunPod's hosted API", (BATCH,)
    )
    model_build_cache: Path | None = _setting(
        "MODEL_BUILD_CACHE",
        "",
        _optional_path,
        "download cache of the converter (default ~/.cache/model_build)",
        (WORKER, BATCH, CONVERT),
    )
    # -- set by the platform, read only
    runpod_pod_id: str | None = _setting(
        "RUNPOD_POD_ID", "", _optional_text, "set by RunPod: progress updates are sent only there", (WORKER,)
    )
    job_completion_index: int | None = _setting(
        "JOB_COMPLETION_INDEX",
        "",
        _optional_index,
        "set by a Kubernetes Indexed Job: this pod's shard with `batch run --num-shards N`",
        (BATCH,),
    )

    @property
    def lora_roots(self) -> tuple[Path, ...]:
        """The LoRA folders in search order, with the image's baked folder last."""
        return self.lora_dirs if BAKED_LORAS in self.lora_dirs else (*self.lora_dirs, BAKED_LORAS)

    @property
    def controlnet_roots(self) -> tuple[Path, ...]:
        """The ControlNet folders in search order, with the image's baked folder last."""
        dirs = self.controlnet_dirs
        return dirs if BAKED_CONTROLNETS in dirs else (*dirs, BAKED_CONTROLNETS)

    @property
    def embedding_roots(self) -> tuple[Path, ...]:
        """The embedding folders in search order, with the image's baked folder last."""
        dirs = self.embeddings_dirs
        return dirs if BAKED_EMBEDDINGS in dirs else (*dirs, BAKED_EMBEDDINGS)

    @property
    def ip_adapter_roots(self) -> tuple[Path, ...]:
        """The IP-Adapter folders in search order, with the image's baked folder last."""
        dirs = self.ip_adapter_dirs
        return dirs if BAKED_IP_ADAPTERS in dirs else (*dirs, BAKED_IP_ADAPTERS)

    @property
    def bucket_configured(self) -> bool:
        return bool(self.bucket_endpoint_url)

    @property
    def on_runpod(self) -> bool:
        return bool(self.runpod_pod_id)


SETTINGS_FIELDS = tuple(f for f in fields(Settings))


def load_settings(environ: Mapping[str, str] | None = None, command: str | None = None, **overrides: Any) -> Settings:
    """Read the settings of ``command`` (default: every command's) from ``environ`` (default: the process
    environment); a bad value raises :class:`ConfigurationError` naming the variable and what is accepted.

    Variables that ``command`` does not read are neither parsed nor checked: they keep their defaults.
    """
    if command is not None and command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}, got {command!r}")
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for spec in SETTINGS_FIELDS:
        name = spec.metadata["env"]
        raw = env.get(name)
        if raw is None or (command is not None and command not in spec.metadata["read_by"]):
            continue
        try:
            values[spec.name] = spec.metadata["parse"](raw)
        except ValueError as error:
            shown = raw if len(raw) <= 60 else raw[:57] + "..."
            default = spec.metadata["default"]
            raise ConfigurationError(
                f"{name}={shown!r} is invalid: {error} (default: {repr(default) if default else 'unset'})"
            ) from None
    values.update(overrides)
    return Settings(**values)
