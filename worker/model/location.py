"""Which converted folder the worker serves, and how a network volume gets one on the first start.

The folder, in order:

1. ``MODEL_DIR``, as given;
2. with ``CHECKPOINT`` (a path on the volume, ``hf://owner/repo/file@<commit>``, or an https URL with
   ``CHECKPOINT_SHA256``) or the older ``CHECKPOINT_PATH`` (a path): ``/runpod-volume/models/<name>``,
   where the first worker to start downloads the checkpoint into the volume's cache (resumable, with
   progress in the log), converts it once, and every other worker waits for it and then loads it.
   Without a volume the same happens on the container's own disk, in ``/models/<name>``: it works, but
   every new worker pays the download and the conversion again (a warning says so);
3. ``/runpod-volume/models/<MODEL_NAME>`` when that folder exists (converted earlier);
4. ``/models/<MODEL_NAME>``, the folder baked into the image at build time.

``<name>`` is ``MODEL_NAME``, else the checkpoint's file name without ``.safetensors``, else ``sdxl``.

Download and conversion run under one file lock beside the model folder, so workers starting at
once download and convert once; the converter itself renames a finished, proven folder into place,
so a failure (a full volume, a wrong sha256, a killed download) leaves no model folder, only a
partial download in the cache that the next start resumes. The Hugging Face cache and the compile
caches go to the volume too (:func:`volume_cache_environment`), so they survive the worker.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from core.errors import NO_SPACE_ERRNOS, ConfigurationError, ModelMissing
from core.hub_names import HF_PREFIX, HubNameError, has_url_scheme, is_hub_name, parse_hub_name
from core.settings import BAKED_MODELS, VOLUME, Settings
from core.url_download import download_lock

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "sdxl"
LOCK_LOG_EVERY_S = 30.0  # how often a waiting worker says it is still waiting
TEMP_DOWNLOADS = Path(tempfile.gettempdir()) / "model_build"


@dataclass(frozen=True)
class ModelPlan:
    """Where the model folder is, and the checkpoint to convert into it first (None: serve it as it is)."""

    model_dir: Path
    source: str | None = None
    sha256: str | None = None
    cache_dir: Path | None = None  # download cache for a remote source
    keep_download: bool = True  # False: delete the download after converting (no volume to keep it on)
    prediction_type: str | None = None  # the converter's --prediction-type / --zero-terminal-snr (None: markers)
    zero_terminal_snr: bool | None = None


def source_model_name(source: str) -> str:
    """The model folder name a checkpoint source gives: its file name without the extension, filesystem-safe."""
    if is_hub_name(source):
        try:
            path = parse_hub_name(source).filename
        except HubNameError:
            path = source.removeprefix(HF_PREFIX)  # refused with its reason when it is fetched; any name will do
    elif has_url_scheme(source):
        path = unquote(urlsplit(source).path)
    else:
        path = source
    stem = Path(path.rstrip("/")).name.removesuffix(".safetensors")
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".") or DEFAULT_MODEL_NAME


def _checkpoint_source(settings: Settings) -> str | None:
    """CHECKPOINT, or CHECKPOINT_PATH (the older, path-only name); both set must agree."""
    path = str(settings.checkpoint_path) if settings.checkpoint_path else None
    source = settings.checkpoint or None
    if source and path and source != path:
        raise ConfigurationError(
            f"CHECKPOINT={source!r} and CHECKPOINT_PATH={path!r} name different checkpoints; "
            "set only CHECKPOINT (CHECKPOINT_PATH is its older name)"
        )
    return source or path


def _prediction_options(settings: Settings, source: str | None) -> tuple[str | None, bool | None]:
    """CHECKPOINT_PREDICTION_TYPE / CHECKPOINT_ZERO_TERMINAL_SNR, for the conversion of CHECKPOINT only."""
    prediction_type = settings.checkpoint_prediction_type or None
    ztsnr = {"1": True, "0": False}.get(settings.checkpoint_zero_terminal_snr)
    if (prediction_type or ztsnr is not None) and not source:
        raise ConfigurationError(
            "CHECKPOINT_PREDICTION_TYPE / CHECKPOINT_ZERO_TERMINAL_SNR say how to convert CHECKPOINT, which is not "
            "set; a converted folder already records its prediction (model_build convert --prediction-type)"
        )
    if prediction_type is not None and not _prediction_possible(prediction_type, ztsnr):
        raise ConfigurationError(
            "CHECKPOINT_ZERO_TERMINAL_SNR=1 needs a v-prediction model, but CHECKPOINT_PREDICTION_TYPE=epsilon; "
            "set CHECKPOINT_PREDICTION_TYPE=v_prediction or leave CHECKPOINT_ZERO_TERMINAL_SNR empty"
        )
    return prediction_type, ztsnr


def _prediction_possible(prediction_type: str, zero_terminal_snr: bool | None) -> bool:
    """The converter's own rule (:func:`model_build.prediction.decide_prediction`); a given type makes the
    checkpoint's markers irrelevant, so it can be asked before the file is read."""
    from model_build.errors import ConversionError
    from model_build.prediction import decide_prediction

    try:
        decide_prediction((), prediction_type, zero_terminal_snr)
    except ConversionError:
        return False
    return True


