"""One HTTP(S) GET of a user-supplied URL: public addresses only, one deadline, bounded bytes and redirects.

A job's URL (``image_url``, ``mask``) is fetched into memory by :func:`fetch_url` under a :class:`UrlPolicy` built
from the settings; files (LoRAs by URL, the checkpoint) are streamed to disk through :func:`stream_url` by
:mod:`core.url_download`, under the same rules:

- **Addresses.** The host is resolved once per hop and every address it resolves to is checked (a name resolving
  to one public and one private address is refused); the connection goes to a checked address, never to a second
  lookup of the name, so DNS rebinding between the check and the connection is impossible. TLS still sends the
  host name (SNI) and verifies the certificate against it; the ``Host`` header carries it too. Numeric spellings
  (``2130706433``, ``0177.0.0.1``, ``0x7f.1``) are resolved by the system like any name and then checked, so they
  are caught after resolution rather than by parsing. Which addresses are public is :mod:`core.url_addresses`'s
  rule (each refusal names the range). ``ALLOW_PRIVATE_URLS=1`` lifts this check (private deployments, the
  tests); the pinning and every other bound stay. Proxy variables (``HTTPS_PROXY``) are not used: a proxy
  resolves the name itself, which would undo the pinning.
- **Time.** One deadline (``URL_TIMEOUT_S`` for images) covers the whole transfer: DNS resolution (on a thread
  joined with the time left, since ``getaddrinfo`` has no timeout of its own), connecting, the TLS handshake,
  sending the request, the status line and headers, the body and every redirect. Every socket operation gets the
  time left as its timeout and every read is a single ``recv`` (:mod:`core.url_sockets`), so a server dripping one
  byte at a time is cut at the deadline, not after its whole answer. A policy with ``stall_s`` (a multi-gigabyte
  checkpoint, where no single deadline fits) also bounds each socket operation by it.
- **Size and shape.** At most ``max_bytes`` of body (a larger ``Content-Length`` is refused before reading), at
  most ``max_redirects`` redirects, http and https only (also after a redirect). Status line, header and chunk
  parsing is ``http.client``'s, with its bounds (a 64 KiB line, 100 headers); each of its errors, and every
  network and TLS error, becomes one :class:`UrlFetchError` naming the field and the cause.

Why not ``runpod.serverless.utils.rp_ssrf.safe_get`` (runpod 1.12), which pins and checks addresses too: its
switch for private addresses is the environment variable ``RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS``, read at every call,
where every setting of this project is read once into :class:`core.settings.Settings` and tests pass their own;
its timeout is requests' per socket operation, so a server dripping a byte every 0.25 s held a 1 s ``safe_get``
for 5.8 s (measured: the whole 24-byte drip), and its ``getaddrinfo`` runs unbounded in the caller's thread; its
errors are requests' and urllib3's texts, not a cause a user can act on; and importing it imports the whole runpod
package (about 2 s), which ``core`` must not need.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from core.url_addresses import non_public_reason
from core.url_sockets import Deadline, DeadlineReader, ResponseSocket, TimedOut, tls_context
from core.url_targets import UrlFetchError, UrlTarget, parse_url, shown_url, size_text

__all__ = ["UrlFetchError", "UrlPolicy", "UrlResponse", "fetch_url", "shown_url", "stream_url"]

if TYPE_CHECKING:
    from core.settings import Settings

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "sdxl-worker"
T = TypeVar("T")
TRANSPORT_ERRORS = (TimedOut, OSError, http.client.HTTPException, ValueError, UnicodeError)


class _ConsumerFailed(Exception):
    """Carries an exception of a :func:`stream_url` consumer past the transport's error mapping."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


@dataclass(frozen=True)
class UrlPolicy:
    """What one fetch may do: reach private addresses, take ``timeout_s`` in all (each socket operation at most
    ``stall_s`` when set), read ``max_bytes`` of body and follow ``max_redirects`` redirects. ``timeout_setting``
    and ``size_setting`` are the settings a message names for the deadline and the byte bound."""

    allow_private: bool
    timeout_s: float
    max_bytes: int
    max_redirects: int = 5
    stall_s: float | None = None
    timeout_setting: str = "URL_TIMEOUT_S"
    size_setting: str | None = None

    def __post_init__(self) -> None:
        stall_ok = self.stall_s is None or self.stall_s > 0
        if not self.timeout_s > 0 or self.max_bytes < 0 or self.max_redirects < 0 or not stall_ok:
            raise ValueError(
                f"UrlPolicy needs timeout_s > 0, max_bytes >= 0, max_redirects >= 0 and stall_s > 0: {self}"
            )

    @classmethod
    def from_settings(cls, settings: Settings, *, max_bytes: int, max_redirects: int = 5) -> UrlPolicy:
        """ALLOW_PRIVATE_URLS and URL_TIMEOUT_S from ``settings``; the byte bound is the caller's (an image is not
        a LoRA)."""
        return cls(settings.allow_private_urls, settings.url_timeout_s, max_bytes, max_redirects)


