"""The embeddings-by-URL field group: ``embeddings``, textual-inversion files a job brings by URL, each under the word
its prompts use for it (files under EMBEDDINGS_DIR need no entry: their names are words already).

An entry is ``{"name": the word, "url": an http(s) URL, "sha256": the file's}``, the LoRA entry's pinning rule: a
URL needs ``sha256`` unless the endpoint trusts its https host (LORA_URL_HOSTS), and downloads must be allowed
(ALLOW_LORA_DOWNLOAD=1). Those rules depend on the endpoint, so the embedding manager checks them, not the schema.

The rule for names (:func:`usable_name`) is the prompt syntax's: a name holding ``(``, ``:``, ... could never be
written in a prompt as it is. :mod:`worker.adapters.embeddings` uses the same rule for file names.
"""

from __future__ import annotations

from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.sha256_pins import normalize_sha256
from core.url_targets import MAX_URL_CHARS
from worker.request.fields import REQUEST, REQUEST_CONFIG

MAX_EMBEDDING_URLS = 8
MAX_NAME_CHARS = 100
# Characters that are prompt syntax (attention, prompt editing, escapes) or the worker's private-token spelling.
SYNTAX_CHARACTERS: Final = frozenset("()[]<>:|\\")


def usable_name(name: str) -> bool:
    """Whether ``name`` can be written in a prompt as it is (no prompt syntax, no surrounding spaces)."""
    return bool(name) and name == name.strip() and not SYNTAX_CHARACTERS.intersection(name)


class EmbeddingUrl(BaseModel):
    """One embedding by URL: the word prompts name it by, where the file is, and the file's sha256."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    url: Annotated[str, Field(min_length=1, max_length=MAX_URL_CHARS)]  # a presigned URL can be long
    sha256: Annotated[str | None, Field(max_length=80)] = None

    @field_validator("name")
    @classmethod
    def _writable_in_a_prompt(cls, value: str) -> str:
        if not usable_name(value):
            raise ValueError(
                f"the word prompts use for the embedding; it cannot hold spaces at its ends or prompt syntax "
                f"({' '.join(sorted(SYNTAX_CHARACTERS))}); use a name like 'unaestheticXLv31'"
            )
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value[:8].lower().startswith(("http://", "https://")):
            raise ValueError("an http(s) URL of the .safetensors file; files under EMBEDDINGS_DIR need no entry")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256_form(cls, value: str | None) -> str | None:
        return None if value is None else normalize_sha256(value)


class EmbeddingFields(BaseModel):
    """Embeddings a job brings by URL (see the module docstring)."""

    model_config = REQUEST_CONFIG

    embeddings: Annotated[
        list[EmbeddingUrl],
        REQUEST,  # only this request's prompts are rewritten with them; each request of a call has its own
        Field(
            max_length=MAX_EMBEDDING_URLS,
            description='[{"name": the word the prompts use, "url": http(s) URL of an SDXL embedding, "sha256": its '
            "file's (64 hex; optional for LORA_URL_HOSTS)}]; ALLOW_LORA_DOWNLOAD=1",
        ),
    ] = []

    @model_validator(mode="after")
    def _distinct_names(self) -> EmbeddingFields:
        folded = [entry.name.lower() for entry in self.embeddings]
        twice = sorted({entry.name for entry in self.embeddings if folded.count(entry.name.lower()) > 1})
        if twice:
            raise ValueError(
                f"embeddings: {', '.join(twice)} given more than once (names compare without case); give each once"
            )
        return self
