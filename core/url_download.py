"""Download a URL into a file: resumable, locked, bounded, hashed; the one download path for files.

The checkpoint (:mod:`model_build.source`, ``CHECKPOINT=https://...``) and adapters by URL
(:mod:`worker.adapters.downloads`: LoRAs, later embeddings) download through :func:`download_file`, over
:func:`core.url_fetch.stream_url`, so every file download has the same address rules, deadline, byte bound and
redirect limit as a job's ``image_url``:

- **Resume.** The body goes into a partial file. An interrupted download (a timeout, a cut connection, a killed
  worker) leaves it, and the next attempt asks for the rest (HTTP ``Range``), with ``If-Range`` naming the
  validator (``ETag``, else ``Last-Modified``) of the answer that began it, so a file changed on the server
  starts over instead of being spliced. A server that ignores ``Range`` or answers 416 sends the whole file again.
- **Lock.** :func:`download_lock` is a file lock beside the partial file: workers sharing a volume download a
  file once, the others wait (and log that they wait).
- **Hash.** The sha256 is computed while writing (the kept part is read once on resume).
- **Content-addressed cache.** :func:`cached_download` keeps complete files as ``<cache>/sha256/<hex><suffix>``:
  a file pinned by its sha256 and already there is used without any network request, whatever URL named it; a
  hash mismatch deletes the download and says both hashes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

from core.url_fetch import UrlFetchError, UrlPolicy, UrlResponse, shown_url, stream_url

log = logging.getLogger(__name__)

Progress = Callable[[int, int | None], None]  # (bytes in the file so far, the file's size when known)
READ_BYTES = 8 << 20


@dataclass(frozen=True)
class Downloaded:
    path: Path  # the partial file, now holding the whole body
    size: int
    sha256: str
    filename: str  # the server's name for it (Content-Disposition, else the URL's last path part), safe to use


class DownloadInterrupted(UrlFetchError):
    """The body stopped before its end (kind of the cause: ``timeout``, ``network``, ``protocol``); the part on
    disk (``written`` bytes of ``total``) is kept for the next attempt to resume."""

    def __init__(self, error: UrlFetchError, written: int, total: int | None) -> None:
        of = f" of {total:,}" if total is not None else ""
        kept = f"{written:,}{of} bytes are kept and the next attempt resumes from there" if written else "nothing kept"
        super().__init__(error.field, error.kind, f"{error.reason}; {kept}", error.status)
        self.written, self.total = written, total


class HashMismatch(UrlFetchError):
    """The downloaded file is not the one its sha256 pin names; the download was deleted."""

    def __init__(self, field: str, shown: str, expected: str, actual: str) -> None:
        super().__init__(
            field,
            "sha256",
            f"the file at {shown} has sha256 {actual}, not {expected}: another file than the one pinned (a new "
            "version?) or a corrupt copy. The download was deleted; fix the URL or the sha256",
        )
        self.expected, self.actual = expected, actual


def validator_path(partial: Path) -> Path:
    """Where the validator of the answer that began ``partial`` is kept (hidden: never taken for a download)."""
    return partial.with_name(f".{partial.name}.validator")


def safe_filename(disposition: str | None, url: str) -> str:
    """The file name from a ``Content-Disposition`` header, else from the URL's path; no folder, no leading dot."""
    parsed = Message()
    parsed["content-disposition"] = disposition or ""
    name = parsed.get_filename() or unquote(urlsplit(url).path.rsplit("/", 1)[-1]) or "download"
    name = Path(name.replace("\\", "/")).name
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".") or "download"


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    """``bytes 100-199/200`` -> (100, 200); None if absent or unparsable."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (value or "").strip())
    if not match:
        return None
    return int(match[1]), None if match[2] == "*" else int(match[2])


def _hash_of(path: Path) -> Any:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(READ_BYTES):
            digest.update(block)
    return digest


def _discard(partial: Path) -> None:
    partial.unlink(missing_ok=True)
    validator_path(partial).unlink(missing_ok=True)


class _Writer:
    """The consumer of one answer: appends to the partial file (206 at the asked offset) or rewrites it."""

    def __init__(
        self,
        url: str,
        partial: Path,
        offset: int,
        policy: UrlPolicy,
        progress: Progress | None,
        before_body: Callable[[str], None] | None,
    ) -> None:
        self.url, self.partial, self.offset, self.policy = url, partial, offset, policy
        self.progress, self.before_body = progress, before_body
        self.written, self.total = offset, None

    def __call__(self, response: UrlResponse) -> Downloaded:
        filename = safe_filename(response.header("Content-Disposition"), self.url)
        if self.before_body is not None:
            self.before_body(filename)
        resumed = _content_range(response.header("Content-Range"))
        if self.offset and response.status == 206 and resumed and resumed[0] == self.offset:
            mode, self.total, digest = "ab", resumed[1], _hash_of(self.partial)
        else:  # nothing to resume, or the server sent the whole file (no Range support, a changed file)
            mode, self.total, digest, self.written = "wb", response.length, hashlib.sha256(), 0
            validator = response.header("ETag") or ""
            if not validator or validator.startswith("W/"):  # a weak ETag may not be used with If-Range
                validator = response.header("Last-Modified") or ""
            validator_path(self.partial).write_text(validator)
        if self.total is not None and self.total > self.policy.max_bytes:
            _discard(self.partial)
            raise response.too_large(self.total)
        try:
            with open(self.partial, mode) as handle:
                try:
                    self._copy(response, handle, digest)
                finally:
                    handle.flush()
                    os.fsync(handle.fileno())
        except UrlFetchError as error:
            if error.kind == "too_large":
                _discard(self.partial)  # a part of a file that may not be downloaded is of no use
                raise
            raise DownloadInterrupted(error, self.written, self.total) from None
        if self.total is not None and self.written != self.total:
            cut = UrlFetchError(response.field, "protocol", f"{shown_url(self.url)}: the connection closed early")
            raise DownloadInterrupted(cut, self.written, self.total)
        return Downloaded(self.partial, self.written, digest.hexdigest(), filename)

    def _copy(self, response: UrlResponse, handle: BinaryIO, digest: Any) -> None:
        if self.progress is not None:
            self.progress(self.written, self.total)
        for chunk in response.chunks():
            if self.written + len(chunk) > self.policy.max_bytes:
                raise response.too_large(self.total)
            handle.write(chunk)
            digest.update(chunk)
            self.written += len(chunk)
            if self.progress is not None:
                self.progress(self.written, self.total)


def download_file(
    url: str,
    partial: Path,
    policy: UrlPolicy,
    *,
    field: str,
    progress: Progress | None = None,
    before_body: Callable[[str], None] | None = None,
) -> Downloaded:
    """Fill ``partial`` with the body of ``url``, resuming what it holds; the caller holds :func:`download_lock`.

    ``policy`` bounds the whole file (``max_bytes``) and this attempt (``timeout_s``); ``before_body`` sees the
    file name before the first byte is written (and may refuse it). Failures are :class:`UrlFetchError` naming
    ``field``: :class:`DownloadInterrupted` keeps the part for the next attempt; ``too_large`` deletes it.
    """
    partial.parent.mkdir(parents=True, exist_ok=True)
    offset = partial.stat().st_size if partial.is_file() else 0
    headers: dict[str, str] = {}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        validator = validator_path(partial).read_text() if validator_path(partial).is_file() else ""
        if validator:
            headers["If-Range"] = validator
    writer = _Writer(url, partial, offset, policy, progress, before_body)
    try:
        return stream_url(url, policy, field=field, consume=writer, headers=headers)
    except UrlFetchError as error:
        if error.status == 416 and offset:  # the part is not a prefix the server knows: start over, once
            _discard(partial)
            return download_file(url, partial, policy, field=field, progress=progress, before_body=before_body)
        raise


@contextmanager
def download_lock(
    path: Path, doing: str, *, wait_s: float | None = None, log_every_s: float = 30.0, logger: logging.Logger = log
) -> Iterator[None]:
    """Hold the file lock ``path`` (one process downloads, the others wait, logging "another worker is
    ``doing``" every ``log_every_s``); TimeoutError after ``wait_s`` seconds (None: wait as long as it takes)."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    started = time.perf_counter()
    while True:
        waited = time.perf_counter() - started
        step = log_every_s if wait_s is None else max(0.0, min(log_every_s, wait_s - waited))
        try:
            lock.acquire(timeout=step)
            break
        except Timeout:
            waited = time.perf_counter() - started
            if wait_s is not None and waited >= wait_s:
                raise TimeoutError(f"another worker is {doing} ({waited:.0f} s so far, lock {path})") from None
            logger.info("another worker is %s; waiting (%.0f s so far, lock %s)", doing, waited, path)
    try:
        yield
    finally:
        lock.release()


@dataclass(frozen=True)
class CachedFile:
    path: Path  # <cache>/sha256/<hex><suffix>
    sha256: str
    downloaded: bool  # False: it was in the cache, no request was made


def _known_hash(index: Path) -> str | None:
    text = index.read_text().strip() if index.is_file() else ""
    return text if re.fullmatch(r"[0-9a-f]{64}", text) else None


def cached_download(
    url: str,
    cache_dir: Path,
    policy: UrlPolicy,
    *,
    field: str,
    sha256: str | None = None,
    sha256_field: str = "sha256",
    suffix: str = "",
) -> CachedFile:
    """The file at ``url`` in the content-addressed cache under ``cache_dir``, downloaded when it is not there.

    With ``sha256`` (64 lower-case hex) the file is looked up by it before any request, and a download that
    hashes otherwise is deleted (:class:`HashMismatch`, naming ``sha256_field``). Without, the URL is remembered
    (``urls/``, by its hash, so no token is written down): the same URL is downloaded once per cache.
    """
    key = hashlib.sha256(url.encode()).hexdigest()[:32]
    index = cache_dir / "urls" / key

    def cached() -> CachedFile | None:
        known = sha256 or _known_hash(index)
        path = cache_dir / "sha256" / f"{known}{suffix}"
        return CachedFile(path, known, False) if known and path.is_file() else None

    if (found := cached()) is not None:
        return found
    partial = cache_dir / "partial" / f"{key}.partial"
    shown = shown_url(url)
    try:
        lock = download_lock(partial.with_suffix(".lock"), f"downloading {shown}", wait_s=policy.timeout_s)
        with lock:
            if (found := cached()) is not None:  # another worker finished it while this one waited
                return found
            done = download_file(url, partial, policy, field=field)
            if sha256 is not None and done.sha256 != sha256:
                _discard(partial)
                raise HashMismatch(sha256_field, shown, sha256, done.sha256)
            target = cache_dir / "sha256" / f"{done.sha256}{suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            partial.replace(target)  # the same bytes under the same name if another URL brought them first
            validator_path(partial).unlink(missing_ok=True)
            if sha256 is None:
                index.parent.mkdir(parents=True, exist_ok=True)
                temporary = index.with_name(f".{key}.tmp")
                temporary.write_text(done.sha256)
                temporary.replace(index)
            return CachedFile(target, done.sha256, True)
    except TimeoutError as error:
        raise UrlFetchError(field, "busy", f"{error}; send the job again in a moment") from None
