"""The img2img input: ``image_url`` as an http(s) URL, a data URI or bare base64, decoded to an RGB image.

URLs are fetched by :func:`core.url_fetch.fetch_url`: public addresses only unless ``ALLOW_PRIVATE_URLS=1``, one
deadline (``URL_TIMEOUT_S``) for the whole transfer, at most :data:`MAX_IMAGE_BYTES` and :data:`MAX_REDIRECTS`
redirects, http(s) only (also after a redirect), never a local path. Inline images (data URIs, bare base64) have
the same byte bound.

Decoding accepts PNG, JPEG (MPO, the multi-picture JPEG some cameras write, included: its first picture) and
WebP only, and no other decoder of Pillow ever runs on the bytes (TIFF, BMP, ICO, DDS, PCX, QOI, SGI, TGA, ...;
EPS would hand them to Ghostscript). An animated PNG or WebP gives its first frame. Images over
:data:`MAX_IMAGE_PIXELS` are refused before they are expanded (decompression bombs). The result is RGB, converted
faithfully rather than by Pillow's ``convert("RGB")`` alone, which clips 16-bit grey to white and drops alpha:

- EXIF orientation is applied (a phone photo arrives upright, as a browser shows it);
- 16-bit grey (``I;16``) is scaled from 0..65535; 32-bit integer (``I``) likewise when its values fit 16 bits
  (what Pillow reads 16-bit PNGs as), else from its own min..max; float (``F``) from 0..1 when its values lie
  there, else from its own min..max;
- transparency (an alpha channel, a palette's or a PNG's transparent colour) is composited on white, as
  AUTOMATIC1111 flattens img2img inputs (its default background), so transparent areas read as white paper
  rather than whatever colour the encoder left under them.

Every failure is an :class:`core.errors.InvalidRequest` starting with the field's name (``image_url:``, or
``controlnets[0].image:`` for a control image) and saying what to send instead.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.parse

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import InvalidRequest, first_line
from core.settings import Settings
from core.url_fetch import UrlPolicy, fetch_url

FIELD = "image_url"
MAX_IMAGE_BYTES = 20 * 1000 * 1000
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 8192 x 8192; the image is resized to at most 2048 a side afterwards
MAX_REDIRECTS = 5
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")  # Pillow's format ids; MPO comes through the JPEG plugin
BACKGROUND = (255, 255, 255)  # under transparent pixels (A1111's img2img default)
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")

# File signatures of formats that are refused, to say what was sent instead of "not an image".
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"II*\x00", "a TIFF image"),
    (0, b"MM\x00*", "a TIFF image"),
    (0, b"GIF8", "a GIF image"),
    (0, b"BM", "a BMP image"),
    (0, b"\x00\x00\x01\x00", "an ICO image"),
    (0, b"DDS ", "a DDS image"),
    (0, b"8BPS", "a PSD image"),
    (0, b"%!PS", "a PostScript/EPS file"),
    (0, b"\xc5\xd0\xd3\xc6", "an EPS file"),
    (0, b"%PDF", "a PDF"),
    (0, b"qoif", "a QOI image"),
    (0, b"\x01\xda", "an SGI image"),
    (0, b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 image"),
    (0, b"\xff\x4f\xff\x51", "a JPEG 2000 image"),
    (0, b"\xff\x0a", "a JPEG XL image"),
    (4, b"ftypavif", "an AVIF image"),
    (4, b"ftypheic", "a HEIC image"),
    (4, b"ftypmif1", "a HEIF image"),
    (0, b"icns", "an ICNS image"),
    (0, b"\x89PNG", "PNG"),
    (0, b"\xff\xd8\xff", "JPEG"),
)


def _error(message: str, field: str = FIELD) -> InvalidRequest:
    return InvalidRequest(f"{field}: {message}")


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size} bytes"


def image_url_policy(settings: Settings) -> UrlPolicy:
    """The URL policy of ``image_url``: the settings' addresses and deadline, this module's byte and redirect
    bounds."""
    return UrlPolicy.from_settings(settings, max_bytes=MAX_IMAGE_BYTES, max_redirects=MAX_REDIRECTS)


def _decode_base64(text: str, field: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _error("is neither an http(s) URL, a data URI nor valid base64", field) from None


def fetch_image_bytes(image_url: str, policy: UrlPolicy, field: str = FIELD) -> bytes:
    """The raw bytes behind ``image_url``: downloaded under ``policy``, or decoded from a data URI / bare base64
    (bounded by ``policy.max_bytes`` too). ``field`` names the request field in errors."""
    scheme = urllib.parse.urlsplit(image_url[:2048]).scheme.lower() if "://" in image_url[:16] else ""
    if scheme in ("http", "https"):
        return fetch_url(image_url, policy, field=field, accept="image/png,image/jpeg,image/webp;q=0.9,*/*;q=0.5")
    if scheme:
        raise _error(f"scheme {scheme!r} is not accepted; send an http(s) URL, a data URI or base64", field)
    match = _DATA_URI.match(image_url[:512])
    if image_url[:5].lower() == "data:":
        if match is None or not match.group("b64"):
            raise _error("a data URI must be base64-encoded (data:image/png;base64,...)", field)
        data = _decode_base64(image_url[match.end() :], field)
    else:
        data = _decode_base64(image_url, field)
    if len(data) > policy.max_bytes:
        raise _error(f"the image is {_mb(len(data))}, larger than the {_mb(policy.max_bytes)} limit", field)
    return data


def _sniff(data: bytes) -> str | None:
    head = data[:32]
    for offset, signature, name in _SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    text = head.lstrip().lower()
    if text.startswith((b"<svg", b"<?xml")):
        return "an SVG image"
    if text.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    return None


def _grey_to_8bit(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """A high-bit grey image (``I;16*``, ``I``, ``F``) as 8-bit grey by its real range, and its raw values."""
    raw = np.asarray(image)
    values = raw.astype(np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
        low, high = 0.0, 65535.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.clip(np.rint((values - low) * scale), 0, 255).astype(np.uint8), raw


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` (any Pillow mode) as RGB: high-bit grey scaled by its real range, transparency composited on
    :data:`BACKGROUND`."""
    transparency = image.info.get("transparency")
    if image.mode in _HIGH_BIT_MODES:
        grey, raw = _grey_to_8bit(image)
        rgba = Image.fromarray(grey).convert("RGBA")
        if isinstance(transparency, int):  # a 16-bit PNG's transparent grey level
            rgba.putalpha(Image.fromarray(np.where(raw == transparency, 0, 255).astype(np.uint8)))
    elif "A" in image.mode or "a" in image.mode or transparency is not None:
        rgba = image.convert("RGBA")  # applies a palette's or a PNG's transparent colour as alpha too
    else:
        return image.convert("RGB")  # a copy even when RGB: the opened image is closed after decoding
    background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def open_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, field: str = FIELD) -> Image.Image:
    """Bytes -> an upright image in its own mode; only PNG, JPEG and WebP, refusing images over ``max_pixels``
    before decoding them."""
    sniffed = _sniff(data)
    if sniffed is not None and sniffed not in ("PNG", "JPEG", "WebP"):
        raise _error(f"this is {sniffed}; only PNG, JPEG and WebP images are accepted (convert it first)", field)
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise _error(f"the image is {width}x{height}; at most {max_pixels} pixels are accepted", field)
            image.load()
            try:
                upright = ImageOps.exif_transpose(image)
            except Exception:  # an unreadable EXIF block: the stored orientation is the best there is
                upright = image
            return upright if upright is not image else image.copy()  # the opened image is closed on return
    except InvalidRequest:
        raise
    except Image.DecompressionBombError:  # Pillow's own guard, for images far past ours
        raise _error(f"the image is a decompression bomb; at most {max_pixels} pixels are accepted", field) from None
    except UnidentifiedImageError:
        raise _error("not a readable image; send a PNG, JPEG or WebP", field) from None
    except Exception as error:  # Pillow's decoders raise many types on malformed files
        what = f"{sniffed} image" if sniffed else "image"
        raise _error(f"not a readable {what} ({first_line(error, 120)}); send a PNG, JPEG or WebP", field) from None


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, field: str = FIELD) -> Image.Image:
    """Bytes -> an upright RGB image (see :func:`open_image` and :func:`to_rgb`); ``field`` names the request
    field in errors."""
    return to_rgb(open_image(data, max_pixels, field))


