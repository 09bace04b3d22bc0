"""Remote mode: the shard's lines go to a RunPod-style endpoint (``POST <url>/runsync``) instead of a local GPU.

A large job can fan out over an endpoint's workers while this process keeps the bookkeeping:
the same ids, seeds (resolved here, so the remote worker draws no random seed), claims, sidecars
and metadata as a local run. Requests run with bounded concurrency; transport failures, 429/5xx
answers and the worker's retriable errors (those whose kind, read from the message's stable prefix by
:func:`core.errors.error_kind_of`, is retriable: out of GPU memory, CUDA errors, internal errors, no
model) are retried with exponential backoff and jitter. A ``/runsync`` answer that is still
``IN_QUEUE``/``IN_PROGRESS`` (RunPod's sync wait ran out) is followed by polling ``/status/<id>``.

Set ``RUNPOD_API_KEY`` for RunPod's hosted API (the CLI reads it once and passes it in
:class:`batch.options.EndpointOptions`); the worker's local test server needs none.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from batch.exit_codes import EXIT_RETRIABLE, EXIT_USAGE
from batch.jobs import Job
from batch.options import EndpointOptions
from batch.session import ShardSession
from core.errors import InternalError, WorkerError, error_kind_of, first_line
from core.results import EncodedImage, GenerationMetadata

log = logging.getLogger(__name__)

RETRIABLE_HTTP = {408, 409, 425, 429, 500, 502, 503, 504}
FATAL_HTTP = {401, 403, 404, 405}
RUNNING_STATUSES = {"IN_QUEUE", "IN_PROGRESS"}
RETRIABLE_STATUSES = {"TIMED_OUT", "CANCELLED"}
MAX_FAILED_ITEMS_IN_A_ROW = 5


class EndpointUnavailable(WorkerError):
    """The endpoint could not be reached or gave no usable answer (transport, 429/5xx, a malformed output)."""

    code = "endpoint unavailable"
    retriable = True


class EndpointRefused(WorkerError):
    """The endpoint's worker refused the request with an error this code base does not know (another worker)."""

    code = "endpoint error"


class RemoteError(Exception):
    """One remote attempt failed with ``error`` (its kind says whether another attempt may succeed).

    ``fatal``: no request can succeed (a wrong URL or API key); ``retry_after``: the server's Retry-After.
    """

    def __init__(self, error: WorkerError, fatal: bool = False, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.fatal = fatal
        self.retry_after = retry_after

    @property
    def retriable(self) -> bool:
        return self.error.retriable


def worker_error(error: Any) -> WorkerError:
    """A worker's ``error`` output as its kind; the text is kept whole (it already starts with the kind's code)."""
    text = error if isinstance(error, str) else json.dumps(error)
    kind = error_kind_of(error)
    if kind is None:
        return EndpointRefused(text[:2000])
    if kind is InternalError and not isinstance(error, str):
        # The RunPod SDK's report of an uncaught exception: its message, not the JSON with a traceback.
        message = error.get("error_message") if isinstance(error, dict) else None
        return InternalError(first_line(message or text, 2000))
    return kind(text[:2000])


def unavailable(message: str, retry_after: float | None = None) -> RemoteError:
    return RemoteError(EndpointUnavailable(message), retry_after=retry_after)


def endpoint_base(url: str) -> str:
    """``https://api.runpod.ai/v2/ID`` or a local ``http://127.0.0.1:8000``, with or without ``/runsync``."""
    base = url.rstrip("/")
    for suffix in ("/runsync", "/run"):
        base = base.removesuffix(suffix)
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"--endpoint {url!r}: expected an http:// or https:// URL")
    return base


