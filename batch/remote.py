"""Remote mode: the shard's lines go to a RunPod-style endpoint (``POST <url>/runsync``) instead of a local GPU.

A large job can fan out over an endpoint's workers while this process keeps the bookkeeping:
the same ids, seeds (resolved here, so the remote worker draws no random seed), claims, sidecars
and metadata as a local run. Requests run with bounded concurrency through :class:`batch.endpoint.EndpointClient`
(retries, backoff and one deadline per line). An endpoint that refuses every request (a wrong URL or API key) stops
the run at once (exit code 2); too many items failing in a row with retriable errors stop it as retriable.

Set ``RUNPOD_API_KEY`` for RunPod's hosted API (the CLI reads it once and passes it in
:class:`batch.options.EndpointOptions`); the worker's local test server needs none.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from batch.endpoint import EndpointClient
from batch.exit_codes import EXIT_RETRIABLE, EXIT_USAGE
from batch.jobs import Job
from batch.options import EndpointOptions
from batch.session import ShardSession
from core.errors import EndpointMisconfigured, EndpointRefused, EndpointUnavailable, WorkerError
from core.results import EncodedImage, GenerationMetadata

MAX_FAILED_ITEMS_IN_A_ROW = 5


def run_remote(session: ShardSession, options: EndpointOptions) -> None:
    """Run the session's jobs on the endpoint ``options`` names."""
    client = EndpointClient(
        options.url,
        options.api_key,
        timeout_s=options.request_timeout_s,
        retries=options.retries,
        backoff_s=options.backoff_s,
        connections=options.concurrency,
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
        except EndpointMisconfigured as error:
            self.session.claims.release(job.id)
            self.session.abort(EXIT_USAGE, str(error))
            return
        except WorkerError as error:
            self.session.fail_item(job, error)
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
            raise EndpointUnavailable(f"asked for {expected} image(s), got {len(references)} with seeds {seeds}")
        if seeds[0] != job.request.seed:
            raise EndpointRefused(f"the endpoint used seed {seeds[0]} instead of {job.request.seed}")
        output_format = job.request.output_format
        return [
            EncodedImage(self.client.image_bytes(reference), output_format, seed)
            for reference, seed in zip(references, seeds, strict=True)
        ]