def plan_model(settings: Settings, volume: Path = VOLUME, baked: Path = BAKED_MODELS) -> ModelPlan:
    """Decide the model folder from the settings, without touching the network or converting anything."""
    source = _checkpoint_source(settings)
    sha256 = settings.checkpoint_sha256 or None
    if sha256 and not source:
        raise ConfigurationError("CHECKPOINT_SHA256 is set but CHECKPOINT is not; set CHECKPOINT to the file it pins")
    if source and has_url_scheme(source) and not is_hub_name(source) and not sha256:
        raise ConfigurationError(
            f"CHECKPOINT={_shown(source)} is a URL without CHECKPOINT_SHA256; a URL can serve other bytes tomorrow, "
            "so set CHECKPOINT_SHA256 to the file's sha256 (sha256sum prints it)"
        )
    name = settings.model_name or (source_model_name(source) if source else DEFAULT_MODEL_NAME)
    volume_models = volume / "models"
    on_volume = volume.is_dir()
    # Without a volume a download lands on the container's disk, used once and then deleted.
    cache_dir = settings.model_build_cache or (volume / "cache" / "model_build" if on_volume else TEMP_DOWNLOADS)
    keep_download = on_volume or settings.model_build_cache is not None
    prediction = _prediction_options(settings, source)
    if settings.model_dir is not None:
        return ModelPlan(settings.model_dir, source, sha256, cache_dir if source else None, keep_download, *prediction)
    if source:
        # No volume: the container's own disk (slow: every new worker downloads and converts again; logged).
        folder = (volume_models if on_volume else baked) / name
        return ModelPlan(folder, source, sha256, cache_dir, keep_download, *prediction)
    if (volume_models / name).exists():
        return ModelPlan(volume_models / name)
    return ModelPlan(baked / name)


def resolve_model_dir(settings: Settings, volume: Path = VOLUME, baked: Path = BAKED_MODELS) -> Path:
    """The folder the worker will serve (converting nothing)."""
    return plan_model(settings, volume, baked).model_dir


def prepare_model_dir(settings: Settings, volume: Path = VOLUME, baked: Path = BAKED_MODELS) -> Path:
    """The model folder to load; with a checkpoint configured, download and convert it first (once, locked).

    Raises :class:`ModelMissing` when the download or the volume failed (a later start can succeed)
    and :class:`ConfigurationError` when the settings name something that cannot work.
    """
    plan = plan_model(settings, volume, baked)
    if plan.source is None:
        return plan.model_dir
    if converted_from(plan):
        log.info("model %s is converted from %s", plan.model_dir, _shown(plan.source))
        return plan.model_dir
    if not volume.is_dir():
        log.warning(
            "no network volume at %s: %s goes onto this worker's own disk (%s), and every new worker downloads and "
            "converts it again; attach a network volume to do it once, or bake it into the image (--build-arg "
            "CHECKPOINT=...)",
            volume,
            _setting_name(plan),
            plan.model_dir,
        )
    try:
        with _model_lock(plan.model_dir):
            if not converted_from(plan):  # else another worker finished it while this one waited
                _fetch_and_convert(plan)
    except OSError as error:
        raise _storage_error(plan, error) from None
    return plan.model_dir


