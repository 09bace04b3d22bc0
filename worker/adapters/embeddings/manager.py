"""Textual-inversion embeddings per prompt: names found in the text, files loaded on first use, tokens in their place.

The manager is the prompt encoders' :class:`~worker.prompting.vocabulary.EmbeddingNames`: every weighted run of a
prompt passes through :meth:`EmbeddingManager.rewrite` before it is tokenized. A name of a file under the embedding
roots (:mod:`.folders`), written as :mod:`.names` says, is replaced by the embedding's private token; the first time
a name is used its file is read and checked (:mod:`.files`) and its vectors are added to every text encoder
(:mod:`.tokens`: ``clip_l`` to ``text_encoder``, ``clip_g`` to ``text_encoder_2`` and to a refiner's own bigG
encoder), after which the prompt encoders are told the vocabulary changed (their cached prompts and CUDA graphs go).
A word that names no embedding stays text. Loaded embeddings stay loaded; texts that do not name them are tokenized
exactly as before (their tokens are private), so a job gives the same bytes whatever earlier jobs loaded.

:meth:`refresh` runs once per encode: files added, removed, renamed or rewritten since the last look are noticed
(a ``stat`` per folder and per loaded file), a changed or removed file's embedding is unloaded, and the prompt
caches are cleared, since a cached prompt may have read a name the other way.

Embeddings by URL
    A request's ``embeddings`` entries (:mod:`.urls`) name words for this request only, inside :meth:`requested`:
    its files are downloaded (or found in the download cache) first, an entry whose word no prompt of the request
    names is an error, and the entries' words take precedence over file names under the folders. Their
    embeddings stay loaded by sha256 (whichever word or URL named them), at most :data:`MAX_URL_EMBEDDINGS`; the
    least recently used goes first. :meth:`cache_context` tells the prompt cache which words meant which files.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import EmbeddingFailed, first_line
from worker.adapters.downloads import UrlDownloads
from worker.adapters.embeddings.files import PARTS, read_embedding
from worker.adapters.embeddings.folders import EmbeddingFolders
from worker.adapters.embeddings.names import NameFinder, NameMatch, fold, neutralize_reserved, token_for
from worker.adapters.embeddings.tokens import TokenTarget, add_vectors, remove_vectors
from worker.adapters.embeddings.urls import RequestedEmbedding, download_requested
from worker.request.embeddings import EmbeddingUrl

log = logging.getLogger(__name__)
# Private tokens are numbered for the whole process: two managers over one pipeline never hand out the same token.
_SERIALS = itertools.count(1)
MAX_URL_EMBEDDINGS = 64  # embeddings by URL kept loaded (each is a few rows of the token-embedding matrices)


@dataclass(frozen=True)
class LoadedEmbedding:
    """An embedding in the text encoders: its file (as it was when read) and its private token."""

    name: str
    path: Path
    identity: tuple[int, ...]
    sha256: str
    token: str
    count: int

    def entry(self, requested: RequestedEmbedding | None = None) -> dict[str, Any]:
        """The job metadata's entry (for an embedding by URL: the request's word and the URL, query left out)."""
        name = self.name if requested is None else requested.name
        entry = {"name": name, "path": str(self.path), "sha256": self.sha256, "vectors": self.count}
        return entry if requested is None else {**entry, "url": requested.url}


def _identity(path: Path) -> tuple[int, ...]:
    """Changes when the file is replaced or rewritten (ctime and inode catch a copy that keeps size and mtime)."""
    info = os.stat(path)
    return (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)


class EmbeddingManager:
    """Every embedding in one worker's text encoders; see the module docstring."""

    def __init__(
        self,
        targets: Sequence[TokenTarget],
        roots: tuple[Path, ...],
        on_vocabulary_change: Callable[[], None],
        downloads: UrlDownloads | None = None,
    ) -> None:
        self.targets = list(targets)
        self.widths = {target.part: target.width for target in self.targets}
        if set(self.widths) != set(PARTS):
            raise ValueError(f"embeddings need a clip_l and a clip_g text encoder, got {sorted(self.widths)}")
        self.folders = EmbeddingFolders(roots)
        self.loaded: dict[str, LoadedEmbedding] = {}  # by folded name
        self.on_vocabulary_change = on_vocabulary_change
        self.downloads = downloads  # None: embeddings by URL are not offered (tests, tools)
        self.by_url: OrderedDict[str, LoadedEmbedding] = OrderedDict()  # by sha256, least recently used first
        self._requested: dict[str, RequestedEmbedding] = {}  # by folded word, inside requested()
        self._request_finder: NameFinder | None = None
        self.folders.refresh()

    def refresh(self) -> None:
        """Notice changed folders and files (see the module docstring)."""
        changed = self.folders.refresh()
        stale = [key for key, loaded in self.loaded.items() if not self._still_current(key, loaded)]
        for key in stale:
            loaded = self.loaded.pop(key)
            remove_vectors(self.targets, loaded.token, loaded.count)
            log.info("embedding %s changed or went from %s: unloaded", loaded.name, loaded.path)
        if changed or stale:
            self.on_vocabulary_change()

    @contextmanager
    def requested(self, entries: Sequence[EmbeddingUrl], texts: Sequence[str]) -> Iterator[None]:
        """Within this block the words of a request's ``entries`` name their files (the module docstring);
        ``texts``: every prompt text of the request, where each word must appear."""
        if not entries:
            yield
            return
        if self.downloads is None:
            raise EmbeddingFailed("embeddings: this worker takes no embeddings by URL; name files in the prompts")
        finder = NameFinder(fold(entry.name) for entry in entries)
        named = {match.key for text in texts for match in finder.find(text)}
        for index, entry in enumerate(entries):  # before any download: a job refused here costs nothing
            if fold(entry.name) not in named:
                raise EmbeddingFailed(
                    f"embeddings[{index}].name: no prompt of this job names {entry.name!r} as a word of its own; "
                    f"write it in prompt or negative_prompt ({entry.name} or embedding:{entry.name}), or leave the "
                    "entry out"
                )
        requested = download_requested(entries, self.downloads, f"put the file under {self.folders.roots_text()}")
        self._requested = {entry.key: entry for entry in requested}
        self._request_finder = NameFinder([*self._requested, *self.folders.index])
        try:
            yield
        finally:
            self._requested, self._request_finder = {}, None

    def cache_context(self) -> tuple:
        """What a prompt's encoding depends on besides its text: which files the request's own words mean."""
        return tuple(sorted((key, entry.sha256) for key, entry in self._requested.items()))

    def rewrite(self, text: str, field_name: str) -> tuple[str, dict[str, dict[str, Any]]]:
        """``text`` with each embedding name replaced by its token, and the embeddings used (name -> entry)."""
        if self.loaded or self.by_url:
            text = neutralize_reserved(text)
        finder = self._request_finder or self.folders.finder
        matches = finder.find(text) if finder else []
        if not matches:
            return text, {}
        pieces: list[str] = []
        used: dict[str, dict[str, Any]] = {}
        position = 0
        for match in matches:
            requested = self._requested.get(match.key) if match.key is not None else None
            loaded = self._ensure_url_loaded(requested) if requested else self._ensure_loaded(match, field_name)
            # Spaces around the token: the neighbours are other CLIP words already, and stay the words they were.
            pieces += [text[position : match.start], f" {loaded.token} "]
            position = match.end
            entry = loaded.entry(requested)
            used[entry["name"]] = entry
        pieces.append(text[position:])
        return "".join(pieces), used

    def loaded_names(self) -> list[str]:
        return sorted(loaded.name for loaded in self.loaded.values())

    # -- internals --------------------------------------------------------------------------------------------------

    def _still_current(self, key: str, loaded: LoadedEmbedding) -> bool:
        named = self.folders.index.get(key)
        if named is None or named.paths != (loaded.path,):
            return False
        try:
            return _identity(loaded.path) == loaded.identity
        except OSError:
            return False

    def _ensure_loaded(self, match: NameMatch, field_name: str) -> LoadedEmbedding:
        if match.key is None:
            raise EmbeddingFailed(
                f"{field_name}: 'embedding:{match.word}': no embedding named {match.word!r} in "
                f"{self.folders.roots_text()}; {self.folders.available()}"
            )
        loaded = self.loaded.get(match.key)
        if loaded is not None:
            return loaded
        named = self.folders.index[match.key]
        if len(named.paths) > 1:
            shown = ", ".join(str(path) for path in named.paths[:4])
            raise EmbeddingFailed(
                f"{field_name}: {match.word!r} names {len(named.paths)} embedding files ({shown}); names compare "
                "without case and subfolders: rename all but one"
            )
        path = named.paths[0]
        try:
            identity = _identity(path)
        except OSError as error:
            raise EmbeddingFailed(
                f"{field_name}: {match.word!r} names {path}, which is gone ({first_line(error)})"
            ) from None
        loaded = self._load(path, named.name, field_name, identity)
        self.loaded[match.key] = loaded
        return loaded

    def _ensure_url_loaded(self, requested: RequestedEmbedding) -> LoadedEmbedding:
        loaded = self.by_url.get(requested.sha256)
        if loaded is not None:
            self.by_url.move_to_end(requested.sha256)
            return loaded
        in_use = {entry.sha256 for entry in self._requested.values()}
        for sha256 in [sha256 for sha256 in self.by_url if sha256 not in in_use]:
            if len(self.by_url) < MAX_URL_EMBEDDINGS:
                break
            evicted = self.by_url.pop(sha256)
            remove_vectors(self.targets, evicted.token, evicted.count)
            log.info("embedding %s (sha256 %s) unloaded: the least recently used by URL", evicted.name, sha256)
        field = f"{requested.field}.url ({requested.url})"  # the file is what is wrong, whichever prompt named it
        loaded = self._load(requested.path, requested.name, field, _identity(requested.path))
        self.by_url[requested.sha256] = loaded
        return loaded

    def _load(self, path: Path, name: str, field_name: str, identity: tuple[int, ...]) -> LoadedEmbedding:
        """Read and check ``path`` and add its vectors to every encoder under a new private token."""
        embedding = read_embedding(path, name, field_name, self.widths)
        token = token_for(next(_SERIALS))
        try:
            add_vectors(self.targets, token, embedding.vectors, f"{field_name}: {name!r}")
        except ValueError as error:  # diffusers' loader refused it, after every check here passed
            raise EmbeddingFailed(
                f"{field_name}: the embedding {path} could not be loaded: {first_line(error)}"
            ) from None
        finally:
            self.on_vocabulary_change()  # loaded, or taken out again: either way the tokenizers were touched
        loaded = LoadedEmbedding(name, path, identity, embedding.sha256, token, embedding.count)
        log.info("embedding %s loaded from %s (%d vectors, sha256 %s)", name, path, loaded.count, loaded.sha256)
        return loaded


def token_targets(pipe: Any, refiner_pipe: Any | None = None) -> list[TokenTarget]:
    """The pairs an SDXL embedding goes into: the base's two, and a refiner's own bigG pair when it has one."""
    targets = [
        TokenTarget("clip_l", pipe.tokenizer, pipe.text_encoder),
        TokenTarget("clip_g", pipe.tokenizer_2, pipe.text_encoder_2),
    ]
    if refiner_pipe is not None and refiner_pipe.text_encoder_2 is not pipe.text_encoder_2:
        if refiner_pipe.tokenizer_2 is pipe.tokenizer_2:
            raise ValueError("a refiner with its own text_encoder_2 needs its own tokenizer_2 for embeddings")
        targets.append(TokenTarget("clip_g", refiner_pipe.tokenizer_2, refiner_pipe.text_encoder_2))
    return targets
