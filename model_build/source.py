"""Fetch the file the user named: a local path, ``hf://owner/repo/file@<40-hex revision>``, or an https URL.

Only what the user names is downloaded, nothing else (no configs, no other files of the repo).
Hub files go through huggingface_hub (its cache, resume and progress bar; ``HF_TOKEN`` is read by
the library and never printed). URLs are downloaded into a cache folder through the project's one
download path (:mod:`core.url_download`: resume by HTTP Range, a lock, a bounded wait for a silent
server) with a progress bar; plain ``http://`` is allowed only on the loopback interface (tests). An
optional sha256 pin is checked before the file is used, and a mismatch names both hashes.
Names shown to the user or written to the manifest never carry a URL's query string, where
download tokens usually live.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from core.hub_names import HubFileName, HubNameError, has_url_scheme, is_hub_name, parse_hub_name
from core.safetensors_files import pickle_suffix
from core.sha256_pins import normalize_sha256 as _normalize_pin
from core.url_download import DownloadInterrupted, download_file, download_lock, safe_filename, validator_path
from core.url_fetch import UrlFetchError, UrlPolicy
from model_build.errors import FetchError
from model_build.manifest import sha256_file

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class FetchedFile:
    path: Path  # a local file, ready to read
    name: str  # the source as the user named it, safe to print and to record (no query string)
    origin: str  # "local", "hf" or "url"
    sha256: str | None = None  # known when a pin was checked (saves hashing a 7 GB file twice)


def default_cache_dir(configured: Path | None = None) -> Path:
    """Where URL downloads go without --cache-dir: ``configured`` (MODEL_BUILD_CACHE), else ~/.cache/model_build."""
    return configured or Path.home() / ".cache" / "model_build"


def parse_hf_uri(uri: str) -> HubFileName:
    """``hf://owner/repo/path/to/file.safetensors@<40-hex commit>`` -> :class:`HubFileName`, or a FetchError."""
    try:
        return parse_hub_name(uri)
    except HubNameError as error:
        raise FetchError(f"{uri} {error}") from None


