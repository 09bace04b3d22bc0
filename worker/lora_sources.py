"""Where a LoRA name points: a ``.safetensors`` file under the LoRA folders, or a pinned Hub file.

A request names a LoRA as ``styles/ink`` (``.safetensors`` optional) under one of the LoRA roots
(``LORA_DIR``, default ``/runpod-volume/loras``, then the image's baked ``/loras``), or as
``hf://owner/repo/path/file.safetensors@<40-hex commit>``, downloaded once into ``LORA_DOWNLOAD_DIR``
and only when ``ALLOW_LORA_DOWNLOAD=1``.

Nothing here reads a LoRA's contents: resolving costs a few ``stat`` calls, so a cached LoRA is
used again without touching the disk. Every refusal is a :class:`LoraError` whose message names
the request field and says what to do (the handler returns it as the job's ``error``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# worker.engine imports this package's LoRA code lazily (inside Engine._lora_manager), so importing
# the engine here at module level cannot form a cycle; LoraError must be an EngineError so the
# handler and the batch runner report it as the job's error instead of an internal failure.
from worker.engine import EngineError

DEFAULT_LORA_DIR = "/runpod-volume/loras"
BAKED_LORA_DIR = "/loras"
SAFETENSORS_SUFFIX = ".safetensors"
# Pickle-based formats can run arbitrary code when loaded; they are never opened.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
MAX_LISTED_NAMES = 20
MAX_SCANNED_FILES = 10_000  # listing available names is for error messages; never let it crawl a huge volume
HF_PREFIX = "hf://"
_HF_NAME = re.compile(
    r"^(?P<owner>[A-Za-z0-9][\w.-]*)/(?P<repo>[A-Za-z0-9][\w.-]*)/(?P<file>[^@]+)@(?P<revision>[^@]*)$"
)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class LoraError(EngineError):
    """A LoRA the job asked for cannot be used; the message names it and says what to change."""


@dataclass(frozen=True)
class LoraSettings:
    """Where LoRAs come from and how many stay loaded; :meth:`from_env` reads the worker's environment."""

    roots: tuple[Path, ...]
    allow_download: bool = False
    download_dir: Path | None = None
    cache_size: int = 8  # adapters kept loaded (inactive) for reuse
    cache_mb: float = 2048.0  # their parameter memory, in MiB

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LoraSettings:
        env = os.environ if environ is None else environ
        roots = [Path(part) for part in env.get("LORA_DIR", DEFAULT_LORA_DIR).split(os.pathsep) if part]
        if Path(BAKED_LORA_DIR) not in roots:
            roots.append(Path(BAKED_LORA_DIR))
        return cls(
            roots=tuple(roots),
            allow_download=env.get("ALLOW_LORA_DOWNLOAD", "0").strip().lower() in ("1", "true", "yes"),
            download_dir=Path(env["LORA_DOWNLOAD_DIR"]) if env.get("LORA_DOWNLOAD_DIR") else default_download_dir(),
            cache_size=_positive_number(env, "LORA_CACHE_SIZE", 8, int),
            cache_mb=_positive_number(env, "LORA_CACHE_MB", 2048.0, float),
        )


def _positive_number(env: Mapping[str, str], key: str, default: float, kind: type) -> float:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{key}={raw!r} is not a number") from None
    if value < 0:
        raise ValueError(f"{key}={raw!r} must be >= 0")
    return value


def default_download_dir() -> Path:
    """On RunPod the network volume survives the worker, so downloads are kept there."""
    volume = Path("/runpod-volume")
    if volume.is_dir():
        return volume / ".cache" / "hf-loras"
    return Path.home() / ".cache" / "sdxl-worker" / "hf-loras"


