"""The endpoint client: one job input to a RunPod-style endpoint (``POST <url>/runsync``), its output back.

Retries are urllib3's :class:`~urllib3.util.Retry`: transport failures and 408/409/425/429/5xx answers are retried
inside the connection pool, with exponential backoff and jitter, honouring a ``Retry-After`` (capped at the backoff
maximum). The worker's retriable errors (those whose kind, read from the message's stable prefix by
:func:`core.errors.error_kind_of`, is retriable: out of GPU memory, CUDA errors, internal errors, no model) and
answers without a usable output spend the same budget and wait the same backoff. One deadline per job input
(``--request-timeout``) bounds everything: each attempt's timeouts are the time left, no wait outlasts it, and no
attempt starts after it. A ``/runsync`` answer that is still ``IN_QUEUE``/``IN_PROGRESS`` (RunPod's sync wait ran
out) is followed by polling ``/status/<id>``.

Every failure is a :mod:`core.errors` kind: :class:`~core.errors.EndpointUnavailable` (retriable), the worker's own
kind, :class:`~core.errors.EndpointRefused` for an error this code base does not know, and
:class:`~core.errors.EndpointMisconfigured` (a configuration error) when no request can succeed (401/403/404: a
wrong URL or API key).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import math
import time
from typing import Any

import urllib3
from urllib3.exceptions import HTTPError, MaxRetryError
from urllib3.util import Retry, Timeout

from core.errors import (
    EndpointMisconfigured,
    EndpointRefused,
    EndpointUnavailable,
    InternalError,
    WorkerError,
    error_kind_of,
    first_line,
)

log = logging.getLogger(__name__)

RETRIABLE_HTTP = frozenset({408, 409, 425, 429, *range(500, 600)})
FATAL_HTTP = frozenset({401, 403, 404, 405})
RUNNING_STATUSES = frozenset({"IN_QUEUE", "IN_PROGRESS"})
RETRIABLE_STATUSES = frozenset({"TIMED_OUT", "CANCELLED"})
LONGEST_TEXT = 2000  # of a worker's error kept in the error file


def worker_error(error: Any) -> WorkerError:
    """A worker's ``error`` output as its kind; the text is kept whole (it already starts with the kind's code)."""
    text = error if isinstance(error, str) else json.dumps(error)
    kind = error_kind_of(error)
    if kind is None:
        return EndpointRefused(text[:LONGEST_TEXT])
    if kind is InternalError and not isinstance(error, str):
        # The RunPod SDK's report of an uncaught exception: its message, not the JSON with a traceback.
        message = error.get("error_message") if isinstance(error, dict) else None
        return InternalError(first_line(message or text, LONGEST_TEXT))
    return kind(text[:LONGEST_TEXT])


def endpoint_base(url: str) -> str:
    """``https://api.runpod.ai/v2/ID`` or a local ``http://127.0.0.1:8000``, with or without ``/runsync``."""
    base = url.rstrip("/")
    for suffix in ("/runsync", "/run"):
        base = base.removesuffix(suffix)
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"--endpoint {url!r}: expected an http:// or https:// URL")
    return base


