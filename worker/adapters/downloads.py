"""Adapter files by URL (LoRAs, embeddings): who may download what, and into which cache.

A request names a file by an http(s) URL together with its sha256 (64 hex digits), or by an https URL on a host
the endpoint trusts (``LORA_URL_HOSTS`` for LoRAs) without one; the endpoint must allow downloads at all
(``ALLOW_LORA_DOWNLOAD=1``). An http URL always needs the sha256: only TLS shows that the trusted host sent the
bytes, while a pinned file is checked whatever carried it.

The file comes through :func:`core.url_download.cached_download`, the one download path (the checkpoint's too):
resumable, locked, public addresses only unless ``ALLOW_PRIVATE_URLS=1``, one deadline and a byte bound; and it
is kept on the volume under its hash (``<cache>/sha256/<hex>.safetensors``), so a pinned file is read from there
without any request, whichever URL named it. This module imports neither torch nor the engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from core.safetensors_files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, pickle_suffix
from core.settings import VOLUME
from core.sha256_pins import normalize_sha256
from core.url_download import CachedFile, cached_download
from core.url_fetch import UrlFetchError, UrlPolicy, shown_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UrlDownloads:
    """What an endpoint allows for one kind of adapter by URL, and the names of the settings that say so."""

    allowed: bool
    hosts: frozenset[str]  # https hosts whose URLs need no sha256
    policy: UrlPolicy  # addresses, deadline, byte bound (the file's whole size)
    cache_dir: Path
    allow_setting: str  # e.g. ALLOW_LORA_DOWNLOAD
    hosts_setting: str  # e.g. LORA_URL_HOSTS


def default_download_dir() -> Path:
    """Where ``LORA_DOWNLOAD_DIR`` is when unset: on RunPod the network volume survives the worker, so there."""
    if VOLUME.is_dir():
        return VOLUME / ".cache" / "hf-loras"
    return Path.home() / ".cache" / "sdxl-worker" / "hf-loras"


def is_url(name: str) -> bool:
    """Whether a request's name is an http(s) URL (anything else is a file name or hf://)."""
    return name[:8].lower().startswith(("http://", "https://"))


def download_by_url(
    url: str,
    sha256: str | None,
    downloads: UrlDownloads,
    *,
    field: str,
    sha256_field: str,
    what: str,
    instead: str,
    error: Callable[[str], Exception],
    suffix: str = SAFETENSORS_SUFFIX,
) -> CachedFile:
    """The cached file of ``url`` (downloaded when not cached yet); every refusal is ``error(message)``.

    ``field`` and ``sha256_field`` name the request's fields in messages, ``what`` the adapter ("LoRA"),
    ``instead`` what else the user can do when downloads are off ("put the file under /runpod-volume/loras").
    """
    shown = shown_url(url)
    if not downloads.allowed:
        raise error(
            f"{field}: {shown}: downloading {what}s is off on this worker; set {downloads.allow_setting}=1 on the "
            f"endpoint, or {instead}"
        )
    parts = urlsplit(url.strip())
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower().rstrip(".")
    if pickle_suffix(parts.path):
        raise error(
            f"{field}: {shown} names a pickle file ({', '.join(PICKLE_SUFFIXES)}), which can run code when loaded "
            f"and is never downloaded; use the {SAFETENSORS_SUFFIX} file"
        )
    if sha256 is None:
        _check_trusted_host(scheme, host, shown, downloads, sha256_field, what, error)
    else:
        try:
            sha256 = normalize_sha256(sha256)
        except ValueError as problem:
            raise error(f"{sha256_field}: {problem}") from None
    started = time.perf_counter()
    try:
        cached = cached_download(
            url,
            downloads.cache_dir,
            downloads.policy,
            field=field,
            sha256=sha256,
            sha256_field=sha256_field,
            suffix=suffix,
        )
    except UrlFetchError as problem:
        raise error(problem.message) from None
    except OSError as problem:  # the cache folder: a full or read-only volume
        raise error(
            f"{field}: cannot keep the download of {shown} in {downloads.cache_dir}: "
            f"{problem.strerror or problem}; free space on the volume or make it writable"
        ) from None
    if cached.downloaded:
        size = cached.path.stat().st_size
        log.info("downloaded %s %s (%.1f MB) in %.1f s", what, shown, size / 1e6, time.perf_counter() - started)
    return cached


def _check_trusted_host(
    scheme: str,
    host: str,
    shown: str,
    downloads: UrlDownloads,
    sha256_field: str,
    what: str,
    error: Callable[[str], Exception],
) -> None:
    """A URL without a sha256 must be https on a host the endpoint lists; else say how to pin it."""
    pin = f'add "sha256": "<64 hex digits>" to the {what} entry (sha256sum FILE prints it)'
    if host in downloads.hosts and scheme != "https":
        raise error(
            f"{sha256_field}: required for {shown}: without a sha256 only https URLs of trusted hosts are "
            f"downloaded (TLS shows the host sent the file); use https, or {pin}"
        )
    if host not in downloads.hosts:
        listed = ", ".join(sorted(downloads.hosts)) or "none"
        raise error(
            f"{sha256_field}: required for {'an' if what[0] in 'aeiou' else 'a'} {what} by URL: {host or shown} is "
            "not a host this endpoint trusts "
            f"({downloads.hosts_setting}: {listed}); {pin}, or list the host in {downloads.hosts_setting} on the "
            "endpoint"
        )
