"""The worker's prompt encoders: the base's, and the refiner's when its bigG text encoder differs from the base's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.settings import Settings
from worker.adapters.embeddings.manager import EmbeddingManager, token_targets
from worker.adapters.embeddings.urls import embedding_downloads
from worker.generation.conditioning import Embeddings
from worker.generation.routing import prompt_schedule_steps
from worker.prompting.encoded import EncodedPrompts
from worker.prompting.encoding import PromptEncoder
from worker.request.schema import GenerationRequest


def prompt_encoder(pipe: Any, settings: Settings) -> PromptEncoder:
    return PromptEncoder(
        pipe,
        cuda_graphs=settings.prompt_encoder_cuda_graphs,
        cache_bytes=int(settings.prompt_cache_mb * 1024 * 1024),
        weighting=settings.prompt_weighting,
    )


@dataclass
class PromptEncoders:
    """A request's prompts encoded for the base and, for the refiner, with the refiner's own bigG encoder."""

    base: PromptEncoder
    refiner: PromptEncoder | None  # None: the refiner shares the base's bigG encoder, so the base's embeddings serve
    refiner_loaded: bool
    clip_l_width: int  # where the refiner's part of a concatenated embedding starts
    embeddings: EmbeddingManager | None = None  # textual inversions, named in the prompts

    def encode(self, request: GenerationRequest, encoder: PromptEncoder | None = None) -> EncodedPrompts:
        if self.embeddings is None:
            return self._encode(request, encoder or self.base)
        self.embeddings.refresh()  # files added or changed since the last job (a stat per folder)
        with self.embeddings.requested(request.embeddings, request_texts(request)):
            return self._encode(request, encoder or self.base)

    def _encode(self, request: GenerationRequest, encoder: PromptEncoder) -> EncodedPrompts:
        return encoder.encode(
            request.prompt,
            prompt_2=request.prompt_2,
            negative_prompt=request.negative_prompt,
            negative_prompt_2=request.negative_prompt_2,
            clip_skip=request.clip_skip,
            do_classifier_free_guidance=request.guidance_scale > 1.0,
            # A1111 prompt editing ([a:b:when], [a|b]) counts these
            steps=prompt_schedule_steps(request, self.refiner_loaded),
        )

    def refiner_embeddings(self, embeds: Embeddings) -> Embeddings:
        """The refiner's conditioning for the requests of ``embeds`` (the whole call), with their full schedules."""
        if self.refiner is None:
            encoded = embeds.encoded  # the refiner shares the base's bigG encoder: its part of the same embeddings
        else:
            encoded = [self.encode(request, self.refiner) for request in embeds.requests]
        return Embeddings(encoded, embeds.requests, embeds.cfg, self.clip_l_width)

    def clear_caches(self) -> None:
        for encoder in (self.base, self.refiner):
            if encoder is not None:
                encoder.clear_cache()

    def vocabulary_changed(self) -> None:
        for encoder in (self.base, self.refiner):
            if encoder is not None:
                encoder.vocabulary_changed()

    def use_embeddings(self, manager: EmbeddingManager) -> None:
        self.embeddings = manager
        for encoder in (self.base, self.refiner):
            if encoder is not None:
                encoder.use_embedding_names(manager)


def request_texts(request: GenerationRequest) -> list[str]:
    """Every prompt text of a request, its hires pass's included (where its embedding words must appear)."""
    fields = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "hr_prompt", "hr_negative_prompt")
    return [text for text in (getattr(request, name) for name in fields) if text]


def build_prompt_encoders(pipe: Any, refiner: Any | None, settings: Settings) -> PromptEncoders:
    """The refiner's encoder runs the same chunking and weighting over the base's CLIP-L and the refiner's bigG, so
    its bigG part is the refiner's own conditioning for long and weighted prompts."""
    from diffusers import StableDiffusionXLPipeline

    base = prompt_encoder(pipe, settings)
    loaded, width = refiner is not None, pipe.text_encoder.config.hidden_size
    refiner_pipe = None
    if refiner is None or refiner.text_encoder_2 is pipe.text_encoder_2:
        encoders = PromptEncoders(base, None, loaded, width)
    else:
        components = {**pipe.components, "text_encoder_2": refiner.text_encoder_2}
        if getattr(refiner, "tokenizer_2", None) is not None:
            components["tokenizer_2"] = refiner.tokenizer_2
        refiner_pipe = StableDiffusionXLPipeline(**components)
        encoders = PromptEncoders(base, prompt_encoder(refiner_pipe, settings), loaded, width)
    targets = token_targets(pipe, refiner_pipe)
    downloads = embedding_downloads(settings)
    encoders.use_embeddings(EmbeddingManager(targets, settings.embedding_roots, encoders.vocabulary_changed, downloads))
    return encoders
