"""A 9-channel inpainting model (the dev inpainting checkpoint, converted) through the batch runner's local engine:
masked and outpainted lines run through the UNet's extra channels and keep their unmasked pixels; a line without a
mask is an error record naming ``mask`` (the model cannot make a plain image) and the others still succeed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from batch_testing import one_torch_thread, read_json, sidecars, write_jsonl
from PIL import Image, ImageFilter

from batch.execute import run_shard
from batch.exit_codes import EXIT_INVALID_LINES
from batch.options import LocalEngineOptions, RunOptions
from tests.support.inpainting_images import SIZE, data_uri, picture, rectangle

BASE = {"prompt": "a red door", "num_inference_steps": 2, "guidance_scale": 3.0, "negative_prompt": "blur"}


def lines() -> list[dict[str, Any]]:
    image, mask = data_uri(picture()), data_uri(rectangle())
    return [
        {"id": "masked-0", **BASE, "image_url": image, "mask": mask, "seed": 1},
        {"id": "unmasked", **BASE, "image_url": image, "seed": 2},  # img2img: not what an inpainting model does
        {"id": "masked-1", **BASE, "image_url": image, "mask": mask, "inpaint_full_res": False, "seed": 3},
        {"id": "text-only", **BASE, "width": 64, "height": 64, "seed": 4},
        {"id": "outpaint", **BASE, "image_url": image, "outpaint": {"left": 16}, "seed": 5},
    ]


@pytest.fixture(scope="module")
def run(dev_inpaint_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, list[int]]:
    from worker.generation.engine import Engine

    with one_torch_thread():
        engine = Engine(dev_inpaint_model_dir)
    channels: list[int] = []  # the UNet's input channels at every call: 9 (latents, mask, masked image's latents)
    hook = engine.pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: channels.append((args[0] if args else kwargs["sample"]).shape[1]),
        with_kwargs=True,
    )
    folder = tmp_path_factory.mktemp("inpaint-model")
    source = write_jsonl(folder / "jobs.jsonl", lines())
    out = folder / "out"
    try:
        with one_torch_thread():
            summary = run_shard(
                RunOptions(source, out, progress=False), LocalEngineOptions(batch_size=2, engine=engine)
            )
    finally:
        hook.remove()
    return summary, out, channels


def test_masked_lines_run_through_the_nine_channel_unet_and_keep_their_unmasked_pixels(run) -> None:
    _, out, channels = run
    made = sidecars(out)
    assert set(made) == {"masked-0", "masked-1", "outpaint"}
    assert channels and set(channels) == {9}
    keep = np.asarray(rectangle().filter(ImageFilter.GaussianBlur(4))) == 0
    for item_id in ("masked-0", "masked-1"):
        metadata = made[item_id]["metadata"]
        assert metadata["mode"] == "inpaint" and metadata["inpainting"]["model"] == "inpainting", item_id
        (image,) = made[item_id]["images"]
        result = np.asarray(Image.open(out / image["file_name"]).convert("RGB"))
        assert result.shape[:2] == (SIZE[1], SIZE[0]) and np.array_equal(result[keep], np.asarray(picture())[keep])
    (image,) = made["outpaint"]["images"]
    outpainted = np.asarray(Image.open(out / image["file_name"]).convert("RGB"))
    assert outpainted.shape[:2] == (SIZE[1], SIZE[0] + 16) and made["outpaint"]["metadata"]["mode"] == "outpaint"
    # The mask covers the new border and 2 x mask_blur of the original, then blurs: beyond that, the input's pixels.
    border = Image.new("L", (SIZE[0] + 16, SIZE[1]), 0)
    border.paste(255, (0, 0, 16 + 8, SIZE[1]))
    keep = np.asarray(border.filter(ImageFilter.GaussianBlur(4))) == 0
    placed = np.zeros_like(outpainted)
    placed[:, 16:] = np.asarray(picture())
    assert 0.6 < keep.mean() < 0.9 and np.array_equal(outpainted[keep], placed[keep])
    assert np.abs(outpainted[:, :8].astype(int) - placed[:, 16:24]).mean() > 10  # the new border is painted


def test_lines_without_a_mask_are_error_records_naming_mask(run) -> None:
    summary, out, _ = run
    # Refused by the engine as each line is planned (the model, not the schema, says no): failed lines, not invalid
    # ones, and the run's exit code is the one for lines that running again cannot fix.
    assert (summary.made, summary.failed, summary.invalid_lines, summary.exit_code) == (3, 2, 0, EXIT_INVALID_LINES)
    errors = {read_json(path)["id"]: read_json(path)["error"] for path in (out / "errors").iterdir()}
    assert set(errors) == {"unmasked", "text-only"}
    for error in errors.values():
        assert error.startswith("invalid input: mask: this worker serves sdxl-dev-inpaint, an SDXL inpainting"), error
