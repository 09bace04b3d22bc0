"""Inpainting and outpainting through the handler on the dev model: what stays the input's, what the metadata says,
how masks are read, and every bad input as a clear error that leaves the next job as it would have been.

The guarantee checked (A1111 1.10's overlay): every pixel where the blurred mask is 0 is the input's own pixel, in
both inpaint areas. Mask arithmetic without a model is in tests/worker/test_inpainting_masks.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from core.settings import load_settings
from model_build.dev_lora import write_dev_lora
from tests.support.dev_pipes import one_torch_thread
from tests.support.inpainting_images import BOX, JOB, SIZE, data_uri, decoded, picture, rectangle
from tests.support.prompt_reference import a1111_prompt_schedule, a1111_schedule_steps, a1111_text_at_call
from worker.generation import masks
from worker.handler import Worker

one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def lora_dir(dev_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inpaint-loras")
    write_dev_lora(dev_model_dir, root / "style.safetensors", seed=5)
    return root


@pytest.fixture(scope="module")
def worker(dev_model_dir: Path, lora_dir: Path, dev_controlnet_root: Path) -> Worker:
    worker = Worker(load_settings({"LORA_DIR": str(lora_dir), "CONTROLNET_DIR": str(dev_controlnet_root)}))
    worker.start(dev_model_dir)
    assert worker.startup_error is None, worker.startup_error
    return worker


def run(worker: Worker, **fields: Any) -> dict[str, Any]:
    job = {**JOB, "image_url": data_uri(picture()), "mask": data_uri(rectangle()), **fields}
    return worker.handle({"id": "inpaint", "input": {key: value for key, value in job.items() if value is not None}})


def untouched(mask: Image.Image, blur: int = 4) -> np.ndarray:
    """Where the blurred mask is 0: the pixels A1111's overlay keeps (a large area, so the check says something)."""
    keep = np.asarray(mask.filter(ImageFilter.GaussianBlur(blur)) if blur else mask) == 0
    assert 0.5 < keep.mean() < 0.95
    return keep


# ---- the modes -------------------------------------------------------------------------------------------------------

MODES = {
    "only-masked-fill": {},  # A1111's API defaults: inpaint_full_res, padding 0, fill
    "whole-original": {"inpaint_full_res": False, "inpainting_fill": 1},
    "only-masked-latent-noise": {"inpaint_full_res": 1, "inpainting_fill": 2, "inpaint_full_res_padding": 16},
    "whole-latent-nothing-inverted": {
        "inpaint_full_res": 0,
        "inpainting_fill": 3,
        "inpainting_mask_invert": 1,
        "mask": data_uri(Image.eval(rectangle(), lambda v: 255 - v)),
    },
}


@pytest.mark.parametrize("fields", MODES.values(), ids=MODES.keys())
def test_unmasked_pixels_stay_the_inputs_and_the_metadata_says_what_ran(worker: Worker, fields: dict) -> None:
    out = run(worker, **fields)
    result, source = decoded(out).astype(int), np.asarray(picture()).astype(int)
    assert result.shape == source.shape  # the output is the input's size
    keep = untouched(rectangle())
    assert np.array_equal(result[keep], source[keep])
    inside = np.zeros(keep.shape, bool)
    inside[BOX[1] : BOX[3], BOX[0] : BOX[2]] = True
    assert np.abs(result[inside] - source[inside]).mean() > 10  # the dev model paints noise there

    metadata = out["metadata"]
    info = metadata["inpainting"]
    assert metadata["mode"] == "inpaint" and metadata["refiner"]["used"] is False
    assert info["fill"] == ("fill", "original", "latent noise", "latent nothing")[fields.get("inpainting_fill", 0)]
    assert info["strength"] == 0.75 and info["num_inference_steps"] == 4 and info["steps"] == 3  # A1111's default
    assert info["mask"]["masked_fraction"] == pytest.approx(48 * 48 / (160 * 128))
    assert info["mask"]["inverted"] is bool(fields.get("inpainting_mask_invert"))
    assert info["generation_size"] == list(SIZE) and info["input_size"] == list(SIZE) and info["model"] == "base"
    if info["inpaint_full_res"]:
        x1, y1, x2, y2 = info["crop_box"]
        assert x1 <= BOX[0] - 4 and y1 <= BOX[1] - 4 and x2 >= BOX[2] + 4 and y2 >= BOX[3] + 4  # the blurred edge
        assert abs((x2 - x1) / (y2 - y1) - SIZE[0] / SIZE[1]) < 0.05 and info["padding"] == fields.get(
            "inpaint_full_res_padding", 0
        )
    else:
        assert info["crop_box"] is None and info["padding"] is None


