"""``hf://owner/repo/path/to/file@<40-hex commit>``: one parser for the converter's sources and the worker's LoRAs.

Also the one test of whether a source names something remote (``scheme://...``) rather than a local path.

A name must pin a full commit: branch and tag names move, and a cached file must be the bytes the
user meant. The file path inside the repository is checked so that it cannot climb out of the
download cache (no empty, ``.`` or ``..`` parts, no backslash), and pickle files are refused by
name before anything is downloaded. Callers turn :class:`HubNameError` into their own error kind
and prefix (the converter's ``FetchError``, the worker's ``loras[i].name: ...``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.safetensors_files import PICKLE_SUFFIXES, pickle_suffix

HF_PREFIX = "hf://"
HF_FORM = "hf://<owner>/<repo>/<file>@<40-hex commit>"
_COMMIT = re.compile(r"[0-9a-fA-F]{40}")
# The Hub's rule for owner and repository names.
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def has_url_scheme(text: str) -> bool:
    """``scheme://...``: a remote source (``hf://`` included), never a local path."""
    return bool(_URL_SCHEME.match(text))


class HubNameError(ValueError):
    """The name is not a usable pinned Hub file; ``str()`` completes "<the name> ..." and says how to write it."""


@dataclass(frozen=True)
class HubFileName:
    repo_id: str  # owner/repo
    filename: str  # path inside the repository
    revision: str  # 40 lower-case hex digits

    @property
    def uri(self) -> str:
        return f"{HF_PREFIX}{self.repo_id}/{self.filename}@{self.revision}"

    def __str__(self) -> str:
        return self.uri


def is_hub_name(text: str) -> bool:
    return text.startswith(HF_PREFIX)


def parse_hub_name(text: str) -> HubFileName:
    """``hf://owner/repo/path/file@<40-hex commit>`` -> :class:`HubFileName`, or :class:`HubNameError` saying why."""
    if not is_hub_name(text):
        raise HubNameError(f"is not an hf:// name; write {HF_FORM}")
    body, at, revision = text.removeprefix(HF_PREFIX).rpartition("@")
    if not at:
        raise HubNameError(
            f"names no revision; pin the exact file with a commit hash so the same bytes come every time: {HF_FORM}"
        )
    if not _COMMIT.fullmatch(revision):
        raise HubNameError(
            f"revision {revision!r} is not a 40-hex commit hash. Branch and tag names move; pin the commit "
            f"(the file's page on the Hub lists it under 'History'): {HF_FORM}"
        )
    parts = body.split("/")
    if len(parts) < 3 or not parts[0] or not parts[1]:
        raise HubNameError(f"does not name a repository and a file; write {HF_FORM}")
    owner, repo, path = parts[0], parts[1], parts[2:]
    if not (_REPO_PART.fullmatch(owner) and _REPO_PART.fullmatch(repo)) or "@" in body:
        raise HubNameError(f"has an invalid repository name {owner}/{repo}; write {HF_FORM}")
    if any(part in ("", ".", "..") for part in path) or "\\" in body:
        raise HubNameError(f"has an invalid file path inside the repository ({'/'.join(path)!r}); write {HF_FORM}")
    filename = "/".join(path)
    if pickle_suffix(filename):
        raise HubNameError(
            f"is a pickle file ({', '.join(PICKLE_SUFFIXES)}), which can run arbitrary code when loaded and is never "
            "downloaded or opened here; use the .safetensors file"
        )
    return HubFileName(repo_id=f"{owner}/{repo}", filename=filename, revision=revision.lower())
