"""The canny preprocessor against OpenCV's algorithm, transcribed here loop for loop from ``canny.cpp`` (ring buffer
of magnitudes, the map of 0/1/2, the push stack and its ``prev_flag`` shortcut), independently of the vectorised
NumPy/SciPy version the worker runs when OpenCV is not installed; and against OpenCV itself where it is."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.adapters.controlnet.canny import TG22, canny, canny_numpy


def reference_canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """cv2.Canny(image, low, high) (aperture 3, L1), in plain loops as OpenCV's C++ writes it."""
    if low > high:
        low, high = high, low
    src = image[..., None] if image.ndim == 2 else image
    rows, cols, cn = src.shape
    padded = np.pad(src.astype(np.int64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    dx = np.zeros((rows, cols, cn), dtype=np.int64)
    dy = np.zeros((rows, cols, cn), dtype=np.int64)
    for i in range(rows):
        for j in range(cols):
            p = padded[i : i + 3, j : j + 3]
            dx[i, j] = (p[0, 2] - p[0, 0]) + 2 * (p[1, 2] - p[1, 0]) + (p[2, 2] - p[2, 0])
            dy[i, j] = (p[2, 0] - p[0, 0]) + 2 * (p[2, 1] - p[0, 1]) + (p[2, 2] - p[0, 2])
    mag = np.zeros((rows + 2, cols + 2), dtype=np.int64)  # zero ring around the image
    gx = np.zeros((rows, cols), dtype=np.int64)
    gy = np.zeros((rows, cols), dtype=np.int64)
    for i in range(rows):
        for j in range(cols):
            norms = [abs(dx[i, j, k]) + abs(dy[i, j, k]) for k in range(cn)]
            best = 0
            for k in range(1, cn):
                if norms[k] > norms[best]:
                    best = k
            mag[i + 1, j + 1], gx[i, j], gy[i, j] = norms[best], dx[i, j, best], dy[i, j, best]
    low_i, high_i = int(np.floor(low)), int(np.floor(high))
    edge_map = np.ones((rows + 2, cols + 2), dtype=np.int64)  # 1: not an edge; the border stays 1
    stack = []
    for i in range(rows):
        prev_flag = False
        for j in range(cols):
            m = int(mag[i + 1, j + 1])
            push = False
            if m > low_i:
                xs, ys = int(gx[i, j]), int(gy[i, j])
                x, y = abs(xs), abs(ys) << 15
                tg22x = x * TG22
                if y < tg22x:
                    push = m > mag[i + 1, j] and m >= mag[i + 1, j + 2]
                elif y > tg22x + (x << 16):
                    push = m > mag[i, j + 1] and m >= mag[i + 2, j + 1]
                else:
                    s = -1 if (xs ^ ys) < 0 else 1
                    push = m > mag[i, j + 1 - s] and m > mag[i + 2, j + 1 + s]
            if not push:
                prev_flag = False
                edge_map[i + 1, j + 1] = 1
                continue
            if not prev_flag and m > high_i and edge_map[i, j + 1] != 2:
                edge_map[i + 1, j + 1] = 2
                stack.append((i + 1, j + 1))
                prev_flag = True
            else:
                edge_map[i + 1, j + 1] = 0
    while stack:
        r, c = stack.pop()
        for dr, dc in ((0, -1), (0, 1), (-1, -1), (-1, 0), (-1, 1), (1, -1), (1, 0), (1, 1)):
            if edge_map[r + dr, c + dc] == 0:
                edge_map[r + dr, c + dc] = 2
                stack.append((r + dr, c + dc))
    return np.where(edge_map[1:-1, 1:-1] == 2, 255, 0).astype(np.uint8)


def picture(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Blocks, a gradient and noise: edges of every direction, ties and weak runs that hysteresis must connect."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (shape[0] // 4 + 1, shape[1] // 4 + 1, *shape[2:]))
    blocks = coarse.repeat(4, axis=0).repeat(4, axis=1)[: shape[0], : shape[1]]
    ramp = np.linspace(0, 60, shape[1]).reshape(1, shape[1], *([1] * (len(shape) - 2)))
    return np.clip(blocks * 0.7 + ramp + rng.normal(0, 12, shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape", [(23, 31), (20, 17, 3)])
@pytest.mark.parametrize(("low", "high"), [(100, 200), (30.7, 80.2), (200, 100), (1, 1)])
def test_numpy_canny_is_opencvs_algorithm(shape, low, high) -> None:
    for seed in range(3):
        image = picture(seed, shape)
        expected = reference_canny(image, low, high)
        assert np.array_equal(canny_numpy(image, low, high), expected), (seed, shape, low, high)
    assert expected.any() or (low, high) == (200, 100)  # the pictures do have edges


@given(st.integers(0, 2**32 - 1), st.integers(1, 255), st.integers(1, 255), st.booleans())
def test_numpy_canny_matches_the_transcription_on_random_images(seed, low, high, colour) -> None:
    image = picture(seed, (12, 14, 3) if colour else (12, 14))
    assert np.array_equal(canny_numpy(image, low, high), reference_canny(image, low, high))


@pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="OpenCV is not installed in this environment")
def test_numpy_canny_equals_opencv_where_installed() -> None:
    import cv2

    for shape in ((64, 48), (40, 52, 3)):
        image = picture(7, shape)
        assert np.array_equal(canny_numpy(image, 100, 200), cv2.Canny(image, 100, 200))


def test_canny_refuses_what_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="8-bit"):
        canny(np.zeros((4, 4), dtype=np.float32), 100, 200)