def test_a_grey_mask_repaints_from_50_percent_and_pastes_back_by_its_level(worker: Worker) -> None:
    """Grey levels are soft: denoising repaints where the mask reaches 50% (as with white), the paste-back mixes
    new and old pixels by the level. So a uniform grey 200 mask gives the white mask's image blended 200/255 into
    the original (no blur, original content: the two runs denoise the same)."""
    whole = (0, 0, *SIZE)
    fields = {"mask_blur": 0, "inpainting_fill": 1, "inpaint_full_res": True}
    white = decoded(run(worker, mask=data_uri(rectangle(box=whole)), **fields)).astype(float)
    out = run(worker, mask=data_uri(rectangle(box=whole, level=200)), **fields)
    grey = decoded(out).astype(float)
    source = np.asarray(picture()).astype(float)
    assert np.abs(grey - (white * 200 + source * 55) / 255).max() <= 1.0  # Pillow's composite rounds
    assert out["metadata"]["inpainting"]["mask"]["soft_fraction"] == 1.0


def test_outpainting_extends_the_canvas_around_the_untouched_original(worker: Worker) -> None:
    sides = {"left": 32, "right": 0, "top": 0, "bottom": 24}
    out = run(worker, mask=None, outpaint=sides, inpaint_full_res=False, num_images=2)
    width, height = SIZE[0] + 32, SIZE[1] + 24
    first, second = decoded(out, 0).astype(int), decoded(out, 1).astype(int)
    assert first.shape == second.shape == (height, width, 3) and not np.array_equal(first, second)
    # The original sits at (32, 0); the mask reaches 2 x mask_blur into it, then blurs: beyond that it is kept.
    canvas_mask = Image.new("L", (width, height), 255)
    canvas_mask.paste(0, (32 + 8, 0, width, SIZE[1] - 8))
    keep = untouched(canvas_mask)
    placed = np.zeros((height, width, 3), int)
    placed[:128, 32:] = np.asarray(picture())
    assert np.array_equal(first[keep], placed[keep]) and np.array_equal(second[keep], placed[keep])
    assert np.abs(first[100:, :20] - placed[100:, :20]).mean() > 10  # the new corner is painted
    info = out["metadata"]["inpainting"]
    assert out["metadata"]["mode"] == "outpaint" and info["outpaint"]["canvas"] == [width, height]
    assert info["outpaint"]["offset"] == [32, 0] and info["mask"]["field"] is None
    assert info["generation_size"] == [width, height] and info["fill"] == "fill"


