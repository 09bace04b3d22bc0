"""Where a LoRA name points: a ``.safetensors`` file under the LoRA folders, a pinned Hub file, or a URL.

A request names a LoRA as ``styles/ink`` (``.safetensors`` optional) under one of the LoRA roots
(``LORA_DIR``, default ``/runpod-volume/loras``, then the image's baked ``/loras``), as
``hf://owner/repo/path/file.safetensors@<40-hex commit>``, or as an http(s) URL with the file's ``sha256``
(or an https URL of a host in ``LORA_URL_HOSTS``, see :mod:`worker.adapters.downloads`); the last two are
downloaded once into ``LORA_DOWNLOAD_DIR`` and only when ``ALLOW_LORA_DOWNLOAD=1``.

Nothing here reads a LoRA's contents: resolving costs a few ``stat`` calls, so a cached LoRA is
used again without touching the disk. Every refusal is a :class:`LoraError` (a
:class:`core.errors.LoraFailed`) whose message names the request field and says what to do.
This module imports neither torch nor the engine.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from core.errors import LoraFailed, first_line
from core.hub_names import HubFileName, HubNameError, has_url_scheme, is_hub_name, parse_hub_name
from core.safetensors_files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, pickle_suffix
from core.settings import Settings
from core.url_fetch import UrlPolicy, shown_url
from worker.adapters.downloads import UrlDownloads, default_download_dir, download_by_url, is_url

MAX_LISTED_NAMES = 20
MAX_SCANNED_FILES = 10_000  # listing available names is for error messages; never let it crawl a huge volume
# Linux limits (NAME_MAX, PATH_MAX less the terminating NUL): a longer name fails in the kernel with ENAMETOOLONG.
MAX_NAME_PART_BYTES = 255
MAX_PATH_BYTES = 4095


class LoraError(LoraFailed):
    """A LoRA the job asked for cannot be used; the message names it and says what to change."""


@dataclass(frozen=True)
class LoraSettings:
    """Where LoRAs come from and how many stay loaded; :meth:`from_settings` takes them from the worker's settings."""

    roots: tuple[Path, ...]
    allow_download: bool = False
    download_dir: Path | None = None
    cache_size: int = 8  # adapters kept loaded (inactive) for reuse
    cache_mb: float = 2048.0  # their parameter memory, in MiB
    fuse_unet: bool = True  # merge the job's LoRAs into the UNet's weights, restored exactly after (see .fusion)
    url_hosts: frozenset[str] = frozenset()  # LORA_URL_HOSTS
    allow_private_urls: bool = False  # ALLOW_PRIVATE_URLS
    url_timeout_s: float = 300.0  # LORA_DOWNLOAD_TIMEOUT_S
    url_max_mb: int = 2048  # LORA_DOWNLOAD_MAX_MB

    @classmethod
    def from_settings(cls, settings: Settings) -> LoraSettings:
        return cls(
            roots=settings.lora_roots,
            allow_download=settings.allow_lora_download,
            download_dir=settings.lora_download_dir or default_download_dir(),
            cache_size=settings.lora_cache_size,
            cache_mb=settings.lora_cache_mb,
            fuse_unet=settings.lora_fuse,
            url_hosts=settings.lora_url_hosts,
            allow_private_urls=settings.allow_private_urls,
            url_timeout_s=settings.lora_download_timeout_s,
            url_max_mb=settings.lora_download_max_mb,
        )

    def url_downloads(self) -> UrlDownloads:
        """The rules for LoRAs by URL, with the settings' names for messages."""
        policy = UrlPolicy(
            self.allow_private_urls,
            self.url_timeout_s,
            self.url_max_mb << 20,
            timeout_setting="LORA_DOWNLOAD_TIMEOUT_S",
            size_setting="LORA_DOWNLOAD_MAX_MB",
        )
        cache_dir = self.download_dir or default_download_dir()
        return UrlDownloads(
            self.allow_download, self.url_hosts, policy, cache_dir, "ALLOW_LORA_DOWNLOAD", "LORA_URL_HOSTS"
        )


@dataclass(frozen=True)
class LoraSource:
    """A resolved LoRA file. ``identity`` changes whenever the file is replaced or rewritten."""

    name: str  # as the request gave it
    label: str  # what reports show: the name under its root, the hf:// address, or the URL without its query
    origin: str  # "local", "hf" or "url"
    path: Path  # the real file (symlinks resolved)
    identity: str

    @classmethod
    def of(cls, name: str, label: str, origin: str, path: Path) -> LoraSource:
        stat = path.stat()
        # ctime and inode catch a file rewritten in place with its size and mtime preserved (cp -p, rsync -t).
        identity = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"
        return cls(name=name, label=label, origin=origin, path=path, identity=identity)