@dataclass(frozen=True)
class LoraSource:
    """A resolved LoRA file. ``identity`` changes whenever the file is replaced or rewritten."""

    name: str  # as the request gave it
    label: str  # what reports show: the name under its root, or the hf:// address
    origin: str  # "local" or "hf"
    path: Path  # the real file (symlinks resolved)
    identity: str

    @classmethod
    def of(cls, name: str, label: str, origin: str, path: Path) -> LoraSource:
        stat = path.stat()
        # ctime and inode catch a file rewritten in place with its size and mtime preserved (cp -p, rsync -t).
        identity = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"
        return cls(name=name, label=label, origin=origin, path=path, identity=identity)


@dataclass(frozen=True)
class HfLoraName:
    repo_id: str
    filename: str
    revision: str

    def __str__(self) -> str:
        return f"{HF_PREFIX}{self.repo_id}/{self.filename}@{self.revision}"


def parse_hf_name(name: str, field: str = "name") -> HfLoraName:
    """``hf://owner/repo/path/file.safetensors@<40-hex commit>`` -> its parts, or a LoraError saying what is wrong."""
    form = "hf://owner/repo/path/file.safetensors@<40-hex commit sha>"
    match = _HF_NAME.match(name.removeprefix(HF_PREFIX))
    if match is None:
        raise LoraError(f"{field}: {name!r} is not a valid Hub LoRA address; use {form}")
    filename, revision = match["file"], match["revision"]
    if not _COMMIT.match(revision):
        raise LoraError(
            f"{field}: {name!r} must pin a full 40-character commit sha after '@' (got {revision!r}), so the file "
            f"cannot change under the cache; use {form}"
        )
    parts = filename.split("/")
    if any(part in ("", ".", "..") for part in parts) or "\\" in filename:
        raise LoraError(f"{field}: {name!r} has an invalid file path inside the repository; use {form}")
    _refuse_pickle(filename, field, name)
    if not filename.endswith(SAFETENSORS_SUFFIX):
        raise LoraError(f"{field}: {name!r} must name a {SAFETENSORS_SUFFIX} file; use {form}")
    return HfLoraName(repo_id=f"{match['owner']}/{match['repo']}", filename=filename, revision=revision)


def _refuse_pickle(path_text: str, field: str, name: str) -> None:
    if path_text.lower().endswith(PICKLE_SUFFIXES):
        raise LoraError(
            f"{field}: {name!r} is a pickle file ({', '.join(PICKLE_SUFFIXES)}), which can run code when loaded and "
            f"is never opened; convert it to {SAFETENSORS_SUFFIX} and use that"
        )