class UrlResponse:
    """The final answer (2xx) of a fetch, for a :func:`stream_url` consumer: its status and headers, and its body
    in chunks, each one ``recv`` at most, within the fetch's deadline and byte bound."""

    def __init__(self, response: http.client.HTTPResponse, fetch: _Fetch) -> None:
        self._response = response
        self._fetch = fetch
        self.status = response.status
        self.length = response.length  # the body's declared length; None when chunked or not given

    def header(self, name: str) -> str | None:
        return self._response.getheader(name)

    @property
    def field(self) -> str:
        return self._fetch.field

    def chunks(self) -> Iterator[bytes]:
        return self._fetch.body_chunks(self._response)

    def too_large(self, size: int | None = None) -> UrlFetchError:
        """The error for a body over the byte bound (a consumer that also counts earlier bytes raises it too)."""
        return self._fetch.too_large(size)


class _Fetch(Generic[T]):
    """One fetch: the hops, the deadline and what to say when it fails."""

    def __init__(
        self,
        url: str,
        policy: UrlPolicy,
        field: str,
        accept: str,
        consume: Callable[[UrlResponse], T],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.original = url
        self.policy = policy
        self.field = field
        self.accept = accept
        self.consume = consume
        self.headers = dict(headers or {})
        self.deadline = Deadline(policy.timeout_s, policy.stall_s)
        self.stage = "starting"
        self.received = 0  # body bytes of the final hop
        self.result: T | None = None
        self.where = shown_url(url)  # the URL being fetched, for messages (with the original after a redirect)

    def error(self, kind: str, reason: str, status: int | None = None) -> UrlFetchError:
        return UrlFetchError(self.field, kind, reason, status)

    def run(self) -> T:
        url = self.original
        for hop in range(self.policy.max_redirects + 1):
            if hop:
                self.where = f"{shown_url(url)} (redirected from {shown_url(self.original)})"
            target = parse_url(url, self.field, self.where)
            location = self._get(target)
            if location is None:
                return self.result  # type: ignore[return-value]  # set by _get with the final answer
            url = urllib.parse.urljoin(url, location)
            scheme = urllib.parse.urlsplit(url).scheme.lower()
            if scheme not in ("http", "https"):
                raise self.error("scheme", f"{self.where} redirected to {location[:100]!r}; only http(s) is followed")
        raise self.error(
            "redirects",
            f"{shown_url(self.original)} redirects more than {self.policy.max_redirects} times (a redirect loop?)",
        )

    def _resolve(self, target: UrlTarget) -> list[tuple[int, tuple]]:
        self.stage = f"resolving {target.host}"
        try:
            ip = ipaddress.ip_address(target.host)
        except ValueError:
            ip = None
        if ip is not None:
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            sockaddr: tuple = (target.host, target.port, 0, 0) if ip.version == 6 else (target.host, target.port)
            return [(family, sockaddr)]
        found: list = []
        failed: list[BaseException] = []

        def lookup() -> None:
            try:
                found.extend(socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM))
            except Exception as error:  # reported by the caller, never as a thread's traceback
                failed.append(error)

        # getaddrinfo cannot be interrupted; a lookup past the deadline is left to finish on its own thread.
        thread = threading.Thread(target=lookup, name=f"resolve {target.host[:40]}", daemon=True)
        thread.start()
        thread.join(self.deadline.left())
        if thread.is_alive():
            raise TimedOut
        if failed or not found:
            cause = (getattr(failed[0], "strerror", None) or str(failed[0])) if failed else "no addresses"
            raise self.error("network", f"cannot resolve the host of {self.where}: {cause}")
        addresses: list[tuple[int, tuple]] = []
        for family, _type, _proto, _name, sockaddr in found:
            if (family, sockaddr) not in addresses:
                addresses.append((family, sockaddr))
        return addresses

    def _connect(self, target: UrlTarget) -> socket.socket:
        addresses = self._resolve(target)
        if not self.policy.allow_private:
            for _family, sockaddr in addresses:  # all of them: a name with one private address is hostile
                reason = non_public_reason(sockaddr[0])
                if reason is not None:
                    raise self.error(
                        "address",
                        f"{self.where} points to {sockaddr[0]}, a {reason} address; only public addresses are"
                        " fetched (a private deployment allows them with ALLOW_PRIVATE_URLS=1)",
                    )
        last: OSError | None = None
        for family, sockaddr in addresses:  # dual-stack names: the next address when one is unreachable
            self.stage = f"connecting to {sockaddr[0]} port {sockaddr[1]}"
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.deadline.left())
                sock.connect(sockaddr)  # the checked address itself: no second lookup of the name
            except TimeoutError:
                sock.close()
                raise
            except OSError as error:
                sock.close()
                last = error
                continue
            except BaseException:
                sock.close()
                raise
            if target.scheme == "https":
                self.stage = f"doing the TLS handshake with {target.host}"
                try:
                    sock = tls_context().wrap_socket(sock, server_hostname=target.host, do_handshake_on_connect=False)
                    sock.settimeout(self.deadline.left())
                    sock.do_handshake()
                except BaseException:
                    sock.close()
                    raise
            return sock
        raise last if last is not None else OSError(f"no address to connect to for {target.host}")

    def _get(self, target: UrlTarget) -> str | None:
        """One request; the ``Location`` of a redirect, or None with the consumer's result in ``self.result``."""
        sock = self._connect(target)
        try:
            self.stage = "sending the request"
            extra = "".join(f"{name}: {value}\r\n" for name, value in self.headers.items())
            request = (
                f"GET {target.path} HTTP/1.1\r\nHost: {target.authority}\r\nUser-Agent: {USER_AGENT}\r\n"
                f"Accept: {self.accept}\r\nAccept-Encoding: identity\r\n{extra}Connection: close\r\n\r\n"
            )
            sock.settimeout(self.deadline.left())
            sock.sendall(request.encode("ascii"))
            self.stage = "waiting for the status line and headers"
            response = http.client.HTTPResponse(ResponseSocket(DeadlineReader(sock, self.deadline)), method="GET")
            response.begin()
            if response.status in REDIRECT_STATUSES:
                location = response.getheader("Location")
                if not location:
                    raise self.error("protocol", f"{self.where} redirects (HTTP {response.status}) without a Location")
                try:  # http.client decodes headers as Latin-1; servers (and browsers) mean UTF-8
                    return location.encode("latin-1").decode("utf-8")
                except UnicodeError:
                    return location
            if not 200 <= response.status < 300:
                reason = f"{self.where} answered HTTP {response.status} {response.reason}".rstrip()
                raise self.error("status", reason, response.status)
            try:
                self.result = self.consume(UrlResponse(response, self))
            except UrlFetchError:
                raise
            except Exception as error:  # a full disk is not a network error: stream_url re-raises it as it is
                raise _ConsumerFailed(error) from error
            return None
        finally:
            sock.close()

    def too_large(self, size: int | None = None) -> UrlFetchError:
        """The ``too_large`` error: the body (``size`` when known) is over the policy's byte bound."""
        limit = self.policy.max_bytes
        named = f" ({self.policy.size_setting})" if self.policy.size_setting else ""
        what = f"is {size_text(size)}, larger" if size is not None else "is larger"
        return self.error("too_large", f"{self.where} {what} than the {size_text(limit)} limit{named}")

    def body_chunks(self, response: http.client.HTTPResponse) -> Iterator[bytes]:
        declared = response.length  # None when chunked or not given
        if declared is not None and declared > self.policy.max_bytes:
            raise self.too_large(declared)
        self.stage = "reading the body"
        while True:
            try:
                chunk = response.read1(1 << 16)  # one recv at most, so the count is current
            except TRANSPORT_ERRORS as error:  # here, not in stream_url: the consumer's own errors are its own
                raise self.fail(error) from None
            if not chunk:
                break
            self.received += len(chunk)
            if self.received > self.policy.max_bytes:
                raise self.too_large()
            yield chunk
        if response.length:  # http.client returns b"" instead of raising when a sized body ends early
            raise self.error(
                "protocol",
                f"{self.where}: the connection closed after {self.received:,} of {declared:,} bytes of the body",
            )

    def fail(self, error: BaseException) -> UrlFetchError:
        """The message for an error of the transport (anything but our own :class:`UrlFetchError`)."""
        if isinstance(error, (TimedOut, TimeoutError)):
            got = f", {self.received:,} bytes of the body so far" if self.stage == "reading the body" else ""
            if self.policy.stall_s is not None and not self.deadline.passed():
                return self.error(
                    "timeout", f"{self.where} sent nothing for {self.policy.stall_s:g} s while {self.stage}{got}"
                )
            return self.error(
                "timeout",
                f"downloading {self.where} took longer than {self.policy.timeout_s:g} s "
                f"({self.policy.timeout_setting}); it stopped while {self.stage}{got}",
            )
        if isinstance(error, ssl.SSLCertVerificationError):
            return self.error(
                "tls", f"the TLS certificate of {self.where} is not valid: {error.verify_message or error.reason}"
            )
        if isinstance(error, ssl.SSLError):
            reason = error.reason or type(error).__name__
            hint = " (is it an http:// URL?)" if reason == "WRONG_VERSION_NUMBER" else ""
            return self.error("tls", f"TLS with {self.where} failed while {self.stage}: {reason}{hint}")
        if isinstance(error, http.client.IncompleteRead):
            return self.error(
                "protocol", f"{self.where}: the connection closed in the middle of the body (a cut transfer)"
            )
        if isinstance(error, http.client.LineTooLong):
            what = str(error).rpartition("when reading ")[2] or "line"
            return self.error("protocol", f"{self.where} sent a {what} longer than 64 KiB")
        if isinstance(error, http.client.RemoteDisconnected):
            return self.error("protocol", f"{self.where} closed the connection without answering")
        if isinstance(error, http.client.BadStatusLine):
            line = str(error.args[0] if error.args else "")[:60]
            return self.error("protocol", f"{self.where} did not answer in HTTP (status line {line!r})")
        if isinstance(error, http.client.UnknownProtocol):
            version = str(error.args[0] if error.args else "")[:20]
            return self.error("protocol", f"{self.where} answered in {version!r}; only HTTP/1.0 and 1.1 are spoken")
        if isinstance(error, http.client.HTTPException):
            detail = str(error)[:100] or type(error).__name__
            return self.error("protocol", f"{self.where} sent an invalid HTTP answer: {detail}")
        if isinstance(error, ConnectionRefusedError):
            return self.error("network", f"{self.where}: nothing accepts connections there (connection refused)")
        if isinstance(error, ConnectionResetError):
            return self.error("network", f"{self.where}: the server reset the connection while {self.stage}")
        if isinstance(error, OSError):
            cause = error.strerror or str(error) or type(error).__name__
            return self.error("network", f"cannot download {self.where}: {cause} (while {self.stage})")
        return self.error("protocol", f"cannot download {self.where}: {type(error).__name__}: {str(error)[:100]}")


def fetch_url(url: str, policy: UrlPolicy, *, field: str, accept: str = "*/*") -> bytes:
    """The body of ``url`` (http or https) under ``policy``; any failure is a :class:`UrlFetchError` whose message
    starts with ``field:`` and says what went wrong in words a user can act on."""
    return stream_url(url, policy, field=field, accept=accept, consume=lambda response: b"".join(response.chunks()))


def stream_url(
    url: str,
    policy: UrlPolicy,
    *,
    field: str,
    consume: Callable[[UrlResponse], T],
    headers: Mapping[str, str] | None = None,
    accept: str = "*/*",
) -> T:
    """GET ``url`` under ``policy`` (with extra request ``headers``, e.g. ``Range``) and hand the final 2xx answer
    to ``consume``, whose result is returned; transport failures, also while ``consume`` reads the body, are
    :class:`UrlFetchError` as for :func:`fetch_url`, and the consumer's own exceptions pass through."""
    fetch = _Fetch(url, policy, field, accept, consume, headers)
    try:
        return fetch.run()
    except UrlFetchError:
        raise
    except _ConsumerFailed as failed:
        raise failed.error from None
    except TRANSPORT_ERRORS as error:
        raise fetch.fail(error) from None
