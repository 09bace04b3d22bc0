"""The socket side of one fetch: every read and write waits at most until one deadline, TLS verified.

``http.client`` parses the answer, reading through :class:`DeadlineReader`, whose every ``recv`` gets the time left
as its timeout; a server dripping one byte at a time is therefore cut at the deadline, not after its whole answer.
"""

from __future__ import annotations

import io
import socket
import ssl
import threading
import time


class TimedOut(Exception):
    """The deadline passed (raised by :meth:`Deadline.left`; socket timeouts mean the same)."""


class Deadline:
    """``seconds`` from now; with ``stall_s``, each wait (:meth:`left`) is also at most that long."""

    def __init__(self, seconds: float, stall_s: float | None = None) -> None:
        self.seconds = seconds
        self.stall_s = stall_s
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        remaining = self.at - time.monotonic()
        if remaining <= 0:
            raise TimedOut
        return remaining if self.stall_s is None else min(remaining, self.stall_s)

    def passed(self) -> bool:
        return time.monotonic() >= self.at


class DeadlineReader(io.RawIOBase):
    """A socket as a raw stream whose every ``recv`` waits at most until the deadline: ``http.client`` reads the
    status line, headers and body through it (buffered), so none of them can outlast the deadline."""

    def __init__(self, sock: socket.socket, deadline: Deadline) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        self._sock.settimeout(self._deadline.left())
        return self._sock.recv_into(buffer)


class ResponseSocket:
    """What :class:`http.client.HTTPResponse` needs of a socket: ``makefile``."""

    def __init__(self, reader: DeadlineReader) -> None:
        self._reader = reader

    def makefile(self, mode: str, *args: object, **kwargs: object) -> io.BufferedReader:
        return io.BufferedReader(self._reader)


_context: ssl.SSLContext | None = None
_context_lock = threading.Lock()


def tls_context() -> ssl.SSLContext:
    """The system's trusted CAs plus certifi's (requests' bundle, so a URL diffusers' ``load_image`` fetches is
    trusted here too); certificates are always verified against the URL's host name."""
    global _context
    with _context_lock:
        if _context is None:
            context = ssl.create_default_context()
            try:
                import certifi

                context.load_verify_locations(certifi.where())
            except (ImportError, OSError, ssl.SSLError):
                pass  # the system store alone
            _context = context
        return _context
