"""Inpainting without a model: how masks are read and matched, the crop, the fill, outpainting's canvas, and the
request fields (fuzzed). The jobs themselves are in tests/worker/test_inpainting.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from core.errors import InvalidRequest
from worker.generation import masks
from worker.request.input_images import open_image, to_mask
from worker.request.schema import parse_request

IMAGE = "aGk="  # any string: these requests are parsed, not run


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---- reading a mask --------------------------------------------------------------------------------------------------


def test_a_transparent_mask_is_its_opaque_part_cut_at_128_as_a1111() -> None:
    rgba = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    for x, alpha in enumerate((0, 128, 129, 255)):
        rgba.putpixel((x, 0), (10, 20, 30, alpha))  # dark colour: only the alpha can make it a mask
    assert list(to_mask(open_image(png(rgba))).getdata()) == [0, 0, 255, 255]


def test_an_opaque_or_grey_mask_keeps_its_levels() -> None:
    opaque = Image.new("RGBA", (2, 1), (255, 255, 255, 255))
    opaque.putpixel((1, 0), (100, 100, 100, 255))
    assert list(to_mask(open_image(png(opaque))).getdata()) == [255, 100]
    grey = Image.fromarray(np.array([[0, 64, 200]], np.uint8))
    assert list(to_mask(open_image(png(grey))).getdata()) == [0, 64, 200]
    deep = Image.fromarray(np.array([[0, 32768, 65535]], np.uint16))  # 16-bit grey: by its range, not clipped
    assert list(to_mask(open_image(png(deep))).getdata()) == [0, 128, 255]


def test_a_mask_is_matched_to_the_image_by_scale_only() -> None:
    mask = Image.new("L", (80, 60), 0)
    assert masks.match_size(mask, (80, 60), "mask") == (mask, None)
    resized, note = masks.match_size(mask, (160, 120), "mask")
    assert resized.size == (160, 120) and note == "resized from 80x60 to 160x120"
    assert masks.match_size(Image.new("L", (81, 60)), (160, 120), "mask")[0].size == (160, 120)  # rounding
    with pytest.raises(InvalidRequest, match=r"^invalid input: mask_url: the mask is 80x80 but the image is 160x120"):
        masks.match_size(Image.new("L", (80, 80)), (160, 120), "mask_url")


def test_a_resized_mask_has_no_halo() -> None:
    mask = Image.new("L", (40, 30), 0)
    mask.paste(255, (10, 10, 20, 20))
    resized = np.asarray(masks.match_size(mask, (120, 90), "mask")[0])
    assert resized[:, :25].max() == 0 and resized[:, 65:].max() == 0  # nothing far from the 30..60 square


# ---- crop, fill, paste -----------------------------------------------------------------------------------------------


@given(
    width=st.integers(64, 300),
    height=st.integers(64, 300),
    box=st.tuples(st.floats(0, 0.9), st.floats(0, 0.9), st.floats(0.05, 1), st.floats(0.05, 1)),
    target=st.tuples(st.integers(8, 256), st.integers(8, 256)),
    padding=st.integers(0, 64),
)
def test_the_crop_holds_the_padded_mask_within_the_image(width, height, box, target, padding) -> None:
    x1, y1 = int(box[0] * width), int(box[1] * height)
    x2, y2 = min(width, x1 + 1 + int(box[2] * width)), min(height, y1 + 1 + int(box[3] * height))
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (x1, y1, x2, y2))
    cx1, cy1, cx2, cy2 = masks.crop_region(mask, *target, padding)
    assert 0 <= cx1 <= max(0, x1 - padding) and 0 <= cy1 <= max(0, y1 - padding)
    assert min(width, x2 + padding) <= cx2 <= width and min(height, y2 + padding) <= cy2 <= height
    # Grown to the generation's aspect unless the image's side ends it. diffusers truncates the growth to whole
    # pixels, so the grown side may be one pixel short: an aspect error up to 1/h when the width grew and up to
    # ratio/h when the height grew.
    if cx2 - cx1 < width and cy2 - cy1 < height:
        ratio = target[0] / target[1]
        assert abs((cx2 - cx1) / (cy2 - cy1) - ratio) <= (1 + ratio) / (cy2 - cy1)


def test_fill_paints_the_masked_area_from_its_surroundings() -> None:
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    image.paste((0, 0, 255), (32, 0, 64, 32))
    image.paste((0, 255, 0), (24, 8, 40, 24))  # green under the mask: fill must not keep it
    mask = Image.new("L", (64, 32), 0)
    mask.paste(255, (24, 8, 40, 24))
    filled = np.asarray(masks.fill(image, mask)).astype(int)
    assert np.array_equal(filled[np.asarray(mask) == 0], np.asarray(image)[np.asarray(mask) == 0])
    inside = filled[8:24, 24:40]
    assert inside[..., 1].max() < 40 and inside[:, :4, 0].mean() > inside[:, -4:, 0].mean()  # red fades to blue


def test_the_whole_picture_pastes_from_half_the_mask_on() -> None:
    mask = Image.fromarray(np.array([[0, 1, 64, 127, 128, 255]], np.uint8))
    assert list(masks.doubled(mask).getdata()) == [0, 2, 128, 254, 255, 255]
    old, new = Image.new("RGB", (6, 1), (0, 0, 0)), Image.new("RGB", (6, 1), (255, 255, 255))
    assert [pixel[0] for pixel in masks.composite(old, new, mask).getdata()] == [0, 1, 64, 127, 128, 255]


def test_mask_stats_count_what_denoising_repaints_and_the_soft_edge() -> None:
    stats = masks.MaskStats.of(Image.fromarray(np.array([[0, 100, 127, 128, 255, 255, 0, 0]], np.uint8)))
    assert stats.masked == 3 / 8 and stats.soft == 3 / 8


# ---- outpainting's canvas --------------------------------------------------------------------------------------------


def test_the_outpaint_canvas_repeats_the_edge_and_masks_the_new_area_with_an_overlap() -> None:
    image = Image.fromarray(np.arange(12 * 10 * 3, dtype=np.uint8).reshape(10, 12, 3))
    canvas = masks.outpaint_canvas(image, None, (5, 0, 0, 3), overlap=2)
    pixels, mask, source = np.asarray(canvas.image), np.asarray(canvas.mask), np.asarray(image)
    assert canvas.image.size == canvas.mask.size == (17, 13) and canvas.offset == (5, 0)
    assert np.array_equal(pixels[:10, 5:], source)
    assert np.array_equal(pixels[:10, :5], np.repeat(source[:, :1], 5, axis=1))  # the left edge, repeated
    assert np.array_equal(pixels[10:, 5:], np.repeat(source[-1:], 3, axis=0))  # the bottom edge
    expected = np.full((13, 17), 255, np.uint8)
    expected[0:8, 7:17] = 0  # the original minus 2 pixels on the extended sides (left, bottom)
    assert np.array_equal(mask, expected)
    given_mask = Image.new("L", (12, 10), 0)
    given_mask.paste(255, (9, 0, 12, 2))  # a masked corner inside the original
    combined = np.asarray(masks.outpaint_canvas(image, given_mask, (5, 0, 0, 3), overlap=2).mask)
    assert combined[:2, 14:].min() == 255 and np.array_equal(combined[2:, :], expected[2:, :])


# ---- the request fields ----------------------------------------------------------------------------------------------


def test_a1111s_flags_and_defaults() -> None:
    plain = parse_request({"prompt": "x", "image_url": IMAGE})
    assert (plain.mask_blur, plain.inpainting_fill, plain.inpaint_full_res, plain.inpaint_full_res_padding) == (
        4,
        0,
        True,
        0,
    )
    assert plain.strength == 0.3 and not plain.is_inpainting  # the official worker's img2img default stays
    masked = parse_request({"image_url": IMAGE, "mask": IMAGE, "inpaint_full_res": 0, "inpainting_mask_invert": 1})
    assert masked.strength == 0.75 and masked.inpaint_full_res is False and masked.inpainting_mask_invert is True
    assert parse_request({"image_url": IMAGE, "outpaint": {"top": 8}, "strength": 0.5}).strength == 0.5
    assert parse_request({"image_url": IMAGE, "mask": "", "mask_url": None}).mask_source is None  # A1111's "none"


FIELD_VALUES = {
    "mask": st.one_of(st.none(), st.just(""), st.just(IMAGE), st.text(max_size=20)),
    "mask_url": st.one_of(st.none(), st.just(IMAGE), st.just("file:///etc/passwd"), st.just("ftp://x/y")),
    "mask_blur": st.one_of(st.integers(-5, 80), st.floats(allow_nan=True), st.text(max_size=3)),
    "inpainting_fill": st.one_of(st.integers(-2, 6), st.booleans(), st.none()),
    "inpaint_full_res": st.one_of(st.booleans(), st.integers(-1, 3), st.text(max_size=3)),
    "inpaint_full_res_padding": st.one_of(st.integers(-10, 3000), st.none()),
    "inpainting_mask_invert": st.one_of(st.booleans(), st.integers(-1, 3)),
    "outpaint": st.one_of(
        st.none(),
        st.dictionaries(
            st.sampled_from(["left", "right", "top", "bottom", "middle"]),
            st.one_of(st.integers(-10, 3000), st.floats(0, 10), st.text(max_size=2)),
        ),
        st.integers(),
    ),
    "image_url": st.one_of(st.none(), st.just(IMAGE)),
    "refiner": st.one_of(st.none(), st.booleans()),
}


@given(st.fixed_dictionaries({}, optional=FIELD_VALUES))
def test_any_inpainting_fields_parse_or_name_the_field_at_fault(fields: dict) -> None:
    try:
        request = parse_request({"prompt": "x", **fields})
    except InvalidRequest as error:
        text = str(error).removeprefix("invalid input: ")
        assert text.split(":", 1)[0].split(".", 1)[0].split("[", 1)[0] in FIELD_VALUES, text
        return
    if request.is_inpainting:
        assert request.image_url is not None and not request.refiner
        assert 0 <= request.mask_blur <= 64 and request.inpainting_fill in (0, 1, 2, 3)
    if request.outpaint is not None:
        assert any(request.outpaint.sides()) and all(0 <= side <= 2048 for side in request.outpaint.sides())
