"""One HTTP(S) GET of a user-supplied URL: public addresses only, one deadline, bounded bytes and redirects.

A job's URL (``image_url`` and ``mask`` today; LoRAs and embeddings by URL next) is fetched by :func:`fetch_url`
under a :class:`UrlPolicy` built from the settings:

- **Addresses.** The host is resolved once per hop and every address it resolves to is checked (a name resolving
  to one public and one private address is refused); the connection goes to a checked address, never to a second
  lookup of the name, so DNS rebinding between the check and the connection is impossible. TLS still sends the
  host name (SNI) and verifies the certificate against it; the ``Host`` header carries it too. Numeric spellings
  (``2130706433``, ``0177.0.0.1``, ``0x7f.1``) are resolved by the system like any name and then checked, so they
  are caught after resolution rather than by parsing. Which addresses are public is :mod:`core.url_addresses`'s
  rule (each refusal names the range). ``ALLOW_PRIVATE_URLS=1`` lifts this check (private deployments, the
  tests); the pinning and every other bound stay. Proxy variables (``HTTPS_PROXY``) are not used: a proxy
  resolves the name itself, which would undo the pinning.
- **Time.** One deadline (``URL_TIMEOUT_S``) covers the whole transfer: DNS resolution (on a thread joined with
  the time left, since ``getaddrinfo`` has no timeout of its own), connecting, the TLS handshake, sending the
  request, the status line and headers, the body and every redirect. Every socket operation gets the time left
  as its timeout and every read is a single ``recv`` (:mod:`core.url_sockets`), so a server dripping one byte at a
  time is cut at the deadline, not after its whole answer.
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
import re
import socket
import ssl
import threading
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.errors import InvalidRequest
from core.url_addresses import Address, non_public_reason
from core.url_sockets import Deadline, DeadlineReader, ResponseSocket, TimedOut, tls_context

if TYPE_CHECKING:
    from core.settings import Settings

MAX_URL_CHARS = 8192  # servers refuse longer request lines; a longer "URL" is a mistake (base64 sent as a URL?)
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "sdxl-worker"
_HOST_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,253}$")


@dataclass(frozen=True)
class UrlPolicy:
    """What one fetch may do: reach private addresses, take ``timeout_s`` in all, read ``max_bytes`` of body and
    follow ``max_redirects`` redirects."""

    allow_private: bool
    timeout_s: float
    max_bytes: int
    max_redirects: int = 5

    def __post_init__(self) -> None:
        if not self.timeout_s > 0 or self.max_bytes < 0 or self.max_redirects < 0:
            raise ValueError(f"UrlPolicy needs timeout_s > 0, max_bytes >= 0 and max_redirects >= 0: {self}")

    @classmethod
    def from_settings(cls, settings: Settings, *, max_bytes: int, max_redirects: int = 5) -> UrlPolicy:
        """ALLOW_PRIVATE_URLS and URL_TIMEOUT_S from ``settings``; the byte bound is the caller's (an image is not
        a LoRA)."""
        return cls(settings.allow_private_urls, settings.url_timeout_s, max_bytes, max_redirects)


class UrlFetchError(InvalidRequest):
    """A URL of the request could not be fetched: ``field: cause``, with ``kind`` for callers and tests.

    Kinds: ``url`` (malformed), ``scheme``, ``address`` (non-public), ``timeout``, ``too_large``, ``status``
    (an HTTP error status), ``redirects``, ``network``, ``tls``, ``protocol`` (not valid HTTP).
    A caller that reports another error kind (a LoRA's ``lora:``) re-raises with ``message``.
    """

    def __init__(self, field: str, kind: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.kind = kind
        self.reason = reason


def _size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size} bytes"


def shown_url(url: str, limit: int = 100) -> str:
    """``url`` for a message: without its query (presigned URLs carry credentials there) and at most ``limit``
    characters."""
    parts = urllib.parse.urlsplit(url)
    text = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    if parts.query:
        text += "?..."
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class _Target:
    url: str
    scheme: str
    host: str  # ASCII (IDNA) host name or IP literal, no brackets
    port: int
    authority: str  # the Host header: host (IPv6 in brackets) and the port when the URL names one
    path: str  # request target: path and query, percent-encoded


def _parse(url: str, field: str, shown: str) -> _Target:
    def bad(reason: str) -> UrlFetchError:
        return UrlFetchError(field, "url", f"{shown} is not a usable URL: {reason}")

    if len(url) > MAX_URL_CHARS:
        raise bad(f"longer than {MAX_URL_CHARS:,} characters")
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError as error:
        raise bad(str(error)) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UrlFetchError(field, "scheme", f"scheme {scheme or 'none'!r} in {shown} is not fetched; use http(s)")
    if parts.username is not None or parts.password is not None:
        raise bad("a user name or password in the URL is not sent; use a URL that needs none (e.g. presigned)")
    host = parts.hostname or ""
    if not host:
        raise bad("no host")
    try:
        literal: Address | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is None:
        try:
            host = host.encode("idna").decode("ascii") if not host.isascii() else host
        except UnicodeError:
            raise bad(f"host {host[:80]!r} is not a valid name") from None
        if not _HOST_NAME.match(host):
            raise bad(f"host {host[:80]!r} is not a valid name")
    authority = f"[{host}]" if literal is not None and literal.version == 6 else host
    if port is not None:
        authority += f":{port}"
    # Spaces and non-ASCII characters percent-encoded as browsers do; existing escapes kept.
    path = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=~-._")
    if parts.query:
        path += "?" + urllib.parse.quote(parts.query, safe="/%:@!$&'()*+,;=?~-._")
    return _Target(url, scheme, host, port or (443 if scheme == "https" else 80), authority, path)


class _Fetch:
    """One fetch: the hops, the deadline and what to say when it fails."""

    def __init__(self, url: str, policy: UrlPolicy, field: str, accept: str) -> None:
        self.original = url
        self.policy = policy
        self.field = field
        self.accept = accept
        self.deadline = Deadline(policy.timeout_s)
        self.stage = "starting"
        self.received = 0  # body bytes of the final hop
        self.body = b""
        self.where = shown_url(url)  # the URL being fetched, for messages (with the original after a redirect)

    def error(self, kind: str, reason: str) -> UrlFetchError:
        return UrlFetchError(self.field, kind, reason)

    def run(self) -> bytes:
        url = self.original
        for hop in range(self.policy.max_redirects + 1):
            if hop:
                self.where = f"{shown_url(url)} (redirected from {shown_url(self.original)})"
            target = _parse(url, self.field, self.where)
            location = self._get(target)
            if location is None:
                return self.body
            url = urllib.parse.urljoin(url, location)
            scheme = urllib.parse.urlsplit(url).scheme.lower()
            if scheme not in ("http", "https"):
                raise self.error("scheme", f"{self.where} redirected to {location[:100]!r}; only http(s) is followed")
        raise self.error(
            "redirects",
            f"{shown_url(self.original)} redirects more than {self.policy.max_redirects} times (a redirect loop?)",
        )

    def _resolve(self, target: _Target) -> list[tuple[int, tuple]]:
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

    def _connect(self, target: _Target) -> socket.socket:
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

    def _get(self, target: _Target) -> str | None:
        """One request; the ``Location`` of a redirect, or None with the body in ``self.body``."""
        sock = self._connect(target)
        try:
            self.stage = "sending the request"
            request = (
                f"GET {target.path} HTTP/1.1\r\nHost: {target.authority}\r\nUser-Agent: {USER_AGENT}\r\n"
                f"Accept: {self.accept}\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n"
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
                raise self.error("status", f"{self.where} answered HTTP {response.status} {response.reason}".rstrip())
            self.body = self._read_body(response)
            return None
        finally:
            sock.close()

    def _read_body(self, response: http.client.HTTPResponse) -> bytes:
        limit = self.policy.max_bytes
        declared = response.length  # None when chunked or not given
        if declared is not None and declared > limit:
            raise self.error("too_large", f"{self.where} is {_size(declared)}, larger than the {_size(limit)} limit")
        self.stage = "reading the body"
        chunks: list[bytes] = []
        while chunk := response.read1(1 << 16):  # one recv at most, so the count is current
            self.received += len(chunk)
            if self.received > limit:
                raise self.error("too_large", f"{self.where} is larger than the {_size(limit)} limit")
            chunks.append(chunk)
        if response.length:  # http.client returns b"" instead of raising when a sized body ends early
            raise self.error(
                "protocol",
                f"{self.where}: the connection closed after {self.received:,} of {declared:,} bytes of the body",
            )
        return b"".join(chunks)

    def fail(self, error: BaseException) -> UrlFetchError:
        """The message for an error of the transport (anything but our own :class:`UrlFetchError`)."""
        if isinstance(error, (TimedOut, TimeoutError)):
            got = f", {self.received:,} bytes of the body so far" if self.stage == "reading the body" else ""
            return self.error(
                "timeout",
                f"downloading {self.where} took longer than {self.policy.timeout_s:g} s (URL_TIMEOUT_S); it stopped"
                f" while {self.stage}{got}",
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
    fetch = _Fetch(url, policy, field, accept)
    try:
        return fetch.run()
    except UrlFetchError:
        raise
    except (TimedOut, OSError, http.client.HTTPException, ValueError, UnicodeError) as error:
        raise fetch.fail(error) from None
