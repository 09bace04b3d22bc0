"""Proof that a pipeline holds exactly the checkpoint's tensors, component by component.

diffusers' single-file loader does not guarantee it: tensors whose names do not match stay at
random initialisation without a word, a second text encoder of the same width silently receives
the first one's weights, and a missing tensor surfaces as "Cannot copy out of meta tensor". So
after conversion the saved folder is loaded back with ``from_pretrained`` and every parameter and
persistent buffer of each component is mapped back to its original checkpoint name
(:func:`model_build.layout.to_original_layout`, which reshapes and fuses where the layouts differ)
and compared, exactly, with the checkpoint tensor of that name cast to the target dtype:

* every pipeline tensor must have a checkpoint tensor of that name, in the same component;
* every checkpoint tensor of the component must land in the pipeline;
* the values must be equal (bit for bit after the cast), and finite;
* nothing may be left on the meta device.

The comparison is by name within one component, so another component's weights, a random
initialisation or a stale tensor can never pass as the right one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from model_build.errors import CompletenessError, shown_names
from model_build.layout import BASE_FAMILY, to_original_layout
from model_build.tensor_checks import all_finite


@dataclass(frozen=True)
class ComponentProof:
    component: str
    tensors: int  # parameters and persistent buffers, each equal to its checkpoint tensor


def assert_materialized(component: str, module: torch.nn.Module) -> None:
    """Every parameter and buffer holds data: nothing was left on the meta device."""
    on_meta = [name for name, tensor in (*module.named_parameters(), *module.named_buffers()) if tensor.is_meta]
    if on_meta:
        raise CompletenessError(
            f"{component}: {len(on_meta)} tensors were never loaded and are still on the meta device "
            f"({shown_names(on_meta)}): the checkpoint did not provide them under the names diffusers looked for. "
            "Saving would fail with 'Cannot copy out of meta tensor'."
        )


def _config_of(module: torch.nn.Module) -> Mapping:
    config = module.config
    return config if isinstance(config, Mapping) else config.to_dict()


def prove_component(
    component: str,
    module: torch.nn.Module,
    source_keys: Iterable[str],
    read_source: Callable[[str], torch.Tensor],
    dtype: torch.dtype,
    family: str = BASE_FAMILY,
) -> ComponentProof:
    """Compare ``module`` with its checkpoint tensors; raise :class:`CompletenessError` naming the first problems.

    ``read_source(key)`` returns the checkpoint tensor named ``key`` (original layout), already
    cast to ``dtype``; it is called once per tensor so a caller can stream them from disk. ``family``
    names the checkpoint layout the keys are in (the refiner's text encoder has another prefix).
    """
    assert_materialized(component, module)
    state = module.state_dict()  # parameters and persistent buffers: what a checkpoint must provide
    try:
        mapped = to_original_layout(component, state, _config_of(module), family)
    except KeyError as error:
        raise CompletenessError(
            f"{component}: the pipeline holds tensor {error} that has no name in the original checkpoint layout, "
            "so it cannot have come from the checkpoint"
        ) from error
    source_keys = sorted(source_keys)
    not_from_checkpoint = sorted(set(mapped) - set(source_keys))
    not_in_pipeline = sorted(set(source_keys) - set(mapped))
    problems = []
    if not_from_checkpoint:
        problems.append(
            f"{len(not_from_checkpoint)} pipeline tensors did not come from the checkpoint "
            f"({shown_names(not_from_checkpoint)}) and hold diffusers' random initialisation"
        )
    if not_in_pipeline:
        problems.append(
            f"{len(not_in_pipeline)} checkpoint tensors did not land in the pipeline ({shown_names(not_in_pipeline)})"
        )
    if problems:
        raise CompletenessError(f"{component}: " + "; ".join(problems))

    differ, wrong_dtype, not_finite = [], [], []
    for key in source_keys:
        actual = mapped[key]
        expected = read_source(key)
        if actual.is_floating_point() and actual.dtype != dtype:
            wrong_dtype.append(f"{key} ({actual.dtype})")
        if actual.shape != expected.shape or not torch.equal(actual, expected.to(actual.dtype)):
            differ.append(key)
        elif actual.is_floating_point() and not all_finite(actual):
            not_finite.append(key)  # equal to the cast source, yet Inf: the cast overflowed
    if differ:
        raise CompletenessError(
            f"{component}: {len(differ)} of {len(source_keys)} tensors differ from the checkpoint after conversion "
            f"({shown_names(differ)}): diffusers loaded something else into them (a random initialisation, or another "
            "component's weights)"
        )
    if wrong_dtype:
        raise CompletenessError(f"{component}: tensors saved in another dtype than {dtype}: {shown_names(wrong_dtype)}")
    if not_finite:
        raise CompletenessError(f"{component}: tensors hold NaN or Inf after conversion: {shown_names(not_finite)}")
    return ComponentProof(component, len(source_keys))
