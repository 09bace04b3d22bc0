"""Prompt editing across samplers and stages, as A1111 1.10 schedules it, checked on the UNets' own inputs.

Each test records the text conditioning every model call of the base and the refiner UNet receives (a forward hook),
identifies it as the plain encoding of one text, and compares that sequence of texts with what A1111 1.10 reads at
each call (tests/support/prompt_reference.py: its schedule over steps x step_multiplier, its per-call counter). Also
the scheduler table against A1111's second-order samplers and diffusers' real call counts, and the refiner metadata.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from core.errors import InvalidRequest
from tests.support.dev_pipes import one_torch_thread
from tests.support.prompt_reference import (
    A1111_FIRST_ORDER_SAMPLERS,
    A1111_SECOND_ORDER_SAMPLERS,
    a1111_prompt_schedule,
    a1111_schedule_steps,
    a1111_text_at_call,
)
from worker.generation.schedulers import build_scheduler
from worker.request.samplers import SAMPLERS, schedule_steps
from worker.request.schema import parse_request

one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

NEGATIVE = "blurry"
SMALL = {"width": 64, "height": 64, "seed": 5, "guidance_scale": 5.0, "negative_prompt": NEGATIVE}
CONFIG = Path(__file__).resolve().parents[2] / "model_build" / "configs" / "sdxl_base" / "scheduler"


# ---- the scheduler table ---------------------------------------------------------------------------------------------


def model_calls(name: str, steps: int) -> int:
    import json

    scheduler = build_scheduler(name, json.loads((CONFIG / "scheduler_config.json").read_text()), noise_seed=0)
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def stage_counts(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A stage's steps and model calls (its spacing and timesteps are tests/worker/test_sampling_jobs.py's)."""
    assert all(len(stage["timesteps"]) == stage["model_calls"] for stage in stages)  # one timestep per model call
    return [{key: stage[key] for key in ("model", "num_inference_steps", "steps", "model_calls")} for stage in stages]


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_each_sampler_counts_a1111_steps_as_diffusers_makes_model_calls(name: str) -> None:
    """A sampler counts 2 schedule steps per step exactly when diffusers makes two model calls per step (2N - 1
    for N steps) and A1111 1.10 declares the sampler second-order; its DPM++ 2S and PNDM are the documented others."""
    per_step = SAMPLERS[name].calls_per_step
    for steps in (1, 2, 5, 10):
        calls = model_calls(name, steps)
        if name == "PNDM":
            assert calls == (steps + 1 if steps > 1 else 1)  # the PLMS warm-up call, as A1111's PLMS makes
        else:
            assert calls == per_step * steps - (per_step - 1), (name, steps, calls)
        assert schedule_steps(name, steps) == per_step * steps
    if name in A1111_SECOND_ORDER_SAMPLERS | A1111_FIRST_ORDER_SAMPLERS:
        assert schedule_steps(name, 7) == a1111_schedule_steps(name, 7)
        assert schedule_steps(f"{name} Karras", 7) == a1111_schedule_steps(f"{name} Karras", 7)  # combined names
    else:
        assert per_step == 1  # DPM++ 2S (N calls: not A1111's ancestral "DPM++ 2S a"), DDPM, PNDM, DEIS, TCD


# ---- recording what the UNets receive --------------------------------------------------------------------------------