class _DeadlineRetry(Retry):
    """urllib3's Retry, also spent when its trip's deadline passes; its waits never outlast the deadline."""

    def __init__(self, *args: Any, trip: _Trip | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trip = trip

    def new(self, **kw: Any) -> _DeadlineRetry:
        trip = kw.pop("trip", self.trip)
        retry = super().new(**kw)
        retry.trip = trip
        return retry

    def increment(self, *args: Any, **kwargs: Any) -> _DeadlineRetry:
        if self.trip is None:
            return super().increment(*args, **kwargs)
        self.trip.failures += 1
        try:
            return super().increment(*args, **kwargs)
        except MaxRetryError:
            self.trip.spent = True
            raise

    def _left(self) -> float:
        return math.inf if self.trip is None else max(0.0, self.trip.left())

    def is_exhausted(self) -> bool:
        return super().is_exhausted() or self._left() <= 0

    def get_backoff_time(self) -> float:
        return min(super().get_backoff_time(), self._left())

    def parse_retry_after(self, retry_after: str) -> float:
        # Capped at the backoff maximum: a server's "Retry-After: 3600" must not park a line for an hour.
        return min(super().parse_retry_after(retry_after), self.backoff_max, self._left())


class _Trip:
    """One job input's way to the endpoint: its deadline, its retry budget as urllib3 left it, how many attempts
    failed (urllib3's and ours) and whether the budget is spent."""

    def __init__(self, seconds: float, policy: _DeadlineRetry) -> None:
        self.deadline = time.monotonic() + seconds
        self.failures = 0
        self.spent = False
        self.retry = policy.new(trip=self)

    def left(self) -> float:
        return self.deadline - time.monotonic()


class _DeadlineTimeout(Timeout):
    """Each attempt's timeout is the time left (urllib3 clones the timeout once per attempt)."""

    def __init__(self, trip: _Trip) -> None:
        super().__init__()
        self.trip = trip

    def clone(self) -> Timeout:
        return Timeout(total=max(self.trip.left(), 0.01))


def _transport_reason(error: BaseException) -> str:
    """The cause of a transport failure in a few words (``[Errno 111] Connection refused``, ``Read timed out``)."""
    if isinstance(error, MaxRetryError) and error.reason is not None:
        error = error.reason
    cause = error.__cause__ if isinstance(error.__cause__, OSError) else None
    if cause is not None:
        return str(cause)
    return str(error).rpartition("): ")[2] or type(error).__name__


class EndpointClient:
    """Runs one job input on the endpoint, with retries; returns the job's ``output``. Safe to share between threads."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        timeout_s: float = 600.0,
        retries: int = 5,
        backoff_s: float = 1.0,
        backoff_max_s: float = 30.0,
        poll_s: float = 2.0,
        connections: int = 4,
    ) -> None:
        self.base = endpoint_base(url)
        self.timeout_s = timeout_s
        self.retries = retries
        self.poll_s = poll_s
        self.retry = _DeadlineRetry(
            total=retries,
            redirect=False,
            allowed_methods=None,  # POST too: RunPod's /runsync is how a job is asked for
            status_forcelist=RETRIABLE_HTTP,
            backoff_factor=backoff_s,
            backoff_max=backoff_max_s,
            backoff_jitter=backoff_s,
            raise_on_status=False,  # the last answer, so its status and body make the message
        )
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.http = urllib3.PoolManager(num_pools=4, maxsize=max(1, connections), headers=headers)
        self._status_method = "GET"  # RunPod's API; the SDK's local test server only accepts POST

    def run(self, payload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(output, info) for one job input; raises a WorkerError once the retries or the deadline are used up, or
        on a final answer."""
        trip = _Trip(self.timeout_s, self.retry)
        while True:
            try:
                answer = self._call("POST", "/runsync", {"input": payload}, trip)
                output, job_id = self._settle(answer, trip)
                return output, {"endpoint": self.base, "remote_job_id": job_id, "attempts": trip.failures + 1}
            except WorkerError as error:
                if not error.retriable:
                    raise
                if not trip.spent:  # urllib3 may have spent the budget on this very call
                    with contextlib.suppress(MaxRetryError):
                        trip.retry = trip.retry.increment("POST", self.base + "/runsync", error=error)
                if trip.spent:
                    raise self._given_up(error, trip) from None
                log.info("attempt %d failed (%s); retrying", trip.failures, error)
                trip.retry.sleep()

    def _given_up(self, error: WorkerError, trip: _Trip) -> WorkerError:
        if trip.failures <= 1:
            return error
        spent = f"the {self.timeout_s:g} s of --request-timeout" if trip.left() <= 0 else f"{trip.failures} attempts"
        return type(error)(f"{error.message} (gave up after {spent})")

    def _settle(self, answer: dict[str, Any], trip: _Trip) -> tuple[dict[str, Any], str | None]:
        job_id = answer.get("id")
        while True:
            status = answer.get("status")
            if status == "COMPLETED":
                output = answer.get("output")
                if not isinstance(output, dict) or not output.get("images"):
                    raise EndpointUnavailable(f"job {job_id} COMPLETED without images: {str(output)[:200]}")
                return output, job_id
            if status == "FAILED" or answer.get("error"):
                raise worker_error(answer.get("error", "FAILED without an error message"))
            if status in RETRIABLE_STATUSES:
                raise EndpointUnavailable(f"job {job_id} ended {status}")
            if status not in RUNNING_STATUSES or not job_id:
                raise EndpointUnavailable(f"unexpected answer from {self.base}: {str(answer)[:300]}")
            if trip.left() < self.poll_s:
                raise EndpointUnavailable(f"job {job_id} still {status} after {self.timeout_s:g} s (--request-timeout)")
            time.sleep(self.poll_s)
            answer = self._status(job_id, trip)

    def _status(self, job_id: str, trip: _Trip) -> dict[str, Any]:
        try:
            return self._call(self._status_method, f"/status/{job_id}", None, trip)
        except EndpointRefused as error:
            if self._status_method == "GET" and "HTTP 405" in str(error):
                self._status_method = "POST"
                return self._call("POST", f"/status/{job_id}", None, trip)
            raise

    def _call(self, method: str, path: str, body: dict[str, Any] | None, trip: _Trip) -> dict[str, Any]:
        """One request, retried by urllib3 as the trip's budget allows; the budget it leaves is kept in the trip."""
        data = json.dumps(body).encode("utf-8") if body is not None else b"" if method == "POST" else None
        try:
            response = self.http.request(
                method, self.base + path, body=data, retries=trip.retry, timeout=_DeadlineTimeout(trip), redirect=False
            )
        except HTTPError as error:  # MaxRetryError: on every attempt, or until the deadline
            raise EndpointUnavailable(f"{self.base}{path} unreachable: {_transport_reason(error)}") from None
        if isinstance(response.retries, _DeadlineRetry):
            trip.retry = response.retries
        if not 200 <= response.status < 300:
            detail = response.data[:300].decode("utf-8", "replace")
            message = f"HTTP {response.status} from {self.base}{path}: {detail}"
            if response.status in FATAL_HTTP and not (response.status == 405 and path.startswith("/status/")):
                raise EndpointMisconfigured(
                    f"the endpoint refuses requests: {message} (check --endpoint and RUNPOD_API_KEY)"
                )
            if response.status in RETRIABLE_HTTP:  # urllib3 retried it until the budget was spent
                trip.spent = True
                raise EndpointUnavailable(message)
            raise EndpointRefused(message)
        try:
            answer = json.loads(response.data)
        except ValueError:
            raise EndpointUnavailable(f"{self.base}{path} answered non-JSON: {response.data[:200]!r}") from None
        if not isinstance(answer, dict):
            raise EndpointUnavailable(f"{self.base}{path} answered {type(answer).__name__}, not an object")
        return answer

    def image_bytes(self, reference: str) -> bytes:
        """The bytes of an output image: a base64 data URI (the default), or a URL (``return_type: s3``)."""
        if reference.startswith("data:"):
            try:
                return base64.b64decode(reference.split(",", 1)[1], validate=True)
            except (IndexError, binascii.Error) as error:
                raise EndpointUnavailable(f"malformed data URI in the output: {error}") from None
        if not reference.startswith(("http://", "https://")):
            raise EndpointUnavailable(f"output image is neither a data URI nor a URL: {reference[:60]!r}")
        trip = _Trip(self.timeout_s, self.retry.new(redirect=3, raise_on_redirect=True))
        try:
            # headers={}: the endpoint's API key is not sent to the bucket
            response = self.http.request(
                "GET", reference, headers={}, retries=trip.retry, timeout=_DeadlineTimeout(trip)
            )
        except HTTPError as error:
            raise EndpointUnavailable(f"could not download {reference[:100]}: {_transport_reason(error)}") from None
        if response.status != 200:
            raise EndpointUnavailable(f"could not download {reference[:100]}: HTTP {response.status}")
        return response.data
