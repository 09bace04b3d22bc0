"""A job's IP-Adapters in the UNet for its base calls, and the UNet exactly as it was afterwards.

What diffusers' ``load_ip_adapter`` leaves in a UNet, here for the length of a ``with`` block: every cross-attention
layer's processor becomes an ``IPAdapterAttnProcessor2_0`` holding each adapter's ``to_k_ip``/``to_v_ip`` and scale
(the loaded adapters' own modules: nothing is copied), ``encoder_hid_proj`` becomes a
``MultiIPAdapterImageProjection`` of their projections, and ``config.encoder_hid_dim_type`` says
``ip_image_proj``. Afterwards the original processor objects are put back (not new ones, as ``unload_ip_adapter``
would make: a compiled UNet's guards hold for the same objects), and ``encoder_hid_proj`` goes back to being a plain
attribute, so a job without IP-Adapters runs the very UNet a fresh worker runs.

A compiled UNet (``COMPILE=unet`` or ``regional``) runs these calls eagerly, under torch's ``force_eager`` stance: the
image tokens are new inputs of its graph and the processors new code in it, and compiling them at start-up would cost
another whole compile for one kind of job.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from worker.adapters.ip_adapter.cache import LoadedAdapter

HIDDEN_PROJECTION = "encoder_hid_proj"


def job_processors(adapters: Sequence[LoadedAdapter], scales: Sequence[float]) -> dict[str, Any]:
    """One processor per cross-attention layer reading every adapter of the job, each at its scale (diffusers'
    processor built for a list of adapters, with the cached adapters' linear layers in it)."""
    import torch
    from accelerate import init_empty_weights

    processors = {}
    for name, first in adapters[0].processors.items():
        own = [adapter.processors[name] for adapter in adapters]
        with init_empty_weights():  # its own linears are replaced by the adapters' at once
            processor = type(first)(
                hidden_size=first.hidden_size,
                cross_attention_dim=first.cross_attention_dim,
                num_tokens=[each.num_tokens[0] for each in own],
                scale=list(scales),
            )
        processor.to_k_ip = torch.nn.ModuleList([each.to_k_ip[0] for each in own])
        processor.to_v_ip = torch.nn.ModuleList([each.to_v_ip[0] for each in own])
        processors[name] = processor
    return processors


@contextlib.contextmanager
def installed(unet: Any, adapters: Sequence[LoadedAdapter], scales: Sequence[float], eager: bool) -> Iterator[None]:
    """The UNet with ``adapters`` at ``scales`` in it (and, with ``eager``, compiled code set aside) inside the block;
    exactly as before after it, whatever happened inside."""
    import torch
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    originals = dict(unet.attn_processors)
    own = job_processors(adapters, scales)
    projection = MultiIPAdapterImageProjection([adapter.projection for adapter in adapters])
    was_submodule = HIDDEN_PROJECTION in unet._modules
    hidden_projection, hidden_type = getattr(unet, HIDDEN_PROJECTION), unet.config.encoder_hid_dim_type
    stance = torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext()
    try:
        # The processors before the projection: a plus adapter's projection has attention layers of its own, which
        # set_attn_processor would count (diffusers' _load_ip_adapter_weights keeps this order too).
        unet.set_attn_processor({**originals, **own})
        setattr(unet, HIDDEN_PROJECTION, projection)
        unet.config.encoder_hid_dim_type = "ip_image_proj"
        with stance:
            yield
    finally:
        if was_submodule:
            setattr(unet, HIDDEN_PROJECTION, hidden_projection)
        else:  # a plain attribute again, as the UNet was built (nn.Module would keep a None submodule entry)
            unet._modules.pop(HIDDEN_PROJECTION, None)
            object.__setattr__(unet, HIDDEN_PROJECTION, hidden_projection)
        unet.config.encoder_hid_dim_type = hidden_type
        unet.set_attn_processor(dict(originals))