def test_a_mask_of_the_images_aspect_is_resized_with_a_note(worker: Worker) -> None:
    small = rectangle((80, 64), tuple(side // 2 for side in BOX))
    out = run(worker, mask_url=data_uri(small), mask=None, inpaint_full_res=False)
    assert out["metadata"]["inpainting"]["mask"]["resized"] == "resized from 80x64 to 160x128"
    assert out["metadata"]["inpainting"]["mask"]["field"] == "mask_url"
    keep = untouched(rectangle(box=(BOX[0] - 2, BOX[1] - 2, BOX[2] + 2, BOX[3] + 2)))  # a resized edge is soft
    assert np.array_equal(decoded(out)[keep], np.asarray(picture())[keep])


def test_long_prompts_prompt_editing_and_loras_carry_over(worker: Worker) -> None:
    """The inpainting pipeline's calls read A1111's img2img schedule (counted from the first call that runs), long
    prompts keep their chunks, LoRAs apply."""
    engine = worker.engine
    prompt = "a [red:blue:0.25] door, " + ", ".join(["a weathered wooden door in an old stone wall"] * 8)
    texts = {text for _, text in a1111_prompt_schedule(prompt, 4)}
    plain = {t: engine.prompt_encoder.encode(t, negative_prompt="blur").prompt_embeds for t in texts}
    seen: list[str] = []

    def record(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        hidden = kwargs["encoder_hidden_states"]
        positive = hidden[hidden.shape[0] // 2 :][:1]
        seen.extend(text for text, embeds in plain.items() if torch.equal(positive, embeds))

    handle = engine.pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        plain_job = run(worker, prompt=prompt)
    finally:
        handle.remove()
    schedule = a1111_prompt_schedule(prompt, a1111_schedule_steps("DDIM", 4))
    assert seen == [a1111_text_at_call(schedule, call) for call in range(3)] and len(set(seen)) == 2
    assert plain_job["metadata"]["prompt"]["num_chunks"] >= 2
    with_lora = run(worker, prompt=prompt, loras=[{"name": "style", "scale": 0.7}])
    assert with_lora["metadata"]["loras"][0]["name"] == "style"
    keep = untouched(rectangle())
    assert np.array_equal(decoded(with_lora)[keep], decoded(plain_job)[keep])  # the LoRA changes only the masked area
    assert not np.array_equal(decoded(with_lora), decoded(plain_job))


def test_the_pipeline_reads_the_mask_as_latent_cells_says() -> None:
    """masks.latent_cells (the metadata's repainted share, the thin-mask check) is what diffusers' inpainting
    pipeline makes of a mask: its mask processor, then its interpolation to the latent grid."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    rng = np.random.default_rng(3)
    mask = Image.fromarray(rng.integers(0, 256, (96, 128), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(3))
    binary = processor.preprocess(mask, height=96, width=128)
    cells = torch.nn.functional.interpolate(binary, size=(12, 16))[0, 0].numpy() > 0.5
    assert np.array_equal(cells, masks.latent_cells(mask)) and 0 < cells.mean() < 1


# ---- bad input -------------------------------------------------------------------------------------------------------

OTHER_ASPECT = data_uri(rectangle((128, 128), (10, 10, 60, 60)))
BAD = {
    "mask without an image": (
        {"image_url": None},
        "invalid input: mask: inpainting needs the image to paint into; send image_url with it",
    ),
    "mask and mask_url": ({"mask_url": OTHER_ASPECT}, "mask_url: the same field as mask under another name"),
    "another aspect": ({"mask": OTHER_ASPECT}, "mask: the mask is 128x128 but the image is 160x128, another aspect"),
    "empty": ({"mask": data_uri(Image.new("L", SIZE, 0))}, "mask: the mask is all black: nothing to inpaint"),
    "empty inverted": (
        {"mask_url": data_uri(Image.new("L", SIZE, 255)), "mask": None, "inpainting_mask_invert": True},
        "mask_url: the mask is all white (inpainting_mask_invert repaints the black part): nothing to inpaint",
    ),
    "too faint": (
        {"mask": data_uri(rectangle(level=100)), "inpaint_full_res": False},
        "mask: after mask_blur 4 no 8x8 cell of the 160x128 generation reaches 50% of the mask",
    ),
    "not an image": ({"mask": "bm90IGFuIGltYWdl"}, "mask: not a readable image; send a PNG, JPEG or WebP"),
    "a local path": ({"mask_url": "file:///etc/passwd", "mask": None}, "mask_url: only http(s) URLs, data URIs"),
    "refiner": ({"refiner": True}, "refiner: inpainting runs on the base model"),
    "outpaint nothing": ({"outpaint": {"left": 0}}, "outpaint: adds no pixels"),
    "outpaint past the budget": (
        {"mask": None, "outpaint": {"left": 2048, "right": 2048, "top": 2048, "bottom": 2048}, "width": 512},
        "outpaint: the result would be 4256x4224 x 1 image(s) = 17977344 pixels, over this worker's budget",
    ),
    "outpaint without a size": (
        {"mask": None, "outpaint": {"right": 2048}},
        "outpaint: the picture to paint is 2208x128; without width/height the model runs at its size",
    ),
    "controlnets": (
        {"controlnets": [{"name": "dev-controlnet", "image": data_uri(picture())}]},
        "controlnets: inpainting with ControlNets is not available yet",
    ),
    "fill out of range": ({"inpainting_fill": 4}, "inpainting_fill: Input should be less than or equal to 3"),
}


def test_bad_input_is_a_clear_error_and_the_next_job_is_unchanged(worker: Worker) -> None:
    before = run(worker, num_images=1)
    for name, (fields, message) in BAD.items():
        if "width" in fields:
            fields = {**fields, "height": 512}
        out = run(worker, **fields)
        assert set(out) == {"error"} and message in out["error"], (name, out)
    after = run(worker, num_images=1)
    assert after["images"] == before["images"]
