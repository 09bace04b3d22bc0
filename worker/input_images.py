"""The img2img input: ``image_url`` as an http(s) URL, a data URI or bare base64, decoded to an RGB image.

Downloads are bounded in bytes (:data:`MAX_IMAGE_BYTES`), seconds (:data:`DOWNLOAD_TIMEOUT_S` for the
whole transfer) and redirects (:data:`MAX_REDIRECTS`); only http and https are fetched, never a local
path or another scheme, also not through a redirect. Decoding is bounded in pixels
(:data:`MAX_IMAGE_PIXELS`) so a decompression bomb is refused before it is expanded. Every failure is
an :class:`core.errors.InvalidRequest` naming ``image_url`` and what to send instead.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
import urllib.error
import urllib.parse
import urllib.request

from PIL import Image, UnidentifiedImageError

from core.errors import InvalidRequest

MAX_IMAGE_BYTES = 20 * 1000 * 1000
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 8192 x 8192; the image is resized to at most 2048 a side afterwards
DOWNLOAD_TIMEOUT_S = 30.0
MAX_REDIRECTS = 5
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size} bytes"


def _error(message: str) -> InvalidRequest:
    return InvalidRequest(f"image_url: {message}")


class _LimitedRedirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise _error(f"the server redirected to {newurl[:100]!r}; only http(s) is followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(url: str, max_bytes: int, timeout_s: float) -> bytes:
    opener = urllib.request.build_opener(_LimitedRedirects())
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(url, headers={"User-Agent": "sdxl-worker", "Accept": "image/*"})
    shown = url if len(url) <= 100 else url[:97] + "..."
    try:
        with opener.open(request, timeout=timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise _error(f"{shown} is {_mb(int(declared))}, larger than the {_mb(max_bytes)} limit")
            chunks, size = [], 0
            while chunk := response.read(1 << 16):
                size += len(chunk)
                if size > max_bytes:
                    raise _error(f"{shown} is larger than the {_mb(max_bytes)} limit")
                if time.monotonic() > deadline:
                    raise _error(f"downloading {shown} took longer than {timeout_s:g} s")
                chunks.append(chunk)
            return b"".join(chunks)
    except InvalidRequest:
        raise
    except urllib.error.HTTPError as error:
        if error.code in (301, 302, 303, 307, 308):
            location = (error.headers or {}).get("Location", "") if error.headers is not None else ""
            if urllib.parse.urlsplit(location).scheme.lower() not in ("", "http", "https"):
                raise _error(f"the server redirected to {location[:100]!r}; only http(s) is followed") from None
            raise _error(f"{shown} redirects more than {MAX_REDIRECTS} times (a redirect loop?)") from None
        raise _error(f"{shown} answered HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            raise _error(f"downloading {shown} took longer than {timeout_s:g} s") from None
        raise _error(f"cannot download {shown}: {reason}") from None


def _decode_base64(text: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _error("is neither an http(s) URL, a data URI nor valid base64") from None


def fetch_image_bytes(image_url: str, max_bytes: int = MAX_IMAGE_BYTES, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    """The raw bytes behind ``image_url`` (downloaded, or decoded from a data URI / bare base64)."""
    scheme = urllib.parse.urlsplit(image_url[:2048]).scheme.lower() if "://" in image_url[:16] else ""
    if scheme in ("http", "https"):
        return _download(image_url, max_bytes, timeout_s)
    if scheme:
        raise _error(f"scheme {scheme!r} is not accepted; send an http(s) URL, a data URI or base64")
    match = _DATA_URI.match(image_url[:512])
    if image_url[:5].lower() == "data:":
        if match is None or not match.group("b64"):
            raise _error("a data URI must be base64-encoded (data:image/png;base64,...)")
        data = _decode_base64(image_url[match.end() :])
    else:
        data = _decode_base64(image_url)
    if len(data) > max_bytes:
        raise _error(f"the image is {_mb(len(data))}, larger than the {_mb(max_bytes)} limit")
    return data


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Bytes -> an RGB image, refusing non-images and images over ``max_pixels`` before decoding them."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise _error(f"the image is {width}x{height}; at most {max_pixels} pixels are accepted")
            image.load()
            return image.convert("RGB")
    except InvalidRequest:
        raise
    except Image.DecompressionBombError:  # Pillow's own guard, for images far past ours
        raise _error(f"the image is a decompression bomb; at most {max_pixels} pixels are accepted") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise _error(f"not a readable image ({type(error).__name__}); send a PNG, JPEG or WebP") from None


def load_input_image(image_url: str) -> Image.Image:
    """``image_url`` -> RGB image, with every limit of this module applied."""
    return decode_image(fetch_image_bytes(image_url))
