"""The parallel PNG writer: every reader gets the exact pixels and text back, and the bytes do not depend on threads."""

from __future__ import annotations

import io
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from worker.output.images import encode_image, read_parameters
from worker.output.png import MODES, STRIP_ROWS, encode_png


def _image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    channels = MODES[mode][1]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def _photo_like(size: int = 512) -> Image.Image:
    """Smooth gradients with mild grain: compresses like a photograph, unlike the dev model's noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    base = np.stack([x / 2 % 256, y / 2 % 256, (x + y) / 4 % 256], axis=-1)
    grain = np.random.default_rng(0).normal(0, 4, base.shape)
    return Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8), "RGB")


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, checking the signature and each chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + body), f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        offset += 12 + length
    return chunks


@settings(max_examples=40, deadline=None)
@given(
    mode=st.sampled_from(sorted(MODES)),
    width=st.integers(1, 24),
    height=st.integers(1, 3 * STRIP_ROWS + 2),
    seed=st.integers(0, 2**16),
    level=st.integers(0, 9),
)
def test_pillow_reads_back_the_exact_pixels(mode: str, width: int, height: int, seed: int, level: int) -> None:
    image = _image(mode, width, height, seed)
    data = encode_png(image, level=level)
    with Image.open(io.BytesIO(data)) as back:
        assert back.mode == mode and back.size == (width, height)
        assert np.array_equal(np.asarray(back), np.asarray(image))


@pytest.mark.parametrize("height", [1, STRIP_ROWS - 1, STRIP_ROWS, STRIP_ROWS + 1, 4 * STRIP_ROWS + 7])
def test_the_stream_is_one_valid_zlib_stream_with_up_filtered_rows(height: int) -> None:
    """zlib checks the joined strips' Adler-32; undoing the Up filter by hand gives the pixels (not only Pillow)."""
    image = _image("RGB", 37, height, seed=height)
    chunks = _chunks(encode_png(image))
    assert [kind for kind, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    assert struct.unpack(">IIBBBBB", chunks[0][1]) == (37, height, 8, 2, 0, 0, 0)
    raw = np.frombuffer(zlib.decompress(chunks[1][1]), dtype=np.uint8).reshape(height, 37 * 3 + 1)
    assert (raw[:, 0] == 2).all()
    rows = np.cumsum(raw[:, 1:].astype(np.int64), axis=0) % 256
    assert np.array_equal(rows.reshape(height, 37, 3), np.asarray(image))


def test_the_bytes_do_not_depend_on_how_many_threads_deflate() -> None:
    image = _image("RGB", 200, 5 * STRIP_ROWS + 3, seed=7)
    shared = encode_png(image, {"parameters": "a"})
    with ThreadPoolExecutor(3) as pool:
        assert encode_png(image, {"parameters": "a"}, map_strips=pool.map) == shared
    assert encode_png(image, {"parameters": "a"}, map_strips=map) == shared


def test_text_is_tEXt_in_latin_1_and_iTXt_beyond_as_pillow_writes_it() -> None:
    image = _image("RGB", 8, 8, seed=1)
    for text, kind in (("Steps: 30, café", b"tEXt"), ("a cat 🐱, 猫\nNegative prompt: dog", b"iTXt")):
        data = encode_png(image, {"parameters": text})
        assert [k for k, _ in _chunks(data)] == [b"IHDR", kind, b"IDAT", b"IEND"]
        with Image.open(io.BytesIO(data)) as back:
            assert back.text == {"parameters": text}


def test_compresses_a_photo_like_image_as_well_as_pillow_at_the_same_level() -> None:
    image = _photo_like()
    pillow = io.BytesIO()
    image.save(pillow, format="PNG", compress_level=1)
    ours = encode_png(image, level=1)
    assert len(ours) <= 1.05 * len(pillow.getvalue()), (len(ours), len(pillow.getvalue()))


def test_other_modes_are_refused_here_and_go_through_pillow_in_encode_image() -> None:
    palette = Image.new("P", (16, 16), 3)
    with pytest.raises(ValueError, match="mode 'P'"):
        encode_png(palette)
    encoded = encode_image(palette, "png", 95, seed=1, parameters="Steps: 4")
    with Image.open(io.BytesIO(encoded.data)) as back:
        assert back.mode == "P"  # Pillow may renumber the palette: compare the colours
        assert np.array_equal(np.asarray(back.convert("RGB")), np.asarray(palette.convert("RGB")))
    assert read_parameters(encoded.data) == "Steps: 4"


def test_encode_image_writes_rgb_png_through_the_parallel_writer_with_its_parameters() -> None:
    image = _image("RGB", 64, 96, seed=3)
    encoded = encode_image(image, "png", 95, seed=5, parameters="prompt\nSteps: 4")
    assert encoded.data == encode_png(image, {"parameters": "prompt\nSteps: 4"}, level=1)
    assert read_parameters(encoded.data) == "prompt\nSteps: 4"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_forked_child_encodes_with_a_pool_of_its_own() -> None:
    image = _image("RGB", 40, 3 * STRIP_ROWS, seed=9)
    expected = encode_png(image)  # the parent's pool now has threads, which a fork does not copy
    child = os.fork()
    if child == 0:  # pragma: no cover (runs in the child)
        signal.alarm(30)  # a child stuck on the inherited pool dies (SIGALRM) instead of hanging the test
        os._exit(0 if encode_png(image) == expected else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


PNGCHECK = shutil.which("pngcheck")


@pytest.mark.skipif(PNGCHECK is None, reason="pngcheck (Debian package) is not installed; .ci/run installs it")
@given(
    prompt=st.text(
        st.characters(codec="utf-8", categories=("Cc", "Cs", "Zs", "Zl", "Lu", "Ll", "Nd", "Po")), max_size=60
    ),
    output_format=st.sampled_from(["png", "jpeg", "webp"]),
)
@settings(max_examples=25)
def test_any_prompt_gives_a_file_an_independent_strict_decoder_accepts(prompt: str, output_format: str) -> None:
    """pngcheck (libpng's strict cousin) rejects a text chunk with NUL; control characters never reach the file."""
    parameters = f"{prompt}\nNegative prompt: a\x00b\tc\r\nSteps: 3"
    encoded = encode_image(_image("RGB", 16, 8, 0), output_format, 90, 1, parameters)
    embedded = read_parameters(encoded.data)
    assert embedded is not None and not any((ord(c) < 32 and c != "\n") or 0x7F <= ord(c) <= 0x9F for c in embedded)
    assert "Negative prompt: ab c\nSteps: 3" in embedded  # NUL dropped, tab a space, CRLF a newline
    if output_format == "png":
        with tempfile.NamedTemporaryFile(suffix=".png") as file:
            file.write(encoded.data)
            file.flush()
            check = subprocess.run([PNGCHECK, "-v", file.name], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0 and "control character" not in check.stdout, check.stdout