class LoraResolver:
    """Turns request names into :class:`LoraSource` objects under the configured roots."""

    def __init__(self, settings: LoraSettings) -> None:
        self.settings = settings

    def resolve(self, name: str, field: str = "name") -> LoraSource:
        if name.startswith(HF_PREFIX):
            return self._resolve_hf(name, field)
        if _URL_SCHEME.match(name):
            raise LoraError(
                f"{field}: {name!r}: only file names under the LoRA folders and hf://owner/repo/file.safetensors@"
                "<commit> addresses are supported"
            )
        return self._resolve_local(name, field)

    # -- local files ----------------------------------------------------------------------------------------------

    def _resolve_local(self, name: str, field: str) -> LoraSource:
        if "\x00" in name or "\\" in name:
            raise LoraError(f"{field}: {name!r} contains a NUL or backslash; use a name like 'styles/ink'")
        if name.startswith("/") or name.startswith("~"):
            raise LoraError(
                f"{field}: {name!r} is an absolute path; give the file's name relative to the LoRA folders "
                f"({self._roots_text()}), like 'styles/ink'"
            )
        parts = name.split("/")
        if ".." in parts:
            raise LoraError(f"{field}: {name!r} contains '..'; LoRAs are only read from inside {self._roots_text()}")
        _refuse_pickle(name, field, name)
        relative = name if name.endswith(SAFETENSORS_SUFFIX) else name + SAFETENSORS_SUFFIX

        for root in self.settings.roots:
            if not root.is_dir():
                continue
            candidate = root / relative
            if not (candidate.exists() or candidate.is_symlink()):
                continue
            real_root = root.resolve()
            real = candidate.resolve()
            if not real.is_relative_to(real_root):
                raise LoraError(
                    f"{field}: {name!r} is a link that points outside the LoRA folder {root}; copy the file into the "
                    "folder instead of linking it"
                )
            if not real.exists():
                continue  # a dangling link inside the root is as good as missing
            if not real.is_file():
                raise LoraError(f"{field}: {name!r} is a folder under {root}, not a {SAFETENSORS_SUFFIX} file")
            label = name.removesuffix(SAFETENSORS_SUFFIX)
            return LoraSource.of(name=name, label=label, origin="local", path=real)
        raise LoraError(self._missing_message(name, field, relative))

    def _missing_message(self, name: str, field: str, relative: str) -> str:
        base = relative.removesuffix(SAFETENSORS_SUFFIX)
        for root in self.settings.roots:
            for suffix in PICKLE_SUFFIXES:
                if root.is_dir() and (root / (base + suffix)).is_file():
                    return (
                        f"{field}: {name!r}: only {root / (base + suffix)} exists, a pickle file, which is never "
                        f"opened; convert it to {SAFETENSORS_SUFFIX}"
                    )
        existing = [root for root in self.settings.roots if root.is_dir()]
        if not existing:
            return (
                f"{field}: no LoRA named {name!r}: none of the LoRA folders exists ({self._roots_text()}); "
                "set LORA_DIR or put .safetensors files there"
            )
        names, more = self.available_names()
        if not names:
            listing = "there are no .safetensors files there"
        else:
            listing = "available: " + ", ".join(names) + (f" (and {more} more)" if more else "")
        return f"{field}: no LoRA named {name!r} in {', '.join(str(root) for root in existing)}; {listing}"

    def available_names(self, limit: int = MAX_LISTED_NAMES) -> tuple[list[str], int]:
        """Sorted names a request may use (first ``limit``), and how many more there are."""
        found: set[str] = set()
        scanned = 0
        for root in self.settings.roots:
            if not root.is_dir():
                continue
            real_root = root.resolve()
            for folder, subfolders, files in os.walk(root):  # does not descend into linked folders
                subfolders[:] = [sub for sub in subfolders if not sub.startswith(".")]
                for file in files:
                    scanned += 1
                    if scanned > MAX_SCANNED_FILES:
                        break
                    if file.startswith(".") or not file.endswith(SAFETENSORS_SUFFIX):
                        continue
                    path = Path(folder) / file
                    if path.resolve().is_relative_to(real_root):
                        found.add(path.relative_to(root).as_posix().removesuffix(SAFETENSORS_SUFFIX))
        names = sorted(found)
        return names[:limit], max(0, len(names) - limit)

    def _roots_text(self) -> str:
        return ", ".join(str(root) for root in self.settings.roots)

    # -- Hub files ------------------------------------------------------------------------------------------------

    def _resolve_hf(self, name: str, field: str) -> LoraSource:
        hub_name = parse_hf_name(name, field)
        if not self.settings.allow_download:
            raise LoraError(
                f"{field}: {name!r}: downloading LoRAs is off on this worker; set ALLOW_LORA_DOWNLOAD=1 or put the "
                f"file under {self._roots_text()}"
            )
        path = self._download(hub_name, field)
        return LoraSource.of(name=name, label=str(hub_name), origin="hf", path=path)

    def _download(self, hub_name: HfLoraName, field: str) -> Path:
        from huggingface_hub import hf_hub_download

        download_dir = self.settings.download_dir or default_download_dir()
        try:
            # A commit-pinned file already in the cache is returned without any network request.
            path = hf_hub_download(
                repo_id=hub_name.repo_id,
                filename=hub_name.filename,
                revision=hub_name.revision,
                cache_dir=download_dir,
            )
        except Exception as error:  # network, auth, missing repo/file: all are the caller's to fix or retry
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise LoraError(f"{field}: could not download {hub_name}: {reason}") from None
        return Path(path).resolve()
