"""The sampler/schedule table against diffusers 0.42.1 itself and A1111 1.10's formulas; the request rule for
``sampler_name`` + ``scheduler``; the validator, fuzzed. No model: the shipped SDXL scheduler config is enough."""

from __future__ import annotations

import inspect
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from core.errors import InvalidRequest
from worker.generation.schedulers import align_your_steps, build_schedule
from worker.request.samplers import (
    AUTOMATIC,
    MODEL_SCHEDULE,
    SAMPLERS,
    SCHEDULE_NAMES,
    SCHEDULES,
    pair_problem,
    resolve,
)
from worker.request.schema import parse_request

CONFIGS = Path(__file__).resolve().parents[2] / "model_build" / "configs"
SDXL = json.loads((CONFIGS / "sdxl_base" / "scheduler" / "scheduler_config.json").read_text())
VPRED = {**SDXL, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def probe(sampler: str, schedule: str, steps: int, config: dict[str, Any] = SDXL, **lists: Any) -> Any:
    """The scheduler of the pair as a pipeline call would set it up."""
    return build_schedule(resolve(sampler, schedule), config, steps, noise_seed=0, **lists).probe()


def model_sigmas() -> np.ndarray:
    alphas = diffusers.EulerDiscreteScheduler.from_config(SDXL).alphas_cumprod.double().numpy()
    return ((1 - alphas) / alphas) ** 0.5


# ---- the table's claims are diffusers' -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_what_the_table_says_each_class_can_do_is_what_diffusers_does(name: str) -> None:
    spec = SAMPLERS[name]
    cls = getattr(diffusers, spec.diffusers_class)
    init = set(inspect.signature(cls.__init__).parameters)
    assert spec.spacing == ("timestep_spacing" in init)
    assert spec.sigma_schedules == ({"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"} <= init)
    assert (spec.eta is not None) == ("eta" in inspect.signature(cls.step).parameters)
    for kind, values in (("timesteps", [999, 500, 20]), ("sigmas", [14.0, 3.0, 0.5, 0.0])):
        scheduler = cls.from_config(SDXL)
        try:
            scheduler.set_timesteps(**{kind: values}, device="cpu")
        except (TypeError, ValueError):
            assert kind not in spec.custom
        else:
            assert kind in spec.custom and len(scheduler.timesteps) >= 3
    if spec.own_schedule:  # LCM, TCD: their timesteps do not follow timestep_spacing
        placed = []
        for spacing in ("leading", "trailing", "linspace"):
            scheduler = cls.from_config(SDXL, timestep_spacing=spacing)
            scheduler.set_timesteps(4, device="cpu")
            placed.append(scheduler.timesteps.tolist())
        assert placed[0] == placed[1] == placed[2]


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_pair_in_the_table_runs_and_every_other_is_refused_naming_both_fields(sampler: str) -> None:
    for schedule in SCHEDULES:
        payload = {"prompt": "x", "sampler_name": sampler, "scheduler": schedule, "num_inference_steps": 6}
        if pair_problem(sampler, schedule) is not None:
            with pytest.raises(InvalidRequest) as refused:
                parse_request(payload)
            message = str(refused.value)
            assert f"sampler_name {sampler!r} with scheduler {schedule!r}: this pair does not exist" in message
            assert "takes the schedule types" in message  # the fix: what this sampler takes, who takes the schedule
            continue
        request = parse_request(payload)
        for steps in (1, 6):
            timesteps = probe(sampler, schedule, steps).timesteps
            calls = SAMPLERS[sampler].calls_per_step
            assert len(timesteps) in (calls * steps - (calls - 1), steps + 1), (sampler, schedule, steps)
        assert request.sampling.sampler == sampler


# ---- the schedules are A1111's ---------------------------------------------------------------------------------------


def a1111_sigmas(schedule: str, n: int) -> np.ndarray:
    """A1111 1.10's sigmas (modules/sd_schedulers.py, k-diffusion's get_sigmas_*), final 0 included."""
    sigmas = model_sigmas()
    low, high = sigmas[0], sigmas[-1]

    def at(t: np.ndarray) -> np.ndarray:  # k-diffusion's t_to_sigma: log-linear between the model's sigmas
        return np.exp(np.interp(t, np.arange(len(sigmas)), np.log(sigmas)))

    if schedule in ("Uniform", "Normal"):
        made = at(np.linspace(len(sigmas) - 1, 0, n))
    elif schedule == "Karras":
        ramp = np.linspace(0, 1, n)
        made = (high ** (1 / 7) + ramp * (low ** (1 / 7) - high ** (1 / 7))) ** 7
    elif schedule in ("Exponential", "Polyexponential"):  # polyexponential at A1111's default rho 1
        made = np.exp(np.linspace(math.log(high), math.log(low), n))
    elif schedule == "Beta":
        made = np.array([low + stats.beta.ppf(x, 0.6, 0.6) * (high - low) for x in 1 - np.linspace(0, 1, n)])
    elif schedule == "Simple":
        made = np.array([sigmas[-(1 + int(x * len(sigmas) / n))] for x in range(n)])
    elif schedule == "DDIM":
        made = sigmas[1 :: max(len(sigmas) // n, 1)][::-1]
    else:
        raise AssertionError(schedule)
    return np.append(made, 0.0)


@pytest.mark.parametrize(
    "schedule", ["Uniform", "Normal", "Karras", "Exponential", "Polyexponential", "Beta", "Simple"]
)
@pytest.mark.parametrize("steps", [4, 10, 25])
def test_euler_runs_a1111s_sigmas(schedule: str, steps: int) -> None:
    """Equal to float32, except Uniform/Normal between training timesteps: diffusers interpolates sigma linearly
    there, k-diffusion log-linearly (2e-5 relative at 25 steps)."""
    between = schedule in ("Uniform", "Normal") and (len(model_sigmas()) - 1) % (steps - 1)
    for sampler in ("Euler", "DPM++ 2M") if schedule in ("Karras", "Exponential", "Beta") else ("Euler",):
        ran = probe(sampler, schedule, steps).sigmas.double().numpy()
        np.testing.assert_allclose(ran, a1111_sigmas(schedule, steps), rtol=5e-5 if between else 2e-6, atol=1e-7)


@pytest.mark.parametrize("steps", [4, 5, 10, 20, 25])  # A1111's DDIM schedule makes `steps` steps when 1 + steps x
def test_the_ddim_schedule_type_is_a1111s_when_it_makes_the_steps_asked(steps: int) -> None:  # (1000 // steps) >= 1000
    ran = probe("Euler", "DDIM", steps).sigmas.double().numpy()
    np.testing.assert_allclose(ran, a1111_sigmas("DDIM", steps), rtol=2e-6)


@pytest.mark.parametrize("steps", [2, 3, 4, 7, 8, 30])
def test_sgm_uniform_is_a1111s_to_the_whole_timestep(steps: int) -> None:
    """A1111 1.10's sgm_uniform places t = linspace(999, 0, steps + 1)[:-1] (fractional); diffusers' trailing
    spacing (the SDXL-Lightning recipe) steps by 1000/steps down from 1000, minus 1, rounded to whole timesteps."""
    ran = probe("Euler", "SGM Uniform", steps).timesteps.numpy()
    assert np.abs(ran - np.linspace(999, 0, steps + 1)[:-1]).max() < 1.5


@pytest.mark.parametrize(
    ("steps", "published"),
    # ByteDance's SDXL-Lightning (model card: EulerDiscreteScheduler with timestep_spacing="trailing", guidance 0;
    # its report's schedules for the 2-, 4- and 8-step models).
    [(2, [999, 499]), (4, [999, 749, 499, 249]), (8, [999, 874, 749, 624, 499, 374, 249, 124])],
)
def test_the_lightning_recipe_runs_the_published_timesteps(steps: int, published: list[int]) -> None:
    request = parse_request({"sampler_name": "Euler", "scheduler": "SGM Uniform", "num_inference_steps": steps})
    assert probe(request.sampling.sampler, request.sampling.schedule, steps).timesteps.tolist() == published


def test_align_your_steps_is_nvidias_published_list() -> None:
    from diffusers.schedulers.scheduling_utils import AysSchedules

    np.testing.assert_allclose(align_your_steps(10), AysSchedules["StableDiffusionXLSigmas"], rtol=1e-9)
    assert probe("Euler", "Align Your Steps", 10).sigmas.numpy()[-1] == 0.0
    # Samplers that take timesteps, not sigmas, get the model's nearest whole timesteps: at 10 steps exactly the
    # published timestep list.
    for sampler in ("DPM++ 2M", "LCM", "DDPM"):
        assert probe(sampler, "Align Your Steps", 10).timesteps.tolist() == AysSchedules["StableDiffusionXLTimesteps"]
    # Other counts: NVIDIA's log-linear interpolation of the 11 levels onto steps + 1 (the last then set to 0, as
    # ComfyUI does): 20 steps put one level between each published pair, at their geometric mean.
    twenty = align_your_steps(20)
    published = AysSchedules["StableDiffusionXLSigmas"]
    assert len(twenty) == 21 and twenty[-1] == 0.0 and twenty[0:19:2] == pytest.approx(published[:10], rel=1e-9)
    means = [(a * b) ** 0.5 for a, b in itertools.pairwise(published[:10])]
    assert twenty[1:19:2] == pytest.approx(means, rel=1e-9)
    four = align_your_steps(4)
    assert len(four) == 5 and four[0] == pytest.approx(14.615) and four[-1] == 0.0 and all(np.diff(four) < 0)


# ---- the request rule ------------------------------------------------------------------------------------------------


def sampling(**fields: Any) -> tuple[str, str]:
    resolved = parse_request({"prompt": "x", **fields}).sampling
    return resolved.sampler, resolved.schedule


def test_official_names_keep_their_meaning_and_a1111_pairs_get_a1111s() -> None:
    # The official worker's field: the model's own config (its default DDIM; K_EULER, ...), or a combined name.
    assert sampling() == ("DDIM", MODEL_SCHEDULE)
    assert sampling(scheduler="K_EULER") == ("Euler", MODEL_SCHEDULE)
    assert sampling(scheduler="DPM++ 2M") == ("DPM++ 2M", MODEL_SCHEDULE)
    assert sampling(scheduler="dpm++_2m_karras") == ("DPM++ 2M", "Karras")
    assert sampling(scheduler="Euler SGM Uniform") == ("Euler", "SGM Uniform")
    # A1111 1.9+: with sampler_name, scheduler is the schedule type; Automatic is A1111 1.10's per sampler.
    assert sampling(sampler_name="DPM++ 2M") == ("DPM++ 2M", "Karras")
    assert sampling(sampler_name="DPM++ 2M SDE", scheduler="Automatic") == ("DPM++ 2M SDE", "Exponential")
    assert sampling(sampler_name="Euler a", scheduler=None) == ("Euler a", "Uniform")
    assert sampling(sampler_name="k_euler", scheduler="sgm_uniform") == ("Euler", "SGM Uniform")
    assert sampling(sampler_name="DDIM", scheduler="DDIM") == ("DDIM", "DDIM")
    assert sampling(sampler_name="DPM++ 2M Karras", scheduler="Automatic") == ("DPM++ 2M", "Karras")
    request = parse_request({"prompt": "x", "sampler_name": "k_dpmpp_2m", "scheduler": "KARRAS"})
    assert (request.sampler_name, request.scheduler) == ("DPM++ 2M", "Karras")  # stored canonical


# Every name of the table before schedule types were split off (README, 2026-12-02): each still runs the same class.
OLD_NAMES = {
    "Euler": "EulerDiscreteScheduler",
    "Euler a": "EulerAncestralDiscreteScheduler",
    "Euler Karras": "EulerDiscreteScheduler",
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "DPM++ 2M Karras": "DPMSolverMultistepScheduler",
    "DPM++ 2M SDE": "DPMSolverMultistepScheduler",
    "DPM++ 2M SDE Karras": "DPMSolverMultistepScheduler",
    "DPM++ 3M SDE": "DPMSolverMultistepScheduler",
    "DPM++ 3M SDE Karras": "DPMSolverMultistepScheduler",
    "DPM++ 2S": "DPMSolverSinglestepScheduler",
    "DPM++ 2S Karras": "DPMSolverSinglestepScheduler",
    "DPM++ SDE": "DPMSolverSDEScheduler",
    "DPM++ SDE Karras": "DPMSolverSDEScheduler",
    "DPM2": "KDPM2DiscreteScheduler",
    "DPM2 Karras": "KDPM2DiscreteScheduler",
    "DPM2 a": "KDPM2AncestralDiscreteScheduler",
    "DPM2 a Karras": "KDPM2AncestralDiscreteScheduler",
    "Heun": "HeunDiscreteScheduler",
    "LMS": "LMSDiscreteScheduler",
    "LMS Karras": "LMSDiscreteScheduler",
    "DDIM": "DDIMScheduler",
    "DDPM": "DDPMScheduler",
    "PNDM": "PNDMScheduler",
    "UniPC": "UniPCMultistepScheduler",
    "DEIS": "DEISMultistepScheduler",
    "K_EULER": "EulerDiscreteScheduler",
    "K_EULER_ANCESTRAL": "EulerAncestralDiscreteScheduler",
    "KLMS": "LMSDiscreteScheduler",
    "DPMSolverMultistep": "DPMSolverMultistepScheduler",
    "DPMSolverSinglestep": "DPMSolverSinglestepScheduler",
}


@pytest.mark.parametrize(("name", "class_name"), list(OLD_NAMES.items()))
def test_todays_combined_names_are_aliases(name: str, class_name: str) -> None:
    request = parse_request({"prompt": "x", "scheduler": name})
    scheduler = probe(request.sampling.sampler, request.sampling.schedule, 5)
    assert type(scheduler).__name__ == class_name
    assert bool(scheduler.config.get("use_karras_sigmas")) == name.endswith("Karras")
    # The same pair through A1111's fields runs the same scheduler.
    if name.endswith("Karras"):
        pair = parse_request({"sampler_name": name.removesuffix(" Karras"), "scheduler": "Karras"}).sampling
        assert pair == request.sampling


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"scheduler": "Karras"}, "scheduler: unknown scheduler 'Karras'; 'Karras' is a schedule type: send it with "),
        ({"scheduler": "Euler a Karras"}, "scheduler: 'Euler a Karras' does not exist: diffusers' EulerAncestral"),
        ({"sampler_name": "Restart"}, "sampler_name: unknown sampler 'Restart'; use one of: Euler, "),
        ({"sampler_name": "Euler", "scheduler": "KL Optimal"}, "scheduler: unknown schedule type 'KL Optimal' (with"),
        (
            {"sampler_name": "DPM++ 2M Karras", "scheduler": "Beta"},
            "sampler_name 'DPM++ 2M Karras' names the Karras schedule but scheduler asks for 'Beta'",
        ),
        ({"sampler_name": "LCM", "scheduler": "Karras"}, "sampler_name 'LCM' with scheduler 'Karras': this pair"),
        ({"sampler_name": "Euler", "eta": 0.3}, "eta: sampler 'Euler' takes no eta (only DDIM, TCD do"),
        (
            {"scheduler": "Euler", "timesteps": [999, 499]},
            "timesteps: 2 values for num_inference_steps 25; give 25 (one per step), or set num_inference_steps to 2",
        ),
        ({"num_inference_steps": 2, "timesteps": [499, 999]}, "timesteps: must be strictly decreasing"),
        ({"num_inference_steps": 2, "timesteps": [999, 1000]}, "timesteps.1: Input should be less than or equal to"),
        (
            {"num_inference_steps": 2, "scheduler": "Euler", "sigmas": [9.0, 1.0]},
            "sigmas: 2 values for num_inference_steps 2; give 3 (one per step and the final noise level)",
        ),
        ({"num_inference_steps": 1, "scheduler": "K_EULER", "sigmas": [9.0, -1.0]}, "sigmas.1: Input should be"),
        (
            {"num_inference_steps": 2, "scheduler": "DPM++ 2M", "sigmas": [9.0, 1.0, 0.0]},
            "sigmas: sampler 'DPM++ 2M' cannot take them: diffusers' DPMSolverMultistepScheduler takes no custom",
        ),
        (
            {"num_inference_steps": 2, "sampler_name": "Euler", "scheduler": "Karras", "timesteps": [999, 499]},
            "timesteps: a custom list replaces the schedule, but scheduler asks for 'Karras'",
        ),
        (
            {"num_inference_steps": 2, "scheduler": "Euler", "timesteps": [999, 499], "sigmas": [9.0, 1.0, 0.0]},
            "timesteps, sigmas: give one custom list, not both",
        ),
        ({"guidance_rescale": 1.5}, "guidance_rescale: Input should be less than or equal to 1"),
    ],
)
def test_bad_sampling_input_is_refused_naming_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_request({"prompt": "x", **fields})
    assert str(refused.value).startswith("invalid input: ") and message in str(refused.value), str(refused.value)


