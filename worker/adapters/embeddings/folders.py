"""Which embedding files a prompt can name: the files under the embedding roots, by the name prompts use.

The roots are ``EMBEDDINGS_DIR`` (default ``/runpod-volume/embeddings``, ``:``-separated) and then the image's baked
``/embeddings``. A file's name without its suffix is its name, as in A1111 (``negatives/easynegative.safetensors``
is ``easynegative``; subfolders only sort files), compared without regard to case. The first root that has a name
decides; two files of one name in that root are ambiguous, an error when a prompt names it. Pickle files
(``.pt``, ``.bin``, ...; A1111 reads them) are listed too, so that naming one is an error saying so rather than
plain text. Names holding prompt syntax (``(``, ``:``, ...) cannot be written in a prompt and are left out, with a
warning in the log.

The folders are listed again only when one of them changed (its modification time: a file added, removed or
renamed), so looking costs a ``stat`` per folder per job. No file is read here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from worker.adapters.embeddings.names import FILE_SUFFIXES, NameFinder, fold
from worker.request.embeddings import usable_name

log = logging.getLogger(__name__)

MAX_SCANNED_FILES = 10_000  # a name index is for prompts; never let it crawl a huge volume
MAX_LISTED_NAMES = 20
SUFFIXES = FILE_SUFFIXES


@dataclass(frozen=True)
class NamedFiles:
    """The files one name means in the first root that has it (more than one: ambiguous)."""

    name: str  # as the first file spells it
    paths: tuple[Path, ...]


class EmbeddingFolders:
    """The name index of the embedding roots, listed again when a folder changes (:meth:`refresh`)."""

    def __init__(self, roots: tuple[Path, ...]) -> None:
        self.roots = roots
        self.index: dict[str, NamedFiles] = {}  # folded name -> files
        self.finder = NameFinder(())
        self._folders: tuple[Path, ...] = roots  # every folder of the last listing, whose changes are watched
        self._signature: tuple | None = None

    def refresh(self) -> bool:
        """List the folders again if one changed; True when the names or their files changed."""
        signature = self._signature_of(self._folders)
        if signature == self._signature:
            return False
        index, folders = self._scan()
        self._folders = folders
        self._signature = self._signature_of(folders)
        if index == self.index:
            return False
        self.index = index
        self.finder = NameFinder(index)
        return True

    def available(self, limit: int = MAX_LISTED_NAMES) -> str:
        """The names prompts can use, for error messages."""
        names = sorted(named.name for named in self.index.values())
        if not names:
            existing = [str(root) for root in self.roots if root.is_dir()]
            where = ", ".join(existing) if existing else f"none of the folders exists ({self.roots_text()})"
            return f"there are no embedding files in {where}"
        more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
        return "available: " + ", ".join(names[:limit]) + more

    def roots_text(self) -> str:
        return ", ".join(str(root) for root in self.roots)

    @staticmethod
    def _signature_of(folders: tuple[Path, ...]) -> tuple:
        parts = []
        for folder in folders:
            try:
                info = os.stat(folder)
            except OSError:
                parts.append((folder, None))
                continue
            parts.append((folder, info.st_mtime_ns, info.st_ino))
        return tuple(parts)

    def _scan(self) -> tuple[dict[str, NamedFiles], tuple[Path, ...]]:
        found: dict[str, list[tuple[int, str, Path]]] = {}
        folders: list[Path] = list(self.roots)
        scanned = 0
        for rank, root in enumerate(self.roots):
            if not root.is_dir():
                continue
            for folder, subfolders, files in os.walk(root):  # does not descend into linked folders
                subfolders[:] = sorted(sub for sub in subfolders if not sub.startswith("."))
                folders.extend(Path(folder) / sub for sub in subfolders)
                for file in sorted(files):
                    scanned += 1
                    if scanned > MAX_SCANNED_FILES:
                        log.warning("more than %d files under %s: the rest are not listed", MAX_SCANNED_FILES, root)
                        return self._named(found), tuple(folders)
                    suffix = next((s for s in SUFFIXES if file.lower().endswith(s)), None)
                    if file.startswith(".") or suffix is None:
                        continue
                    name = file[: -len(suffix)]
                    if not usable_name(name):
                        log.warning("embedding file %s cannot be named in a prompt as it is: rename it", file)
                        continue
                    found.setdefault(fold(name), []).append((rank, name, Path(folder) / file))
        return self._named(found), tuple(folders)

    @staticmethod
    def _named(found: dict[str, list[tuple[int, str, Path]]]) -> dict[str, NamedFiles]:
        index = {}
        for key, entries in found.items():
            first_rank = min(rank for rank, _, _ in entries)
            mine = [(name, path) for rank, name, path in entries if rank == first_rank]
            index[key] = NamedFiles(mine[0][0], tuple(path for _, path in mine))
        return index
