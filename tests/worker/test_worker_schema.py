"""The request schema: strict, bounded, and every error names the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import InvalidRequest
from tests.support.official_worker import OFFICIAL_HUB_TEST, OFFICIAL_TEST_INPUT
from worker.generation.schedulers import build_scheduler
from worker.request.fields import MAX_RANDOM_SEED, MAX_SEED, Scope, draw_seed
from worker.request.samplers import SAMPLERS, split_combined
from worker.request.schema import GROUP_FIELDS, GenerationRequest, field_scope, parse_request

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)

BOUNDS = {
    "height": (64, 2048),
    "width": (64, 2048),
    "num_inference_steps": (1, 500),
    "num_images": (1, 8),
    "quality": (1, 100),
    "seed": (-1, MAX_SEED),  # -1: random (None), as A1111 clients send it
    "clip_skip": (0, 2**70),  # only >= 0 here: the model's own bound is the prompt encoder's (test_worker_handler)
}


def test_defaults_match_the_official_worker() -> None:
    request = parse_request({"prompt": "a cat"})
    assert (request.width, request.height, request.num_inference_steps, request.guidance_scale) == (1024, 1024, 25, 7.5)
    assert request.num_images == 1 and request.seed is None and request.output_format == "png"


@given(json_values)
def test_arbitrary_json_is_accepted_or_refused_with_a_message(payload: object) -> None:
    try:
        request = parse_request(payload)
    except InvalidRequest as error:
        message = str(error)
        assert message and "Traceback" not in message
    else:
        assert isinstance(request, GenerationRequest)


@given(
    field=st.sampled_from(sorted(BOUNDS)),
    value=st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True), st.booleans()),
)
def test_numbers_are_accepted_only_in_range(field: str, value: object) -> None:
    low, high = BOUNDS[field]
    # Small sizes keep the pixel budget out of this property; sides must also be multiples of 8.
    payload = {"prompt": "x", "width": 512, "height": 512, field: value}
    in_range = type(value) is int and low <= value <= high and (field not in ("width", "height") or value % 8 == 0)
    if in_range:
        assert getattr(parse_request(payload), field) == (None if (field, value) == ("seed", -1) else value)
    else:
        with pytest.raises(InvalidRequest) as error:
            parse_request(payload)
        assert field in str(error.value)


@given(value=st.floats(allow_nan=True, allow_infinity=True))
def test_guidance_scale_bounds(value: float) -> None:
    payload = {"prompt": "x", "guidance_scale": value}
    if 0.0 <= value <= 100.0:
        assert parse_request(payload).guidance_scale == value
    else:
        with pytest.raises(InvalidRequest, match="guidance_scale"):
            parse_request(payload)


def test_messages_name_field_value_and_range() -> None:
    with pytest.raises(InvalidRequest) as error:
        parse_request({"prompt": "x", "num_inference_steps": 1000})
    assert "num_inference_steps" in str(error.value) and "1000" in str(error.value) and "1..500" in str(error.value)


def test_unknown_keys_are_errors_that_list_the_allowed_ones() -> None:
    with pytest.raises(InvalidRequest) as error:
        parse_request({"prompt": "x", "refiner_inference_steps": 50, "colour": "red"})
    message = str(error.value)
    assert message.startswith("invalid input: colour: unknown field (a request takes: ") and "prompt, " in message
    assert "refiner_inference_steps" not in message.split("(")[0]  # an official field is no error


def test_unknown_key_in_a_lora_entry_names_the_lora_fields() -> None:
    with pytest.raises(InvalidRequest) as error:
        parse_request({"prompt": "x", "loras": [{"name": "a", "weight": 1}]})
    assert "loras.0.weight: unknown field (a LoRA entry takes: name, scale, sha256)" in str(error.value)


def test_the_official_sample_payload_is_accepted_with_its_meaning() -> None:
    assert parse_request(OFFICIAL_HUB_TEST).seed == 1337
    request = parse_request(OFFICIAL_TEST_INPUT)
    assert (request.refiner_inference_steps, request.high_noise_frac, request.strength) == (50, 0.8, 0.3)
    assert request.image_url is None and not request.is_img2img and request.scheduler == "Euler"
    assert request.refiner is None  # the refiner runs when the worker has one, as the official worker always does


def test_official_defaults_and_every_official_scheduler_name() -> None:
    request = parse_request({"prompt": "x"})
    assert (request.refiner_inference_steps, request.strength, request.high_noise_frac, request.scheduler) == (
        50,
        0.3,
        None,
        "DDIM",
    )
    official = ["PNDM", "KLMS", "DDIM", "K_EULER", "K_EULER_ANCESTRAL", "DPMSolverMultistep", "DPMSolverSinglestep"]
    for name in official:
        request = parse_request({"prompt": "x", "scheduler": name})
        assert request.scheduler in SAMPLERS and request.sampling.sampler == request.scheduler


@pytest.mark.parametrize(
    ("field", "value"),
    [("strength", 0), ("strength", 1.5), ("high_noise_frac", 1.5), ("refiner_inference_steps", 0), ("refiner", "yes")],
)
def test_refiner_and_img2img_fields_are_bounded(field: str, value: object) -> None:
    with pytest.raises(InvalidRequest, match=field):
        parse_request({"prompt": "x", field: value})


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://host/x.png", "s3://bucket/key.png"])
def test_image_url_never_names_a_local_file_or_another_scheme(url: str) -> None:
    with pytest.raises(InvalidRequest, match="image_url"):
        parse_request({"prompt": "x", "image_url": url})


def test_size_given_tells_img2img_whether_to_follow_the_input_image() -> None:
    assert not parse_request({"prompt": "x", "image_url": "aGVsbG8="}).size_given
    assert parse_request({"prompt": "x", "image_url": "aGVsbG8=", "width": 512}).size_given


def test_random_seeds_are_safe_in_javascript() -> None:
    seeds = {draw_seed() for _ in range(200)}
    assert all(0 <= seed <= MAX_RANDOM_SEED < 2**53 for seed in seeds) and len(seeds) > 150


def test_pixel_budget_comes_from_the_settings() -> None:
    payload = {"prompt": "x", "width": 1024, "height": 1024, "num_images": 2}
    parse_request(payload)
    with pytest.raises(InvalidRequest, match="budget of 1048576"):
        parse_request(payload, max_job_pixels=1024 * 1024)


# What the engine-level fuzz test used to check, decided by the schema alone: every near-valid payload is accepted
# exactly when each field is in range, and refused with a message naming the field otherwise.
@given(
    st.dictionaries(
        st.sampled_from(["prompt", "width", "height", "seed", "num_images", "scheduler", "guidance_scale", "bogus"]),
        st.one_of(st.integers(-5, 5000), st.text(max_size=8), st.none(), st.floats(allow_nan=True)),
        max_size=6,
    )
)
def test_fuzzed_near_valid_inputs_are_accepted_or_name_a_field(fields: dict) -> None:
    payload = {"prompt": "x", "num_inference_steps": 1, "width": 256, "height": 256, **fields}
    try:
        request = parse_request(payload)
    except InvalidRequest as error:
        assert any(name in str(error) for name in fields), (fields, str(error))
    else:
        assert (request.width, request.height) == (payload["width"], payload["height"])


def test_pixel_budget_names_the_fields() -> None:
    with pytest.raises(InvalidRequest, match="num_images"):
        parse_request({"prompt": "x", "width": 2048, "height": 2048, "num_images": 8})


def test_loras_are_bounded() -> None:
    ok = parse_request({"prompt": "x", "loras": [{"name": "style", "scale": 1}, {"name": "detail", "scale": -0.5}]})
    assert [lora.scale for lora in ok.loras] == [1.0, -0.5]
    for bad in (
        [{"name": "a", "scale": 6}],
        [{"name": "", "scale": 1}],
        [{"name": "a", "weight": 1}],
        [{"name": f"l{i}"} for i in range(9)],
        [{"name": "a"}, {"name": "a"}],
    ):
        with pytest.raises(InvalidRequest, match="loras"):
            parse_request({"prompt": "x", "loras": bad})


@pytest.mark.parametrize("spelling", ["DPM++ 2M Karras", "dpm++ 2m karras", "K_EULER", "k_euler_ancestral", "KLMS"])
def test_scheduler_spellings(spelling: str) -> None:
    request = parse_request({"prompt": "x", "scheduler": spelling})
    assert request.scheduler == " ".join(part for part in split_combined(spelling) if part)


@pytest.mark.parametrize("model", ["sdxl_base", "dev_tiny"])
def test_every_scheduler_builds_fresh_from_a_model_config(model: str) -> None:
    # The shipped configs the converter writes into every folder: no model needs converting to read them.
    configs = Path(__file__).resolve().parents[2] / "model_build" / "configs"
    config = json.loads((configs / model / "scheduler" / "scheduler_config.json").read_text())
    for name in [*SAMPLERS, *(f"{name} Karras" for name, spec in SAMPLERS.items() if spec.sigma_schedules)]:
        first, second = build_scheduler(name, config), build_scheduler(name, config)
        assert first is not second and first.config == second.config


@pytest.mark.parametrize(
    "fields",
    [
        {"seed": -1},  # A1111 clients' "random"
        {"seed": 2**63},  # torch takes any 64-bit seed, and so does the official worker
        {"seed": 2**64 - 1},
        {"prompt": ""},  # unconditional generation, as there
        {},  # no prompt at all: A1111's default ""
        {"width": 128, "height": 128},
        {"guidance_scale": 31},
        {"num_inference_steps": 151, "refiner_inference_steps": 151},
        {"high_noise_frac": 1.0},  # the official worker's base-to-the-end-then-refine: null here
    ],
)
def test_what_the_official_worker_accepts_and_means_something_is_accepted(fields: dict) -> None:
    request = parse_request({"prompt": "x", **fields} if "prompt" not in fields and fields else fields)
    for name, value in fields.items():
        assert getattr(request, name) == (None if (name, value) in (("seed", -1), ("high_noise_frac", 1.0)) else value)


@pytest.mark.parametrize("seed", [-2, 2**64])
def test_seeds_outside_torchs_range_other_than_minus_one_are_refused(seed: int) -> None:
    with pytest.raises(InvalidRequest, match=r"seed: .*allowed -1\.\.18446744073709551615"):
        parse_request({"prompt": "x", "seed": seed})


def test_every_request_field_declares_exactly_one_scope_and_a_meaning() -> None:
    """A new field must say whether it is per request or part of the group key (else a batch call would silently
    run every request with the first one's value of it), and what it means (the README table is made from it)."""
    for name, spec in GenerationRequest.model_fields.items():
        scopes = [item for item in spec.metadata if isinstance(item, Scope)]
        assert len(scopes) == 1, f"{name}: declare exactly one of REQUEST or GROUP in its Annotated[...]"
        assert spec.description, f"{name}: give it a description (the README's request table shows it)"
    assert set(GROUP_FIELDS) == {n for n in GenerationRequest.model_fields if field_scope(n) is Scope.GROUP}


def test_group_key_changes_with_every_group_field_and_no_request_field() -> None:
    """Each GROUP field, changed alone, splits two requests into different calls; each REQUEST field does not."""
    from types import SimpleNamespace

    from worker.generation.grouping import group_key

    encoded = SimpleNamespace(num_chunks=1)
    base = parse_request({"prompt": "x", "width": 512, "height": 512, "image_url": "aGk=", "scheduler": "TCD"})
    # TCD takes eta and timesteps; only Euler takes sigmas; with sampler_name, scheduler is a schedule type.
    contexts: dict[str, dict] = {
        "sigmas": {"scheduler": "Euler"},
        "enable_hr": {"image_url": None},  # the hires fix is txt2img's; denoising_strength is its strength
        "denoising_strength": {"image_url": None},
    }
    alongside: dict[str, dict] = {"sampler_name": {"scheduler": "Automatic"}}
    other_values = {
        "height": 256,
        "width": 256,
        "scheduler": "Euler",
        "sampler_name": "TCD",
        "timesteps": list(range(999, 0, -40)),
        "sigmas": [14.0 - 0.5 * k for k in range(25)] + [0.0],
        "eta": 0.5,
        "guidance_rescale": 0.7,
        "num_inference_steps": 3,
        "guidance_scale": 2.0,
        "loras": [{"name": "a", "scale": 0.5}],
        "controlnets": [{"name": "a", "image": "aGk="}],
        "ip_adapters": [{"name": "a", "image": "aGk="}],
        "embeddings": [{"name": "a", "url": "https://e.test/a.safetensors"}],  # each request's own words
        "refiner": True,
        "refiner_inference_steps": 7,
        "high_noise_frac": 0.5,
        "strength": 0.9,
        "image_url": "aGVsbG8=",
        "prompt": "y",
        "negative_prompt": "n",
        "prompt_2": "z",
        "negative_prompt_2": "m",
        "seed": 5,
        "num_images": 2,
        "clip_skip": 1,
        "output_format": "webp",
        "quality": 50,
        "return_type": "base64",
        "enable_hr": True,
        "hr_scale": 1.5,
        "hr_resize_x": 1024,
        "hr_resize_y": 768,
        "hr_second_pass_steps": 5,
        "denoising_strength": 0.5,
        "hr_upscaler": "Lanczos",
        "hr_sampler_name": "Euler",
        "hr_scheduler": "Karras",
        "hr_prompt": "h",  # each request's own: requests with other hires prompts share a call when shapes agree
        "hr_negative_prompt": "hn",
        "mask": "aGVsbG8=",
        "mask_url": "aGVsbG8=",
        "mask_blur": 8,
        "inpainting_fill": 1,
        "inpaint_full_res": False,
        "inpaint_full_res_padding": 32,
        "inpainting_mask_invert": True,
        "outpaint": {"left": 64},
    }
    assert set(other_values) == set(GenerationRequest.model_fields)  # a new field needs a row here too
    for name, value in other_values.items():
        start = (
            parse_request({**base.model_dump(exclude_unset=True), **contexts.get(name, {})})
            if name in contexts
            else base
        )
        changed = parse_request({**start.model_dump(exclude_unset=True), name: value, **alongside.get(name, {})})
        differs = group_key(changed, encoded) != group_key(start, encoded)
        assert differs == (field_scope(name) is Scope.GROUP), name


def test_readme_request_table_is_the_schemas() -> None:
    from worker.request.table import TABLE_END, TABLE_START, request_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    # Regenerate with: python -m worker.request.table --write README.md
    assert readme[readme.index(TABLE_START) + len(TABLE_START) : readme.index(TABLE_END)].strip() == request_table()