def display_url(url: str) -> str:
    """The URL without credentials, query string or fragment: safe to print and to record."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _refuse_pickle_name(name: str, shown: str) -> None:
    suffix = pickle_suffix(name)
    if suffix:
        raise FetchError(
            f"{shown} is a pickle checkpoint ({suffix}); pickles can run arbitrary code when loaded and are "
            "never downloaded or opened here. Use the model's .safetensors file."
        )


def fetch_hub_file(hub_file: HubFileName, cache_dir: Path | None = None) -> Path:
    """Download (or find in the cache) exactly one Hub file at a pinned revision."""
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import hf_hub_download

    _refuse_pickle_name(hub_file.filename, hub_file.uri)
    try:
        # huggingface_hub reads HF_TOKEN itself; passing it around would only risk printing it.
        return Path(
            hf_hub_download(
                hub_file.repo_id,
                hub_file.filename,
                revision=hub_file.revision,
                cache_dir=str(cache_dir) if cache_dir else None,
            )
        )
    except hub_errors.GatedRepoError as error:
        reason = "is gated: accept its terms on the Hub and set HF_TOKEN to a token of that account"
        raise FetchError(f"{hub_file.uri}: the repository {reason}") from error
    except hub_errors.RepositoryNotFoundError as error:
        reason = "does not exist or is private (set HF_TOKEN for a private one)"
        raise FetchError(f"{hub_file.uri}: repository {hub_file.repo_id} {reason}") from error
    except hub_errors.RevisionNotFoundError as error:
        raise FetchError(f"{hub_file.uri}: revision {hub_file.revision} does not exist in the repository") from error
    except hub_errors.LocalEntryNotFoundError as error:  # before EntryNotFoundError, its base class
        raise FetchError(
            f"{hub_file.uri} is not in the local cache and the Hub cannot be reached (offline, HF_HUB_OFFLINE=1, or no "
            "network); download it where the Hub is reachable, or pass a local path",
            transient=True,
        ) from error
    except hub_errors.EntryNotFoundError as error:
        reason = "is not in the repository at that revision"
        raise FetchError(f"{hub_file.uri}: file {hub_file.filename} {reason}") from error
    except (hub_errors.HfHubHTTPError, OSError) as error:
        raise FetchError(
            f"{hub_file.uri}: download failed ({type(error).__name__}); run again to resume", transient=True
        ) from error


# A checkpoint is set by the endpoint's owner, not by a job: any address, no single deadline (7 GB at a slow
# link takes hours), but a server that sends nothing for ``timeout`` seconds is given up on.
CHECKPOINT_DEADLINE_S = 7 * 24 * 3600.0
MAX_CHECKPOINT_BYTES = 1 << 40
PARTIAL_NAME = "download.partial"


class _ProgressBar:
    """A tqdm bar made at the first report (when the size and the resumed offset are known)."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar = None

    def __call__(self, written: int, total: int | None) -> None:
        from tqdm import tqdm

        if self.bar is None:
            options = {"unit": "B", "unit_scale": True, "unit_divisor": 1024, "leave": False}
            self.bar = tqdm(total=total, initial=written, desc=self.description, **options)
        else:
            self.bar.update(written - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fetch_error(error: UrlFetchError, shown: str) -> FetchError:
    """The converter's FetchError for a failed download; ``transient`` when running again can succeed."""
    if isinstance(error, DownloadInterrupted) and error.total is not None:
        return FetchError(
            f"{shown}: the download ended after {error.written:,} of {error.total:,} bytes; run the same command "
            "again to resume it",
            transient=True,
        )
    if isinstance(error, DownloadInterrupted):
        return FetchError(f"{error.reason}; run the same command again to resume it", transient=True)
    if error.kind == "status":
        status = error.status or 0
        return FetchError(f"{shown}: HTTP {status}", transient=status >= 500 or status in (408, 429))
    return FetchError(error.reason, transient=error.kind in ("timeout", "network", "protocol", "busy"))


def download_url(url: str, cache_dir: Path | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` into the cache, resuming a partial download; return the complete file.

    Through :func:`core.url_download.download_file`, the one download path (LoRAs by URL take it too), under a
    lock in the URL's cache folder. A complete download is renamed from ``download.partial`` to its file name only
    once every byte arrived, so an interrupted run leaves a partial file that the next run resumes (HTTP Range).
    Proxy variables are not used (the connection goes to the address that was resolved, see core.url_fetch).
    """
    shown = display_url(url)
    parts = urlsplit(url)
    if parts.scheme != "https" and not (parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS):
        raise FetchError(f"{shown}: only https:// URLs are downloaded (plain http only from this machine's loopback)")
    _refuse_pickle_name(parts.path, shown)
    folder = (cache_dir or default_cache_dir()) / "downloads" / hashlib.sha256(url.encode()).hexdigest()[:20]
    policy = UrlPolicy(
        allow_private=True,
        timeout_s=CHECKPOINT_DEADLINE_S,
        max_bytes=MAX_CHECKPOINT_BYTES,
        max_redirects=10,
        stall_s=timeout,
    )
    bar = _ProgressBar(safe_filename(None, url))
    with download_lock(folder / ".download.lock", f"downloading {shown}"):
        # Hidden files are the lock and the resume validator; download.partial is the file being downloaded.
        complete = [
            path for path in folder.iterdir() if path.is_file() and path.name[0] != "." and path.name != PARTIAL_NAME
        ]
        if complete:
            return complete[0]
        try:
            done = download_file(
                url,
                folder / PARTIAL_NAME,
                policy,
                field=shown,
                progress=bar,
                before_body=lambda filename: _refuse_pickle_name(filename, f"{shown} ({filename})"),
            )
        except UrlFetchError as error:
            raise _fetch_error(error, shown) from None
        finally:
            bar.close()
        target = folder / done.filename
        done.path.replace(target)
        validator_path(done.path).unlink(missing_ok=True)
    return target


def normalize_sha256(pin: str) -> str:
    """The pin as 64 lower-case hex digits (:func:`core.sha256_pins.normalize_sha256`), or a FetchError."""
    try:
        return _normalize_pin(pin)
    except ValueError as error:
        raise FetchError(f"--sha256 {error}") from None


class PinMismatch(FetchError):
    """The file is not the one its sha256 pin names (``actual`` and ``pin`` say both; ``removed``: the download
    was deleted so the next run fetches it anew)."""

    def __init__(self, message: str, actual: str, pin: str, removed: bool) -> None:
        super().__init__(message)
        self.actual, self.pin, self.removed = actual, pin, removed


def check_pin(fetched: FetchedFile, pin: str) -> FetchedFile:
    """``fetched`` with its sha256 once it equals ``pin`` (normalized); a :class:`PinMismatch` otherwise."""
    actual = sha256_file(fetched.path)
    if actual == pin:
        return FetchedFile(fetched.path, fetched.name, fetched.origin, actual)
    removed = fetched.origin == "url"
    if removed:  # our own cache: drop the wrong bytes so the next run downloads afresh
        shutil.rmtree(fetched.path.parent, ignore_errors=True)
    raise PinMismatch(
        f"{fetched.name}: sha256 mismatch for file {fetched.path.name}: it is {actual}, the pin (--sha256) says "
        f"{pin}. This is not the file you pinned: another version, or a corrupt or incomplete copy."
        + (" The downloaded copy was removed; run again to download it anew." if removed else ""),
        actual,
        pin,
        removed,
    )


def fetch(source: str | os.PathLike, sha256: str | None = None, cache_dir: Path | None = None) -> FetchedFile:
    """Resolve ``source`` to a local file, downloading it if the user named a remote one; check the pin.

    The pin is checked for its form before the first byte is fetched, and against the file afterwards.
    ``cache_dir`` defaults to :func:`default_cache_dir` (callers with settings pass MODEL_BUILD_CACHE's).
    """
    text = os.fspath(source)
    pin = normalize_sha256(sha256) if sha256 else None
    if is_hub_name(text):
        hub_file = parse_hf_uri(text)
        fetched = FetchedFile(fetch_hub_file(hub_file, cache_dir / "hf" if cache_dir else None), hub_file.uri, "hf")
    elif has_url_scheme(text):
        fetched = FetchedFile(download_url(text, cache_dir), display_url(text), "url")
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise FetchError(f"{text}: no such file" if not path.exists() else f"{text} is not a file")
        fetched = FetchedFile(path, path.name, "local")
    return fetched if pin is None else check_pin(fetched, pin)