class Calls:
    """The positive text conditioning of every call of a UNet (guidance on: the batch is negatives, then positives)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.embeds: list[torch.Tensor] = []
        self.handle = unet.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        hidden = kwargs["encoder_hidden_states"]
        self.embeds.append(hidden[hidden.shape[0] // 2 :].clone())


@pytest.fixture(scope="module")
def engine(dev_model_dir: Path, dev_refiner_dir: Path):
    from worker.generation.engine import Engine

    return Engine(dev_model_dir, refiner_dir=dev_refiner_dir)


def run(engine, job: dict[str, Any]) -> tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]:
    """(the job's metadata, the base UNet's calls, the refiner UNet's calls)."""
    base, refiner = Calls(engine.pipe.unet), Calls(engine.refiner.unet)
    try:
        result = engine.generate(parse_request({**SMALL, **job}))
    finally:
        base.handle.remove()
        refiner.handle.remove()
    return result.metadata.to_dict(), base.embeds, refiner.embeds


def texts_read(engine, calls: list[torch.Tensor], candidates: set[str], refiner: bool = False) -> list[str]:
    """Which candidate text's plain encoding each call received (the refiner reads the second encoder's features)."""
    first = engine.pipe.text_encoder.config.hidden_size if refiner else 0
    plain = {text: engine.prompt_encoder.encode(text, negative_prompt=NEGATIVE).prompt_embeds for text in candidates}
    read = []
    for embeds in calls:
        found = [text for text, tensor in plain.items() if torch.equal(embeds[:1], tensor[..., first:])]
        assert len(found) == 1, f"a call read none or several of {sorted(candidates)}: {found}"
        read.append(found[0])
    return read


def a1111_texts(prompt: str, sampler: str, steps: int, calls: range) -> list[str]:
    schedule = a1111_prompt_schedule(prompt, a1111_schedule_steps(sampler, steps))
    return [a1111_text_at_call(schedule, call) for call in calls]


def candidates(prompt: str, steps: int) -> set[str]:
    return {text for _, text in a1111_prompt_schedule(prompt, steps)}


# ---- second-order samplers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sampler", "prompt"),
    [
        ("Heun", "a [red:blue:0.5] cube"),  # issue 24: A1111 red x5 blue x2 (here it was red x3 blue x4)
        ("Heun", "a [red|blue] cube"),  # issue 24: the alternation stopped after call 4
        ("DPM2 a", "a [red:blue:3] cube"),
        ("DPM++ SDE Karras", "a [red:blue:0.3] [x|y|z] cube"),
        ("Euler", "a [red:blue:0.5] [x|y] cube"),
        ("DPM++ 2S", "a [red:blue:0.5] cube"),
    ],
)
def test_every_model_call_reads_a1111s_text(engine, sampler: str, prompt: str) -> None:
    metadata, calls, _ = run(
        engine, {"prompt": prompt, "scheduler": sampler, "num_inference_steps": 4, "refiner": False}
    )
    # diffusers' DPM++ 2S makes one call per step: what A1111 does for a first-order sampler such as Euler.
    expected = a1111_texts(prompt, "Euler" if sampler == "DPM++ 2S" else sampler, 4, range(len(calls)))
    assert texts_read(engine, calls, candidates(prompt, schedule_steps(sampler, 4))) == expected
    per_step = schedule_steps(sampler, 1)
    assert len(calls) == 4 * per_step - (per_step - 1)
    assert stage_counts(metadata["stages"]) == [
        {"model": "base", "num_inference_steps": 4, "steps": 4, "model_calls": len(calls)}
    ]
    if prompt == "a [red:blue:0.5] cube" and sampler == "Heun":
        assert expected == ["a red cube"] * 5 + ["a blue cube"] * 2