NAMES = [
    *SAMPLERS,
    *SCHEDULES,
    *(alias for spec in SAMPLERS.values() for alias in spec.aliases),
    *(name for names in SCHEDULE_NAMES.values() for name in names),
    "DPM++ 2M Karras",
    "Euler a Karras",
    "bogus",
    "",
]
FIELDS = ("sampler_name", "scheduler", "timesteps", "sigmas", "eta", "num_inference_steps")


@given(
    sampler_name=st.none() | st.sampled_from(NAMES) | st.text(max_size=12),
    scheduler=st.none() | st.sampled_from(NAMES) | st.text(max_size=12) | st.integers(),
    steps=st.integers(min_value=1, max_value=6),
    timesteps=st.none() | st.lists(st.integers(min_value=-5, max_value=1005), max_size=7),
    sigmas=st.none() | st.lists(st.floats(min_value=-1, max_value=20) | st.just(math.nan), max_size=8),
    eta=st.none() | st.floats(min_value=-0.5, max_value=1.5),
)
def test_the_validator_accepts_only_pairs_that_run_and_names_the_field_otherwise(
    sampler_name: Any, scheduler: Any, steps: int, timesteps: Any, sigmas: Any, eta: Any
) -> None:
    fields = {"sampler_name": sampler_name, "scheduler": scheduler, "num_inference_steps": steps}
    fields |= {"timesteps": timesteps, "sigmas": sigmas, "eta": eta}
    payload = {"prompt": "x", **{key: value for key, value in fields.items() if value is not None}}
    try:
        request = parse_request(payload)
    except InvalidRequest as refused:
        message = str(refused.value) if hasattr(refused, "value") else str(refused)
        assert any(name in message for name in FIELDS), message
        return
    resolved = request.sampling
    assert resolved.sampler in SAMPLERS and pair_problem(resolved.sampler, resolved.requested) is None
    for kind, wanted in (("timesteps", steps), ("sigmas", steps + 1)):
        values = getattr(request, kind)
        if values is not None:
            assert len(values) == wanted and all(a > b for a, b in itertools.pairwise(values))
            assert resolved.requested in (AUTOMATIC, MODEL_SCHEDULE) and kind in resolved.spec.custom
    run = probe(resolved.sampler, resolved.schedule, steps, timesteps=request.timesteps, sigmas=request.sigmas)
    assert len(run.timesteps) >= 1
    assert parse_request(request.model_dump()) == request  # canonical: reading it back changes nothing


# ---- v-prediction / zero terminal SNR --------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_a_v_prediction_ztsnr_config_is_kept_by_every_sampler_or_refused(sampler: str) -> None:
    init = set(inspect.signature(getattr(diffusers, SAMPLERS[sampler].diffusers_class).__init__).parameters)
    for schedule in ("Automatic", "SGM Uniform", "Karras"):
        if pair_problem(sampler, schedule) is not None:
            continue
        if "rescale_betas_zero_snr" not in init:
            with pytest.raises(InvalidRequest, match=re.escape(f"sampler_name: sampler '{sampler}' cannot run this")):
                build_schedule(resolve(sampler, schedule), VPRED, 4, field_name="sampler_name")
            continue
        scheduler = probe(sampler, schedule, 4, VPRED)
        assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr
        assert scheduler.alphas_cumprod[-1] < 1e-6  # the terminal step has (almost) zero signal


def test_readme_sampler_tables_are_the_tables() -> None:
    from worker.request.sampler_table import TABLE_END, TABLE_START, tables

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert readme[readme.index(TABLE_START) + len(TABLE_START) : readme.index(TABLE_END)].strip() == tables()