class EndpointClient:
    """Runs one job input on the endpoint, with retries; returns the job's ``output``."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        timeout_s: float = 600.0,
        retries: int = 5,
        backoff_s: float = 1.0,
        backoff_max_s: float = 30.0,
        poll_s: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base = endpoint_base(url)
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.poll_s = poll_s
        self.sleep = sleep
        self._status_method = "GET"  # RunPod's API; the SDK's local test server only accepts POST

    def run(self, payload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(output, info) for one job input; raises RemoteError once retries are used up or on a final answer."""
        attempt = 0
        while True:
            attempt += 1
            try:
                answer = self._call("POST", "/runsync", {"input": payload})
                output, job_id = self._settle(answer)
                return output, {"endpoint": self.base, "remote_job_id": job_id, "attempts": attempt}
            except RemoteError as error:
                if not error.retriable or attempt > self.retries:
                    if error.retriable and attempt > 1:
                        given_up = type(error.error)(f"{error.error.message} (gave up after {attempt} attempts)")
                        raise RemoteError(given_up) from None
                    raise
                delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                if error.retry_after is not None:
                    delay = max(delay, min(error.retry_after, self.backoff_max_s))
                log.info("attempt %d failed (%s); retrying in %.1f s", attempt, error, delay)
                self.sleep(delay)

    def _settle(self, answer: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        job_id = answer.get("id")
        deadline = time.monotonic() + self.timeout_s
        while True:
            status = answer.get("status")
            if status == "COMPLETED":
                output = answer.get("output")
                if not isinstance(output, dict) or not output.get("images"):
                    raise unavailable(f"job {job_id} COMPLETED without images: {str(output)[:200]}")
                return output, job_id
            if status == "FAILED" or answer.get("error"):
                raise RemoteError(worker_error(answer.get("error", "FAILED without an error message")))
            if status in RETRIABLE_STATUSES:
                raise unavailable(f"job {job_id} ended {status}")
            if status not in RUNNING_STATUSES or not job_id:
                raise unavailable(f"unexpected answer from {self.base}: {str(answer)[:300]}")
            if time.monotonic() > deadline:
                raise unavailable(f"job {job_id} still {status} after {self.timeout_s:.0f} s")
            self.sleep(self.poll_s)
            answer = self._status(job_id)

    def _status(self, job_id: str) -> dict[str, Any]:
        try:
            return self._call(self._status_method, f"/status/{job_id}", None)
        except RemoteError as error:
            if self._status_method == "GET" and "HTTP 405" in str(error):
                self._status_method = "POST"
                return self._call("POST", f"/status/{job_id}", None)
            raise

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        data = json.dumps(body).encode("utf-8") if body is not None else b"" if method == "POST" else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read()[:300].decode("utf-8", "replace")
            message = f"HTTP {error.code} from {self.base}{path}: {detail}"
            retry_after = error.headers.get("Retry-After") if error.headers else None
            after = float(retry_after) if retry_after and retry_after.isdigit() else None
            if error.code in FATAL_HTTP and not (error.code == 405 and path.startswith("/status/")):
                refused = EndpointRefused(message + " (check --endpoint and RUNPOD_API_KEY)")
                raise RemoteError(refused, fatal=True) from None
            if error.code in RETRIABLE_HTTP or error.code >= 500:
                raise unavailable(message, retry_after=after) from None
            raise RemoteError(EndpointRefused(message)) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            reason = getattr(error, "reason", error)
            raise unavailable(f"{self.base}{path} unreachable: {reason}") from None
        try:
            answer = json.loads(raw)
        except ValueError:
            raise unavailable(f"{self.base}{path} answered non-JSON: {raw[:200]!r}") from None
        if not isinstance(answer, dict):
            raise unavailable(f"{self.base}{path} answered {type(answer).__name__}, not an object")
        return answer


def decode_image(reference: str, timeout_s: float) -> bytes:
    """The bytes of an output image: a base64 data URI (the default), or a URL (``return_type: s3``)."""
    if reference.startswith("data:"):
        try:
            return base64.b64decode(reference.split(",", 1)[1], validate=True)
        except (IndexError, binascii.Error) as error:
            raise unavailable(f"malformed data URI in the output: {error}") from None
    if reference.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(reference, timeout=timeout_s) as response:
                return response.read()
        except (urllib.error.URLError, OSError) as error:
            raise unavailable(f"could not download {reference[:100]}: {error}") from None
    raise unavailable(f"output image is neither a data URI nor a URL: {reference[:60]!r}")


def run_remote(session: ShardSession, options: EndpointOptions) -> None:
    """Run the session's jobs on the endpoint ``options`` names."""
    client = EndpointClient(
        options.url,
        options.api_key,
        timeout_s=options.request_timeout_s,
        retries=options.retries,
        backoff_s=options.backoff_s,
    )
    RemoteRunner(session, client, options.concurrency).run()


class RemoteRunner:
    """Runs a session's jobs on an endpoint, ``concurrency`` requests at a time."""

    def __init__(self, session: ShardSession, client: EndpointClient, concurrency: int = 4) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.session = session
        self.client = client
        self.concurrency = concurrency
        self._failures_in_a_row = 0
        self._lock = threading.Lock()

    def run(self) -> None:
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="remote") as pool:
            in_flight: set[Future] = set()
            for job in self.session.first_pass():
                # Claim no further ahead than the pool can work: a second runner takes the rest.
                while len(in_flight) >= self.concurrency:
                    done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                    self._check(done)
                in_flight.add(pool.submit(self._one, job))
            self._check(wait(in_flight).done)
            for jobs in self.session.deferred_rounds():
                self._check(wait([pool.submit(self._one, job) for job in jobs]).done)

    def _check(self, done: set[Future]) -> None:
        for future in done:
            future.result()  # a bug in the bookkeeping surfaces here, not silently

    def _one(self, job: Job) -> None:
        if self.session.stopping.is_set():
            self.session.claims.release(job.id)
            return
        started = time.perf_counter()
        try:
            output, info = self.client.run(job.payload)
            images = self._images(job, output)
        except RemoteError as error:
            if error.fatal:
                self.session.claims.release(job.id)
                self.session.abort(EXIT_USAGE, f"the endpoint refuses requests: {error}")
                return
            self.session.fail_item(job, error.error)
            with self._lock:
                self._failures_in_a_row = self._failures_in_a_row + 1 if error.retriable else 0
                if self._failures_in_a_row >= MAX_FAILED_ITEMS_IN_A_ROW:
                    reason = f"{self._failures_in_a_row} items in a row failed; the endpoint looks down"
                    self.session.abort(EXIT_RETRIABLE, reason)
            return
        with self._lock:
            self._failures_in_a_row = 0
        metadata = GenerationMetadata.from_output_dict(output.get("metadata") or {})
        info["request_s"] = round(time.perf_counter() - started, 4)
        self.session.finish_item(job, images, metadata, info)

    def _images(self, job: Job, output: dict[str, Any]) -> list[EncodedImage]:
        references = output["images"]
        seeds = (output.get("metadata") or {}).get("seeds") or []
        expected = job.request.num_images
        if len(references) != expected or len(seeds) != expected:
            raise unavailable(f"asked for {expected} image(s), got {len(references)} with seeds {seeds}")
        if seeds[0] != job.request.seed:
            raise RemoteError(EndpointRefused(f"the endpoint used seed {seeds[0]} instead of {job.request.seed}"))
        output_format = job.request.output_format
        return [
            EncodedImage(decode_image(reference, self.client.timeout_s), output_format, seed)
            for reference, seed in zip(references, seeds, strict=True)
        ]