def load_input_image(image_url: str, settings: Settings, field: str = FIELD) -> Image.Image:
    """``image_url`` -> an upright RGB image, under ``settings``' URL policy and every bound of this module;
    ``field`` names the request field the image came in (``image_url``, ``controlnets[0].image``) in errors."""
    policy = image_url_policy(settings)
    return decode_image(fetch_image_bytes(image_url, policy, field), MAX_IMAGE_PIXELS, field)


def to_mask(image: Image.Image) -> Image.Image:
    """``image`` (any mode) as an 8-bit grey mask, white = repaint, as A1111 1.10 reads an img2img mask
    (``create_binary_mask``): an image with transparency gives its alpha channel, cut at 128 (the opaque part is the
    mask: a painted stroke); any other image gives its grey levels (high-bit grey scaled by its range), kept soft."""
    if image.mode in _HIGH_BIT_MODES:
        return Image.fromarray(_grey_to_8bit(image)[0])
    if "A" in image.mode or "a" in image.mode or image.info.get("transparency") is not None:
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha.point(lambda value: 255 if value > 128 else 0)
    return image.convert("L")


def load_input_mask(mask: str, settings: Settings, field: str) -> Image.Image:
    """A mask sent as ``field`` (URL, data URI or base64) -> an upright 8-bit grey mask (:func:`to_mask`), under
    the same URL policy and bounds as ``image_url``."""
    return to_mask(open_image(fetch_image_bytes(mask, image_url_policy(settings), field), field=field))
