"""Canny edges as OpenCV's ``cv2.Canny(image, low, high)`` computes them (aperture 3, L1 gradient: the call
sd-webui-controlnet's and diffusers' canny make), with OpenCV when it is installed and this NumPy/SciPy
transcription of its algorithm (``modules/imgproc/src/canny.cpp``) when it is not:

1. Sobel 3x3 derivatives ``dx``, ``dy`` per channel, borders replicated, in integers;
2. magnitude ``|dx| + |dy|``; on a colour image each pixel takes the channel with the largest magnitude (the first
   on ties) and that channel's ``dx``, ``dy``;
3. non-maximum suppression in one of four directions, chosen in fixed point by ``tan(22.5°)`` as OpenCV does
   (``TG22 = round(0.41421356 * 2^15)``): horizontal ``m > left and m >= right``, vertical ``m > up and m >= down``,
   diagonal ``m > both diagonal neighbours`` on the gradient's diagonal; magnitudes outside the image count 0;
4. hysteresis: a pixel past suppression with ``m > floor(low)`` is an edge when its 8-connected run of such pixels
   holds one with ``m > floor(high)`` (OpenCV grows edges from those pixels through exactly these neighbours).

The thresholds are swapped when ``low > high``, as OpenCV does. The result is 0 or 255 per pixel.
"""

from __future__ import annotations

import math

import numpy as np

_SHIFT = 15
TG22 = int(0.4142135623730950488016887242097 * (1 << _SHIFT) + 0.5)


def canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Edges of an 8-bit grey (H, W) or colour (H, W, C) image: a (H, W) uint8 map of 0 and 255."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError("canny takes an 8-bit (H, W) or (H, W, C) image")
    try:
        import cv2
    except ImportError:
        return canny_numpy(image, low, high)
    return cv2.Canny(np.ascontiguousarray(image), low, high)


def _sobel(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel x and y derivatives of each channel, borders replicated, as int32 (H, W, C)."""
    padded = np.pad(image.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows, cols = image.shape[:2]

    def window(dy: int, dx: int) -> np.ndarray:
        return padded[1 + dy : 1 + dy + rows, 1 + dx : 1 + dx + cols]

    gx = (window(-1, 1) - window(-1, -1)) + 2 * (window(0, 1) - window(0, -1)) + (window(1, 1) - window(1, -1))
    gy = (window(1, -1) - window(-1, -1)) + 2 * (window(1, 0) - window(-1, 0)) + (window(1, 1) - window(-1, 1))
    return gx, gy


def _strongest_channel(gx: np.ndarray, gy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    magnitude = np.abs(gx) + np.abs(gy)
    best = np.argmax(magnitude, axis=2)[..., None]  # argmax takes the first maximum, as OpenCV's strict '>'
    take = np.take_along_axis
    return take(magnitude, best, 2)[..., 0], take(gx, best, 2)[..., 0], take(gy, best, 2)[..., 0]


def _suppressed(magnitude: np.ndarray, gx: np.ndarray, gy: np.ndarray, low: int) -> np.ndarray:
    """Pixels above ``low`` that are a local maximum along their gradient direction."""
    m = np.pad(magnitude, 1)  # zeros outside the image, as OpenCV's ring buffer
    rows, cols = magnitude.shape

    def at(dy: int, dx: int) -> np.ndarray:
        return m[1 + dy : 1 + dy + rows, 1 + dx : 1 + dx + cols]

    x = np.abs(gx).astype(np.int64)
    y = np.abs(gy).astype(np.int64) << _SHIFT
    tg22x = x * TG22
    tg67x = tg22x + (x << (_SHIFT + 1))
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg67x)
    diagonal = ~horizontal & ~vertical
    same_sign = (gx ^ gy) >= 0  # OpenCV: s = (xs ^ ys) < 0 ? -1 : 1
    keep_h = (magnitude > at(0, -1)) & (magnitude >= at(0, 1))
    keep_v = (magnitude > at(-1, 0)) & (magnitude >= at(1, 0))
    # s = 1: compare the upper-left and lower-right neighbours; s = -1: upper-right and lower-left.
    keep_d = np.where(
        same_sign,
        (magnitude > at(-1, -1)) & (magnitude > at(1, 1)),
        (magnitude > at(-1, 1)) & (magnitude > at(1, -1)),
    )
    maximum = (horizontal & keep_h) | (vertical & keep_v) | (diagonal & keep_d)
    return maximum & (magnitude > low)


def canny_numpy(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """OpenCV's Canny (aperture 3, L1 gradient) in NumPy and SciPy; see the module docstring."""
    from scipy import ndimage

    if low > high:
        low, high = high, low
    low_i, high_i = math.floor(low), math.floor(high)
    channels = image[..., None] if image.ndim == 2 else image
    gx, gy = _sobel(channels)
    magnitude, gx, gy = _strongest_channel(gx, gy)
    candidates = _suppressed(magnitude, gx, gy, low_i)
    labels, count = ndimage.label(candidates, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return np.zeros(magnitude.shape, dtype=np.uint8)
    strong = np.zeros(count + 1, dtype=bool)
    strong[np.unique(labels[candidates & (magnitude > high_i)])] = True
    strong[0] = False
    return np.where(strong[labels], 255, 0).astype(np.uint8)
