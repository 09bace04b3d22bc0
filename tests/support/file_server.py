"""A real HTTP file server on a loopback address, in a thread, for the download tests (LoRAs by URL).

It serves ``files`` (path -> bytes) with ``Range`` (206) and ``If-Range`` against its ``ETag``, as CDNs do, and can
misbehave on purpose: cut the first answer after some bytes, ignore ``Range``, drip the body, send no length, or
redirect. Every GET is recorded with its ``Range`` and ``If-Range`` headers.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Served:
    data: bytes
    cut_first_at: int | None = None  # the first answer stops after this many body bytes
    honour_range: bool = True
    drip_s: float = 0.0  # pause between 4 KiB pieces of the body
    send_length: bool = True  # False: no Content-Length, the body ends when the connection closes
    redirect: str | None = None  # answer 302 with this Location instead
    delay_s: float = 0.0  # pause before answering

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.data).hexdigest()[:16] + '"'


@dataclass
class Request:
    path: str
    range: str | None
    if_range: str | None


@dataclass
class FileServer:
    host: str = "127.0.0.1"
    files: dict[str, Served] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.handle(self)

        self.httpd = ThreadingHTTPServer((self.host, 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    def gets(self, path: str) -> list[Request]:
        return [request for request in self.requests if request.path.split("?")[0] == path]

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        asked, if_range = handler.headers.get("Range"), handler.headers.get("If-Range")
        self.requests.append(Request(handler.path, asked, if_range))
        served = self.files.get(handler.path.split("?")[0])
        if served is None:
            handler.send_error(404, "Not Found")
            return
        time.sleep(served.delay_s)
        if served.redirect is not None:
            handler.send_response(302)
            handler.send_header("Location", served.redirect)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        data = served.data
        start = 0
        if asked and served.honour_range and (if_range is None or if_range == served.etag):
            start = int(asked.removeprefix("bytes=").split("-")[0])
        if start >= len(data) and start:
            handler.send_response(416)
            handler.send_header("Content-Range", f"bytes */{len(data)}")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        handler.send_response(206 if start else 200)
        handler.send_header("ETag", served.etag)
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if served.send_length:
            handler.send_header("Content-Length", str(len(data) - start))
        handler.end_headers()
        body = data[start:]
        if served.cut_first_at is not None:
            body, served.cut_first_at = body[: served.cut_first_at], None
        try:
            for offset in range(0, len(body), 4096):
                handler.wfile.write(body[offset : offset + 4096])
                if served.drip_s:
                    handler.wfile.flush()
                    time.sleep(served.drip_s)
        except OSError:
            pass  # the client gave up (a deadline, a size bound): what the test wanted
        handler.close_connection = True

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