def converted_from(plan: ModelPlan) -> bool:
    """True when the folder holds a complete conversion of this very source, told without downloading or hashing.

    The manifest records the source's name (the hf:// URI, or the URL without its query string),
    size, modification time and sha256. A remote source is the same when its name (and the pin, if
    any) match; a local file when its size and modification time match, as make and rsync decide, so
    a restarted worker reads neither the network nor 7 GB off the volume.
    """
    from model_build.errors import ConversionError
    from model_build.manifest import CONVERTER_VERSION, MANIFEST_NAME, ModelFolderError, verify
    from model_build.prediction import matches
    from model_build.source import display_url

    if plan.source is None or not (plan.model_dir / MANIFEST_NAME).is_file():
        return False
    try:
        manifest = verify(plan.model_dir, full=False)
    except ModelFolderError:
        return False  # damaged: the conversion replaces it
    recorded = manifest.source
    if recorded is None:
        return False
    if is_hub_name(plan.source):
        same_file = recorded.name == plan.source
    elif has_url_scheme(plan.source):
        same_file = recorded.name == display_url(plan.source)
    else:
        try:
            stat = Path(plan.source).stat()
        except OSError:
            return False
        same_file = (recorded.size, recorded.mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    pin = plan.sha256  # normalized when the settings were read
    try:
        # a changed CHECKPOINT_PREDICTION_TYPE converts again; unset, what the markers decided stands
        same_prediction = matches(manifest.effective_prediction, plan.prediction_type, plan.zero_terminal_snr)
    except ConversionError:
        return False  # options this checkpoint cannot take: the conversion says why
    return (
        same_file
        and (pin is None or recorded.sha256 == pin)
        and manifest.converter_version == CONVERTER_VERSION
        and manifest.dtype == "fp16"
        and manifest.vae is None
        and same_prediction
    )


def _fetch_and_convert(plan: ModelPlan) -> None:
    """Download (resumable) and convert; every failure becomes ModelMissing or ConfigurationError."""
    from model_build.convert import convert
    from model_build.errors import ConversionError
    from model_build.source import PinMismatch, fetch

    assert plan.source is not None
    remote = has_url_scheme(plan.source)
    if not remote and not Path(plan.source).is_file():
        raise ConfigurationError(
            f"{_setting_name(plan)}: no such file. Copy the checkpoint there (e.g. with a pod that mounts the "
            "network volume), or fix CHECKPOINT"
        )
    started = time.perf_counter()
    if remote:
        log.info("downloading %s into %s (a partial download is resumed)", _shown(plan.source), plan.cache_dir)
    try:
        fetched = fetch(plan.source, plan.sha256, plan.cache_dir)
    except PinMismatch as error:
        removed = " The downloaded copy was deleted." if error.removed else ""
        raise ConfigurationError(
            f"{_setting_name(plan)}: the file's sha256 is {error.actual}, but CHECKPOINT_SHA256 is {error.pin}: this "
            f"is not the file you pinned (another version, or a corrupt copy).{removed} Fix CHECKPOINT or "
            f"CHECKPOINT_SHA256; nothing was written to {plan.model_dir}"
        ) from None
    except ConversionError as error:
        if _no_space(error):
            raise _storage_error(plan, _no_space(error)) from None
        # A download that failed on the way can succeed on the next start; a wrong name or a refused file cannot.
        kind = ModelMissing if error.transient else ConfigurationError
        raise kind(
            f"{_setting_name(plan)}: {_message(error)}. Nothing was written to {plan.model_dir}; an interrupted "
            "download is resumed by the next worker start, anything else needs CHECKPOINT fixed"
        ) from None
    if remote:
        size = fetched.path.stat().st_size
        log.info("downloaded %s: %.2f GB in %.0f s", fetched.name, size / 1e9, time.perf_counter() - started)
    try:
        result = convert(
            fetched.path,
            plan.model_dir,
            source_name=fetched.name,
            source_sha256=fetched.sha256,
            lock_timeout=None,  # this process holds the model lock: nobody else converts into this folder
            replace_outdated=True,
            prediction_type=plan.prediction_type,
            zero_terminal_snr=plan.zero_terminal_snr,
        )
    except ConversionError as error:
        if _no_space(error):
            raise _storage_error(plan, _no_space(error)) from None
        raise ConfigurationError(
            f"{_setting_name(plan)} cannot be served: {_message(error)}. Nothing was written to {plan.model_dir}"
        ) from None
    log.info("%s", result.message)
    if remote and not plan.keep_download and plan.cache_dir is not None:
        shutil.rmtree(plan.cache_dir, ignore_errors=True)  # nobody reuses it; the container disk is small


@contextmanager
def _model_lock(model_dir: Path) -> Iterator[None]:
    """``NAME.prepare.lock`` beside the model folder: one worker downloads and converts, the others wait (the
    download lock of :mod:`core.url_download`, held across the conversion too)."""
    path = model_dir.with_name(model_dir.name + ".prepare.lock")
    with download_lock(path, f"downloading or converting {model_dir}", log_every_s=LOCK_LOG_EVERY_S, logger=log):
        yield


def volume_cache_environment(volume: Path = VOLUME) -> dict[str, str]:
    """Cache locations on the network volume, so downloads and compiled kernels outlive the worker.

    Applied with ``setdefault``: a variable the endpoint sets itself wins. ``HF_HOME`` takes effect
    only if set before huggingface_hub is imported; torch reads its cache variables when it compiles.
    """
    caches = volume / "cache"
    return {
        "HF_HOME": str(caches / "huggingface"),
        "TORCHINDUCTOR_CACHE_DIR": str(caches / "torchinductor"),
        "TRITON_CACHE_DIR": str(caches / "triton"),
    }


def apply_volume_caches(environ: MutableMapping[str, str] | None = None, volume: Path = VOLUME) -> dict[str, str]:
    """Point the caches at the volume when one is mounted; returns what was set (call before heavy imports)."""
    target = os.environ if environ is None else environ
    if not volume.is_dir():
        return {}
    applied = {}
    for variable, value in volume_cache_environment(volume).items():
        if variable not in target:
            target[variable] = applied[variable] = value
    return applied


def _no_space(error: BaseException) -> OSError | None:
    """The OSError in the exception's chain that means "no room to write", if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in NO_SPACE_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None


def _storage_error(plan: ModelPlan, error: OSError) -> ModelMissing | ConfigurationError:
    where = plan.model_dir.parent
    if error.errno in NO_SPACE_ERRNOS:
        return ModelMissing(
            f"no space left to download and convert {_setting_name(plan)} into {where} ({os.strerror(error.errno)}). "
            "An SDXL checkpoint needs about 7 GB for the download and 7 GB for the converted fp16 folder; "
            f"free space or enlarge the network volume, then restart the worker. Nothing was left in {plan.model_dir}"
            f"; a partial download in {plan.cache_dir} is resumed by the next start (delete it to free its space)"
        )
    return ConfigurationError(
        f"cannot write the model for {_setting_name(plan)} into {where}: {os.strerror(error.errno or 0)} "
        f"({error.filename or where}); make the network volume writable or set MODEL_DIR to a writable folder"
    )


def _setting_name(plan: ModelPlan) -> str:
    return f"CHECKPOINT={_shown(plan.source or '')}"


def _shown(source: str) -> str:
    """The source without a URL's credentials or query string (download tokens live there)."""
    if has_url_scheme(source) and not is_hub_name(source):
        from model_build.source import display_url

        return display_url(source)
    return source


def _message(error: BaseException) -> str:
    """The error's own message, without a kind prefix (this module adds its own)."""
    return str(getattr(error, "message", None) or error).rstrip(".")


def resolve_refiner_dir(settings: Settings, volume: Path = VOLUME, baked: Path = BAKED_MODELS) -> Path | None:
    """The refiner folder: REFINER_DIR, else REFINER_NAME on the volume or baked into the image; None without one."""
    if settings.refiner_dir is not None:
        return settings.refiner_dir
    if not settings.refiner_name:
        return None
    volume_dir = volume / "models" / settings.refiner_name
    return volume_dir if volume_dir.exists() else baked / settings.refiner_name
