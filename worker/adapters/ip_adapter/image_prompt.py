"""A job's image prompts: each reference image encoded once, handed to every base call as diffusers'
``ip_adapter_image_embeds``.

The encoding is diffusers' ``encode_image`` + ``prepare_ip_adapter_image_embeds`` for one image per adapter: the
``CLIPImageProcessor`` (resize the short side, centre-crop, CLIP's normalisation), then the encoder's image embedding
for the plain kind, with zeros as the unconditional embedding, or for the plus kind the penultimate hidden states of
the image and of an all-zero image. Given as embeddings, they reach every pipeline the base runs (text-to-image,
img2img, the hires pass, inpainting, the ControlNet pipelines) without an image encoder in any of them, and diffusers
repeats them for the call's images as it does for an image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from worker.adapters.ip_adapter.cache import LoadedAdapter, LoadedEncoder
from worker.request.ip_adapter import IpAdapterUnit


def encode_image(image: Image.Image, encoder: LoadedEncoder, hidden_states: bool, device: Any) -> tuple[Any, Any]:
    """(conditional, unconditional) embeddings of ``image``, shaped as diffusers' ``prepare_ip_adapter_image_embeds``
    holds one image's: (1, 1, width) for the image embedding, (1, 1, tokens, width) for hidden states."""
    import torch

    model = encoder.model
    dtype = next(model.parameters()).dtype
    pixels = encoder.processor(image, return_tensors="pt").pixel_values.to(device=device, dtype=dtype)
    with torch.no_grad():
        if hidden_states:
            cond = model(pixels, output_hidden_states=True).hidden_states[-2]
            uncond = model(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        else:
            cond = model(pixels).image_embeds
            uncond = torch.zeros_like(cond)
    return cond[None, :], uncond[None, :]


@dataclass
class AppliedIpAdapter:
    """One unit of a job: what it asked for, the adapter and encoder that ran, its embeddings."""

    unit: IpAdapterUnit
    adapter: LoadedAdapter
    encoder: LoadedEncoder
    input_size: tuple[int, int]
    embeds: tuple[Any, Any]  # (conditional, unconditional)
    cache_hits: tuple[bool, bool]  # adapter, encoder

    def stable(self) -> dict[str, Any]:
        file = self.adapter.file
        return {
            "name": self.unit.name,
            "file": file.shown,
            "kind": file.shape.kind,
            "tokens": file.shape.num_tokens,
            "image_encoder": file.encoder.shown,
            "scale": self.unit.scale,
            "input_size": list(self.input_size),
            "applied_to": "base",  # SDXL IP-Adapters fit the base's UNet: its passes, never the refiner's
        }

    def volatile(self) -> dict[str, Any]:
        adapter_hit, encoder_hit = self.cache_hits
        return {
            "name": self.unit.name,
            "cache_hit": adapter_hit,
            "load_s": 0.0 if adapter_hit else round(self.adapter.load_s, 4),
            "image_encoder_cache_hit": encoder_hit,
            "image_encoder_load_s": 0.0 if encoder_hit else round(self.encoder.load_s, 4),
        }


@dataclass
class ImagePrompt:
    """A job's IP-Adapters, ready for the base's pipeline calls."""

    applied: list[AppliedIpAdapter]
    unet: str = "eager"  # how the UNet ran its calls: always eagerly, a compiled UNet's code set aside (said here)
    calls: int = field(default=0)  # pipeline calls that took them (the engine refuses a job whose mode took none)

    @property
    def active(self) -> bool:
        """Whether any adapter has a scale: at scale 0 everywhere the job runs the UNet as a job without them
        (diffusers' processors skip a 0 scale; here a compiled UNet's code runs too, its bytes not eager's)."""
        return any(self.scales)

    @property
    def adapters(self) -> list[LoadedAdapter]:
        return [applied.adapter for applied in self.applied]

    @property
    def scales(self) -> list[float]:
        return [applied.unit.scale for applied in self.applied]

    def call_kwargs(self, cfg: bool) -> dict[str, Any]:
        """``ip_adapter_image_embeds`` for a call with (``cfg``) or without classifier-free guidance: per adapter,
        the unconditional then the conditional embedding (diffusers splits them with ``chunk(2)``)."""
        import torch

        self.calls += 1
        if not self.active:
            return {}
        embeds = [torch.cat([uncond, cond]) if cfg else cond for cond, uncond in (a.embeds for a in self.applied)]
        return {"ip_adapter_image_embeds": embeds}

    def stable(self) -> list[dict[str, Any]]:
        return [{**applied.stable(), "unet": self.unet} for applied in self.applied]

    def volatile(self) -> list[dict[str, Any]]:
        return [applied.volatile() for applied in self.applied]
