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
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import EmbeddingFailed, first_line
from worker.adapters.embeddings.files import PARTS, read_embedding
from worker.adapters.embeddings.folders import EmbeddingFolders
from worker.adapters.embeddings.names import NameMatch, neutralize_reserved, token_for
from worker.adapters.embeddings.tokens import TokenTarget, add_vectors, remove_vectors

log = logging.getLogger(__name__)
# Private tokens are numbered for the whole process: two managers over one pipeline never hand out the same token.
_SERIALS = itertools.count(1)


@dataclass(frozen=True)
class LoadedEmbedding:
    """An embedding in the text encoders: its file (as it was when read) and its private token."""

    name: str
    path: Path
    identity: tuple[int, ...]
    sha256: str
    token: str
    count: int

    def entry(self) -> dict[str, Any]:
        """The job metadata's entry."""
        return {"name": self.name, "path": str(self.path), "sha256": self.sha256, "vectors": self.count}


def _identity(path: Path) -> tuple[int, ...]:
    """Changes when the file is replaced or rewritten (ctime and inode catch a copy that keeps size and mtime)."""
    info = os.stat(path)
    return (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)


class EmbeddingManager:
    """Every embedding in one worker's text encoders; see the module docstring."""

    def __init__(
        self, targets: Sequence[TokenTarget], roots: tuple[Path, ...], on_vocabulary_change: Callable[[], None]
    ) -> None:
        self.targets = list(targets)
        self.widths = {target.part: target.width for target in self.targets}
        if set(self.widths) != set(PARTS):
            raise ValueError(f"embeddings need a clip_l and a clip_g text encoder, got {sorted(self.widths)}")
        self.folders = EmbeddingFolders(roots)
        self.loaded: dict[str, LoadedEmbedding] = {}  # by folded name
        self.on_vocabulary_change = on_vocabulary_change
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

    def rewrite(self, text: str, field_name: str) -> tuple[str, dict[str, dict[str, Any]]]:
        """``text`` with each embedding name replaced by its token, and the embeddings used (name -> entry)."""
        if self.loaded:
            text = neutralize_reserved(text)
        matches = self.folders.finder.find(text) if self.folders.finder else []
        if not matches:
            return text, {}
        pieces: list[str] = []
        used: dict[str, dict[str, Any]] = {}
        position = 0
        for match in matches:
            loaded = self._ensure_loaded(match, field_name)
            # Spaces around the token: the neighbours are other CLIP words already, and stay the words they were.
            pieces += [text[position : match.start], f" {loaded.token} "]
            position = match.end
            used[loaded.name] = loaded.entry()
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
        embedding = read_embedding(path, named.name, field_name, self.widths)
        token = token_for(next(_SERIALS))
        try:
            add_vectors(self.targets, token, embedding.vectors, f"{field_name}: {named.name!r}")
        except ValueError as error:  # diffusers' loader refused it, after every check here passed
            raise EmbeddingFailed(
                f"{field_name}: the embedding {path} could not be loaded: {first_line(error)}"
            ) from None
        finally:
            self.on_vocabulary_change()  # loaded, or taken out again: either way the tokenizers were touched
        loaded = LoadedEmbedding(named.name, path, identity, embedding.sha256, token, embedding.count)
        self.loaded[match.key] = loaded
        log.info("embedding %s loaded from %s (%d vectors, sha256 %s)", named.name, path, loaded.count, loaded.sha256)
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
