"""Which requests may share one pipeline call: the group key, built from the schema's field declarations."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from pydantic import BaseModel

from worker.request.schema import GROUP_FIELDS, GenerationRequest

if TYPE_CHECKING:  # the planner orders lines by fields_key without loading torch
    from worker.prompting.encoded import EncodedPrompts

INLINE_IMAGE_FIELDS = frozenset({"mask", "mask_url"})


def group_key(request: GenerationRequest, encoded: EncodedPrompts, hires: EncodedPrompts | None = None) -> tuple:
    """Requests with equal keys can share one pipeline call (same latent shape, schedule, weights and inputs).

    Built from every field the schema declares ``Scope.GROUP`` (a call runs with its first request's values of
    those), plus what follows from them: the prompt's chunk count (the embeddings' shape), whether the size
    was given, whether it is img2img and, where it shapes the call, its picture (:func:`_picture_key`); with a hires
    pass, its prompts' chunk count too (``hires``: their encoding; ``hr_prompt`` is each request's own).
    """
    return (*fields_key(request), encoded.num_chunks, hires.num_chunks if hires is not None else None)


def fields_key(request: GenerationRequest) -> tuple:
    """The part of :func:`group_key` the request alone gives (no prompt encoded): requests whose keys differ here
    never share a call, and those equal here almost always do (unless their prompts' chunk counts differ). The batch
    runner orders its lines by it, so each group's images come together and only its last call is partial."""
    values = []
    for name in GROUP_FIELDS:
        value = getattr(request, name)
        if name in INLINE_IMAGE_FIELDS and value is not None:
            value = hashlib.sha256(value.encode()).hexdigest()  # data URIs can be megabytes
        elif isinstance(value, list):
            value = tuple(
                tuple((k, _short(v)) for k, v in item.model_dump().items()) if hasattr(item, "model_dump") else item
                for item in value
            )
        elif isinstance(value, BaseModel):
            value = tuple(value.model_dump().items())
        values.append(value)
    return (*values, request.size_given, _picture_key(request))


def _picture_key(request: GenerationRequest) -> tuple[bool, str | None]:
    """Whether the request is img2img, and its picture where that shapes the call: without width/height the output
    takes the picture's size, and an inpainting call's mask and crop are planned on it. Otherwise each request of a
    call starts from its own picture (``image_url`` is a per-request field): an img2img run over many pictures fills
    whole calls instead of padding each picture's."""
    if request.image_url is None or (request.size_given and not request.is_inpainting):
        return request.image_url is not None, None
    return True, hashlib.sha256(request.image_url.encode()).hexdigest()  # data URIs can be megabytes


def _short(value: object) -> object:
    """A long string (a control image's data URI) by its hash, so a key stays small."""
    return hashlib.sha256(value.encode()).hexdigest() if isinstance(value, str) and len(value) > 256 else value
