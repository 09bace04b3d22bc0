"""A LoRA entry of the request: which file (a name under LORA_DIR, hf://, or a URL with its sha256) and its weight."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.sha256_pins import normalize_sha256
from core.url_targets import MAX_URL_CHARS
from worker.request.fields import number_from_int


def _is_url(name: str) -> bool:
    return name[:8].lower().startswith(("http://", "https://"))


class LoraRequest(BaseModel):
    """One LoRA to apply: a file name under LORA_DIR, hf://repo/file@revision or an http(s) URL, and its weight.

    A URL needs ``sha256`` (the file's, 64 hex digits) unless the endpoint trusts its host (LORA_URL_HOSTS); that
    rule depends on the endpoint, so the LoRA resolver checks it, not the schema.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, Field(min_length=1, max_length=MAX_URL_CHARS)]  # a presigned URL can be long
    scale: Annotated[float, Field(ge=-5.0, le=5.0, allow_inf_nan=False)] = 1.0
    sha256: Annotated[str | None, Field(max_length=80)] = None

    _int_scale_is_fine = field_validator("scale", mode="before")(number_from_int)

    @field_validator("sha256")
    @classmethod
    def _sha256_form(cls, value: str | None) -> str | None:
        return None if value is None else normalize_sha256(value)

    @model_validator(mode="after")
    def _sha256_pins_a_url(self) -> LoraRequest:
        if self.sha256 is not None and not _is_url(self.name):
            raise ValueError(
                "sha256: pins a LoRA given by http(s) URL; for a file under LORA_DIR or an hf:// name at a commit "
                "leave it out"
            )
        return self
