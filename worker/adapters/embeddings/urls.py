"""Embeddings a request brings by URL (its ``embeddings`` entries): downloaded once, kept under their hash.

The rules are the LoRA URLs' (:mod:`worker.adapters.downloads`, the checkpoint's download code underneath), with
the LoRA settings, since an endpoint that takes adapters by URL takes both kinds from the same hosts:
``ALLOW_LORA_DOWNLOAD=1``, a ``sha256`` per URL unless its https host is in ``LORA_URL_HOSTS``, public addresses
only unless ``ALLOW_PRIVATE_URLS=1``, ``LORA_DOWNLOAD_TIMEOUT_S``, the cache in ``LORA_DOWNLOAD_DIR`` (shared:
files are named by their sha256, so a LoRA and an embedding never take each other's place). The byte bound is an
embedding's (:data:`~worker.adapters.embeddings.files.MAX_FILE_BYTES`), not a LoRA's 2 GiB: a larger file would
be refused once read, so it is never downloaded whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.errors import EmbeddingFailed
from core.settings import Settings
from core.url_fetch import UrlPolicy, shown_url
from worker.adapters.downloads import UrlDownloads, default_download_dir, download_by_url
from worker.adapters.embeddings.files import MAX_FILE_BYTES
from worker.adapters.embeddings.names import fold
from worker.request.embeddings import EmbeddingUrl


@dataclass(frozen=True)
class RequestedEmbedding:
    """A request's embedding entry, its file in the download cache."""

    name: str  # the word, as the request spells it
    key: str  # the word folded (how prompts are matched)
    url: str  # as shown: without its query (which may hold a token)
    path: Path  # <cache>/sha256/<hex>.safetensors
    sha256: str
    field: str  # "embeddings[0]"


def embedding_downloads(settings: Settings) -> UrlDownloads:
    """The endpoint's rules for embeddings by URL (the module docstring)."""
    policy = UrlPolicy(
        settings.allow_private_urls,
        settings.lora_download_timeout_s,
        MAX_FILE_BYTES,
        timeout_setting="LORA_DOWNLOAD_TIMEOUT_S",
    )
    cache_dir = settings.lora_download_dir or default_download_dir()
    return UrlDownloads(
        settings.allow_lora_download,
        settings.lora_url_hosts,
        policy,
        cache_dir,
        "ALLOW_LORA_DOWNLOAD",
        "LORA_URL_HOSTS",
    )


def download_requested(
    entries: Sequence[EmbeddingUrl], downloads: UrlDownloads, instead: str
) -> list[RequestedEmbedding]:
    """Each entry's file, from the cache or downloaded now; every refusal an :class:`EmbeddingFailed` naming the
    entry's field. ``instead``: what else the user can do when downloads are off."""
    found = []
    for index, entry in enumerate(entries):
        field = f"embeddings[{index}]"
        cached = download_by_url(
            entry.url,
            entry.sha256,
            downloads,
            field=f"{field}.url",
            sha256_field=f"{field}.sha256",
            what="embedding",
            instead=instead,
            error=EmbeddingFailed,
        )
        found.append(
            RequestedEmbedding(entry.name, fold(entry.name), shown_url(entry.url), cached.path, cached.sha256, field)
        )
    return found
