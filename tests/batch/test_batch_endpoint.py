"""The endpoint client against a scripted HTTP server on loopback: what is retried, what stops at once, what the
error says, and that one deadline bounds a line's every attempt."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from batch.endpoint import EndpointClient
from core.errors import EndpointMisconfigured, EndpointRefused, EndpointUnavailable, InvalidRequest, OutOfMemory

DONE = {"id": "job-1", "status": "COMPLETED", "output": {"images": ["data:image/png;base64,AAAA"], "metadata": {}}}


class Script:
    """Answers in order (the last one repeats): (status, body, headers) or a number of seconds to stay silent."""

    def __init__(self, *answers: tuple[int, object, dict[str, str]] | float) -> None:
        self.answers = list(answers)
        self.requests: list[str] = []
        self.lock = threading.Lock()

    def next(self, path: str) -> tuple[int, object, dict[str, str]] | float:
        with self.lock:
            self.requests.append(path)
            return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


@pytest.fixture
def endpoint() -> Iterator[tuple[str, list[Script]]]:
    scripts: list[Script] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            answer = scripts[-1].next(self.path)
            if isinstance(answer, float):
                time.sleep(answer)
                return
            status, body, headers = answer
            data = json.dumps(body).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", scripts
    server.shutdown()
    server.server_close()


def client(url: str, **options: float) -> EndpointClient:
    return EndpointClient(url, "key", **{"retries": 3, "backoff_s": 0.01, "backoff_max_s": 0.05, **options})


def test_busy_answers_are_retried_until_one_completes(endpoint: tuple[str, list[Script]]) -> None:
    url, scripts = endpoint
    scripts.append(Script((503, "busy", {}), (429, "slow down", {"Retry-After": "3600"}), (200, DONE, {})))
    output, info = client(url).run({"prompt": "x"})
    assert output == DONE["output"] and info["attempts"] == 3 and info["remote_job_id"] == "job-1"
    assert scripts[0].requests == ["/runsync"] * 3  # the hour-long Retry-After was capped at the backoff maximum


def test_a_busy_endpoint_is_given_up_on_after_the_retries(endpoint: tuple[str, list[Script]]) -> None:
    url, scripts = endpoint
    scripts.append(Script((503, "busy", {})))
    with pytest.raises(EndpointUnavailable, match=r"HTTP 503 from .*/runsync.*\(gave up after 4 attempts\)") as caught:
        client(url).run({"prompt": "x"})
    assert caught.value.retriable and len(scripts[0].requests) == 4


def test_a_wrong_url_or_key_stops_at_the_first_answer(endpoint: tuple[str, list[Script]]) -> None:
    url, scripts = endpoint
    scripts.append(Script((401, "no such key", {})))
    with pytest.raises(EndpointMisconfigured, match=r"HTTP 401 .*check --endpoint and RUNPOD_API_KEY") as caught:
        client(url).run({"prompt": "x"})
    assert str(caught.value).startswith("configuration: ") and len(scripts[0].requests) == 1


def test_the_workers_errors_are_retried_by_their_kind(endpoint: tuple[str, list[Script]]) -> None:
    url, scripts = endpoint
    oom = {"id": "j", "status": "FAILED", "error": "out of GPU memory: try a smaller size"}
    refused = {"id": "j", "status": "FAILED", "error": "invalid input: clip_skip 5 is too deep"}
    scripts.append(Script((200, oom, {}), (200, refused, {})))
    with pytest.raises(InvalidRequest, match="clip_skip") as caught:
        client(url).run({"prompt": "x"})
    assert not caught.value.retriable and len(scripts[0].requests) == 2
    scripts.append(Script((200, oom, {})))
    with pytest.raises(OutOfMemory, match=r"\(gave up after 4 attempts\)"):
        client(url).run({"prompt": "x"})
    scripts.append(Script((200, {"status": "FAILED", "error": "another worker's words"}, {})))
    with pytest.raises(EndpointRefused, match="another worker's words"):
        client(url).run({"prompt": "x"})
    assert len(scripts[-1].requests) == 1


def test_a_queued_job_is_polled_and_a_status_405_switches_to_post(endpoint: tuple[str, list[Script]]) -> None:
    url, scripts = endpoint
    queued = {"id": "job-1", "status": "IN_QUEUE"}
    scripts.append(Script((200, queued, {}), (405, "method not allowed", {}), (200, DONE, {})))
    output, _ = client(url, poll_s=0.01).run({"prompt": "x"})
    assert output == DONE["output"] and scripts[0].requests == ["/runsync", "/status/job-1", "/status/job-1"]


def test_one_deadline_bounds_every_attempt_of_a_line(endpoint: tuple[str, list[Script]]) -> None:
    """A server that never answers: the line ends at its --request-timeout, not after retries x timeout."""
    url, scripts = endpoint
    scripts.append(Script(5.0))
    with pytest.raises(EndpointUnavailable, match=r"unreachable: .*timed out") as caught:
        client(url, timeout_s=0.5, retries=10).run({"prompt": "x"})
    assert caught.value.retriable and len(scripts[0].requests) == 1