# ---- the refiner continues the schedule ------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["Euler", "DDIM", "Heun"])
def test_ensemble_refiner_continues_the_base_schedule_as_one_a1111_run(engine, sampler: str) -> None:
    """With as many refiner steps as base steps the two stages are one run: the refiner's calls take over the
    counter where the base's stopped (A1111 switches the model inside one sampling run and counts on)."""
    prompt = "a [red:blue:0.5] [x|y|z] cube"
    job = {"prompt": prompt, "scheduler": sampler, "num_inference_steps": 6, "refiner_inference_steps": 6}
    metadata, base, refined = run(engine, {**job, "high_noise_frac": 0.5})
    texts = candidates(prompt, schedule_steps(sampler, 6))
    skipped = model_calls(sampler, 6) - len(refined)  # the refiner's schedule is the base's: same scheduler, steps
    assert texts_read(engine, base, texts) == a1111_texts(prompt, sampler, 6, range(len(base)))
    read = texts_read(engine, refined, texts, refiner=True)
    assert read == a1111_texts(prompt, sampler, 6, range(skipped, skipped + len(refined)))
    assert len(set(read)) > 1  # the refiner edits on (it read the final text at every call)
    if sampler == "Heun":  # diffusers hands over inside a step; the refiner redoes that step's first call
        assert skipped == len(base) - 1
    else:  # first-order: the refiner's first call is exactly the base's next one
        assert skipped == len(base)
    refiner_runs = metadata["prompt"]["schedule"]["calls"][1]["runs"]
    assert refiner_runs[0]["schedule_steps"][0] == skipped and refiner_runs[-1]["calls"][1] == len(refined) - 1