def parse_hf_name(name: str, field: str = "name") -> HubFileName:
    """``hf://owner/repo/path/file.safetensors@<40-hex commit>`` -> its parts, or a LoraError saying what is wrong."""
    try:
        hub_name = parse_hub_name(name)
    except HubNameError as error:
        raise LoraError(f"{field}: {name!r} {error}") from None
    if not hub_name.filename.endswith(SAFETENSORS_SUFFIX):
        raise LoraError(
            f"{field}: {name!r} must name a {SAFETENSORS_SUFFIX} file; use hf://owner/repo/path/file.safetensors@"
            "<40-hex commit>"
        )
    _check_name_lengths(hub_name.filename, field, name)
    return hub_name


def _check_name_lengths(relative: str, field: str, name: str, roots: tuple[Path, ...] = ()) -> None:
    """Refuse a name the file system would refuse (ENAMETOOLONG), before any system call sees it."""
    shown = name if len(name) <= 60 else f"{name[:40]}…"
    for part in relative.split("/"):
        size = len(os.fsencode(part))
        if size > MAX_NAME_PART_BYTES:
            raise LoraError(
                f"{field}: {shown!r} is too long: one part of its file name is {size} bytes (with the "
                f"{SAFETENSORS_SUFFIX} suffix); file names are at most {MAX_NAME_PART_BYTES} bytes per folder or "
                "file name. Rename the file"
            )
    longest = max((len(os.fsencode(root)) for root in roots), default=0)
    total = longest + 1 + len(os.fsencode(relative))
    if roots and total > MAX_PATH_BYTES:
        raise LoraError(
            f"{field}: {shown!r} is too long: under the LoRA folder its path is {total} bytes, more than the "
            f"{MAX_PATH_BYTES} bytes a path may have. Use a shorter name"
        )


def _file_kind(path: Path) -> str:
    """What a path that is not a regular file is, in words (for "'x' is a named pipe under /loras")."""
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _refuse_pickle(path_text: str, field: str, name: str) -> None:
    if pickle_suffix(path_text):
        raise LoraError(
            f"{field}: {name!r} is a pickle file ({', '.join(PICKLE_SUFFIXES)}), which can run code when loaded and "
            f"is never opened; convert it to {SAFETENSORS_SUFFIX} and use that"
        )


class LoraResolver:
    """Turns request names into :class:`LoraSource` objects under the configured roots."""

    def __init__(self, settings: LoraSettings) -> None:
        self.settings = settings

    def resolve(
        self, name: str, field: str = "name", sha256: str | None = None, sha256_field: str = "sha256"
    ) -> LoraSource:
        """The file ``name`` means; ``sha256`` (only for a URL) pins the file a URL must bring."""
        if is_url(name):
            return self._resolve_url(name, sha256, field, sha256_field)
        if sha256 is not None:
            raise LoraError(
                f"{sha256_field}: pins a LoRA given by URL; {name!r} is not a URL, so leave sha256 out (a file "
                "under the LoRA folders or an hf:// name at a commit is already fixed)"
            )
        if is_hub_name(name):
            return self._resolve_hf(name, field)
        if has_url_scheme(name):
            raise LoraError(
                f"{field}: {name[:60]!r}: only file names under the LoRA folders, hf://owner/repo/file.safetensors@"
                "<commit> addresses and http(s) URLs are supported"
            )
        return self._resolve_local(name, field)

    def _resolve_url(self, url: str, sha256: str | None, field: str, sha256_field: str) -> LoraSource:
        cached = download_by_url(
            url,
            sha256,
            self.settings.url_downloads(),
            field=field,
            sha256_field=sha256_field,
            what="LoRA",
            instead=f"put the file under {self._roots_text()}",
            error=LoraError,
        )
        return LoraSource.of(name=url, label=shown_url(url), origin="url", path=cached.path)

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
        _check_name_lengths(relative, field, name, self.settings.roots)

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
                raise LoraError(
                    f"{field}: {name!r} is {_file_kind(real)} under {root}, not a {SAFETENSORS_SUFFIX} file"
                )
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

    def _download(self, hub_name: HubFileName, field: str) -> Path:
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
            reason = first_line(error) or type(error).__name__
            raise LoraError(f"{field}: could not download {hub_name}: {reason}") from None
        return Path(path).resolve()
