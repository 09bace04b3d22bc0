"""A self-signed TLS certificate for tests that serve https on 127.0.0.1 under a made-up host name, and such a
server (:func:`https_host`) whose certificate the worker's URL fetches trust."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def self_signed_certificate(host: str, folder: Path, certificate_authority: bool = False) -> tuple[Path, Path]:
    """Write ``cert.pem`` and ``key.pem`` for ``host`` into ``folder``; returns their paths. ``certificate_authority``:
    mark it a CA, which OpenSSL wants of a certificate a client trusts as its only CA file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
    )
    if certificate_authority:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    certificate = builder.sign(key, hashes.SHA256())
    cert, key_file = folder / "cert.pem", folder / "key.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, key_file


@contextmanager
def https_host(host: str, body: bytes, folder: Path, monkeypatch: Any) -> Iterator[tuple[str, list[str]]]:
    """``host`` served over TLS from 127.0.0.1 (``body`` for every path) with a certificate :mod:`core.url_fetch`
    trusts while ``monkeypatch`` lasts, and ``host`` resolving to 127.0.0.1 there; yields the base URL and the paths
    asked for."""
    from core import url_fetch

    self_signed_certificate(host, folder, certificate_authority=True)
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    httpd.socket = server_context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    client_context = ssl.create_default_context(cafile=str(folder / "cert.pem"))
    monkeypatch.setattr(url_fetch, "tls_context", lambda: client_context)
    original = socket.getaddrinfo

    def getaddrinfo(name: str, port: int, *args: object, **kwargs: object) -> list:
        if name != host:
            return original(name, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]

    monkeypatch.setattr(url_fetch.socket, "getaddrinfo", getaddrinfo)
    try:
        yield f"https://{host}:{httpd.server_address[1]}", asked
    finally:
        httpd.shutdown()
        httpd.server_close()