def test_refiner_with_its_own_step_count_maps_by_the_fraction_of_the_schedule(engine) -> None:
    prompt = "[red:blue:0.5] [x|y] cube"
    job = {"prompt": prompt, "scheduler": "Euler", "num_inference_steps": 4, "refiner_inference_steps": 8}
    metadata, _, refined = run(engine, {**job, "high_noise_frac": 0.5})
    skipped = 8 - len(refined)  # the last part of the refiner's own 8-step schedule runs
    schedule_steps_read = [(skipped + call) * 4 // 8 for call in range(len(refined))]  # the same fraction of 4 steps
    read = texts_read(engine, refined, candidates(prompt, 4), refiner=True)
    assert read == a1111_texts(prompt, "Euler", 4, schedule_steps_read)
    (stage,) = [s for s in metadata["prompt"]["schedule"]["calls"] if s["model"] == "refiner"]
    assert stage["runs"][0]["schedule_steps"][0] == schedule_steps_read[0]
    assert stage["runs"][-1]["schedule_steps"][1] == schedule_steps_read[-1]


def test_refining_at_strength_continues_the_schedule_from_where_strength_starts(engine) -> None:
    prompt = "a [red:blue:0.5] cube"
    job = {"prompt": prompt, "scheduler": "Euler", "num_inference_steps": 4, "refiner_inference_steps": 4}
    metadata, base, refined = run(engine, {**job, "strength": 0.5})
    assert len(base) == 4 and len(refined) == 2  # int(4 x 0.5) refiner steps: the last two of its schedule
    assert texts_read(engine, refined, candidates(prompt, 4), refiner=True) == a1111_texts(
        prompt, "Euler", 4, range(2, 4)
    )
    assert metadata["refiner"]["mode"] == "refine" and metadata["refiner"]["strength"] == 0.5


def png_data(size: tuple[int, int] = (64, 64)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (40, 120, 200)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("refiner", [False, True])
def test_img2img_edits_on_either_model_as_a1111s_img2img(engine, refiner: bool) -> None:
    """Issue 24: img2img through the refiner used the final text at every call (4 of 4). As A1111's img2img: the
    schedule spans the requested steps and its counter starts at the first call that runs."""
    prompt = "a [red:blue:1] cube"
    steps_field = "refiner_inference_steps" if refiner else "num_inference_steps"
    job = {"prompt": prompt, "image_url": png_data(), "strength": 0.75, steps_field: 4, "refiner": refiner}
    metadata, base, refined = run(engine, job)
    calls = refined if refiner else base
    assert len(calls) == 3 and not (base if refiner else refined)  # int(4 x 0.75)
    read = texts_read(engine, calls, candidates(prompt, 4), refiner=refiner)
    assert read == a1111_texts(prompt, "DDIM", 4, range(3)) == ["a red cube", "a red cube", "a blue cube"]
    assert metadata["img2img"]["steps"] == 3 and metadata["img2img"]["num_inference_steps"] == 4
    assert metadata["prompt"]["schedule"]["calls"] == [
        {
            "model": "refiner" if refiner else "base",
            "runs": [
                {"calls": [0, 1], "schedule_steps": [0, 1], "texts": 0},
                {"calls": [2, 2], "schedule_steps": [2, 2], "texts": 1},
            ],
        }
    ]


# ---- what the metadata says ran --------------------------------------------------------------------------------------


def test_refiner_metadata_reports_what_ran(engine) -> None:
    job = {"prompt": "a cube", "scheduler": "Euler", "num_inference_steps": 4, "refiner_inference_steps": 4}
    ensemble, base, refined = run(engine, {**job, "high_noise_frac": 0.5})
    assert ensemble["refiner"] | {"model": None} == {
        "used": True,
        "model": None,
        "mode": "ensemble",
        "refiner_inference_steps": 4,
        "high_noise_frac": 0.5,
        "strength": None,
        "steps": len(refined),
        "model_calls": len(refined),
    }
    assert stage_counts(ensemble["stages"]) == [
        {"model": "base", "num_inference_steps": 4, "steps": len(base), "model_calls": len(base)},
        {"model": "refiner", "num_inference_steps": 4, "steps": len(refined), "model_calls": len(refined)},
    ]
    assert len(base) + len(refined) == 4

    # img2img through the refiner: strength was used and high_noise_frac ignored (it reported strength null).
    image_job = {**job, "image_url": png_data(), "refiner": True, "strength": 0.5, "high_noise_frac": 0.8}
    img2img, _, refined = run(engine, image_job)
    assert img2img["refiner"]["mode"] == "img2img" and img2img["refiner"]["strength"] == 0.5
    assert img2img["refiner"]["high_noise_frac"] is None and img2img["refiner"]["steps"] == 2 == len(refined)
    assert img2img["refiner"]["ignored"]["high_noise_frac"] == 0.8
    assert stage_counts(img2img["stages"]) == [
        {"model": "refiner", "num_inference_steps": 4, "steps": 2, "model_calls": 2}
    ]

    # Second-order: steps begun are half the model calls, rounded up.
    heun, base, _ = run(engine, {**job, "scheduler": "Heun", "refiner": False})
    assert stage_counts(heun["stages"]) == [{"model": "base", "num_inference_steps": 4, "steps": 4, "model_calls": 7}]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        # Issue 24: 0.999999 ran no refiner step and reported the refiner used.
        (
            {"high_noise_frac": 0.999999},
            r"high_noise_frac: 0\.999999 with refiner_inference_steps 4 leaves the refiner",
        ),
        ({"high_noise_frac": 0.01}, r"high_noise_frac: 0\.01 with num_inference_steps 4 leaves the base model no"),
        ({"high_noise_frac": 0.8, "num_inference_steps": 1}, r"num_inference_steps 1 leaves the base model no"),
    ],
)
def test_a_split_that_leaves_a_model_no_step_is_refused(engine, fields: dict[str, Any], message: str) -> None:
    request = parse_request({**SMALL, "prompt": "x", "num_inference_steps": 4, "refiner_inference_steps": 4, **fields})
    with pytest.raises(InvalidRequest, match=message):
        engine.check_request(request)
    with pytest.raises(InvalidRequest, match=message):
        engine.generate(request)


def test_each_job_gets_its_schedulers_from_the_models_own_configs(engine) -> None:
    """A Karras job's scheduler config must not become the next job's: img2img and the refiner built their
    schedulers from the pipeline's current one, the previous job's."""
    image = png_data()
    for refiner in (False, True):
        job = {"prompt": "x", "image_url": image, "strength": 0.5, "num_inference_steps": 2, "refiner": refiner}
        job["refiner_inference_steps"] = 2
        engine.generate(parse_request({**SMALL, **job, "scheduler": "Euler Karras"}))
        engine.generate(parse_request({**SMALL, **job, "scheduler": "Euler"}))
        pipe = engine.refiner if refiner else engine.img2img
        assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
        assert not pipe.scheduler.config.use_karras_sigmas
