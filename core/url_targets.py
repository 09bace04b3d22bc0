"""What a user-supplied URL is, before any connection: its parts, its form in messages, and the fetch's error.

:func:`parse_url` checks the form (http or https, a valid host, no credentials, a bounded length) and gives the
request target as it goes on the wire; :func:`shown_url` is the URL for messages, without its query (presigned
URLs carry credentials there). :mod:`core.url_fetch` connects; :mod:`core.url_download` streams into files.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass

from core.errors import InvalidRequest
from core.url_addresses import Address

MAX_URL_CHARS = 8192  # servers refuse longer request lines; a longer "URL" is a mistake (base64 sent as a URL?)
_HOST_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,253}$")


class UrlFetchError(InvalidRequest):
    """A URL of the request could not be fetched: ``field: cause``, with ``kind`` for callers and tests.

    Kinds: ``url`` (malformed), ``scheme``, ``address`` (non-public), ``timeout``, ``too_large``, ``status``
    (an HTTP error status), ``redirects``, ``network``, ``tls``, ``protocol`` (not valid HTTP).
    A caller that reports another error kind (a LoRA's ``lora:``) re-raises with ``message``.
    """

    def __init__(self, field: str, kind: str, reason: str, status: int | None = None) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.kind = kind
        self.reason = reason
        self.status = status  # the HTTP status of a ``status`` error


def size_text(size: int) -> str:
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
class UrlTarget:
    url: str
    scheme: str
    host: str  # ASCII (IDNA) host name or IP literal, no brackets
    port: int
    authority: str  # the Host header: host (IPv6 in brackets) and the port when the URL names one
    path: str  # request target: path and query, percent-encoded


def parse_url(url: str, field: str, shown: str) -> UrlTarget:
    """``url``'s parts, or a :class:`UrlFetchError` (kind ``url`` or ``scheme``) saying what is wrong with it."""

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
    return UrlTarget(url, scheme, host, port or (443 if scheme == "https" else 80), authority, path)
