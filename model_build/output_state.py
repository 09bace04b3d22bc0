"""Whether an existing output already holds the conversion asked for: the converter's up-to-date check.

A finished folder only ever appears by rename, so one whose manifest records this very source
(same sha256), dtype, VAE and converter version is trusted as it is: converting again would write
the same files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from model_build.manifest import (
    CONVERTER_VERSION,
    MANIFEST_NAME,
    ModelFolderError,
    SourceRecord,
    VaeRecord,
    sha256_file,
    verify,
)
from model_build.prediction import describe, matches

log = logging.getLogger("model_build")

State = Literal["missing", "current", "outdated", "damaged", "foreign"]


class FileIdentity:
    """A source file's identity for the manifest, hashed only when needed (7 GB take a while)."""

    def __init__(self, path: Path, name: str, sha256: str | None = None) -> None:
        self.path, self.name = path, name
        stat = path.stat()
        self.size, self.mtime_ns = stat.st_size, stat.st_mtime_ns
        self._sha256 = sha256

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            log.info("hashing %s (%.1f GB)", self.path.name, self.size / 1e9)
            self._sha256 = sha256_file(self.path)
        return self._sha256

    def same_as(self, recorded: SourceRecord | None) -> bool:
        if recorded is None or recorded.size != self.size:
            return False
        if recorded.mtime_ns == self.mtime_ns and self._sha256 is None:
            # Same size and modification time as when it was converted: trusted without rehashing, as
            # make and rsync do, so a worker's cold start does not read 7 GB off a network volume.
            self._sha256 = recorded.sha256
        return recorded.sha256 == self.sha256

    def record(self) -> SourceRecord:
        return SourceRecord(
            name=self.name, file=self.path.name, sha256=self.sha256, size=self.size, mtime_ns=self.mtime_ns
        )

    def vae_record(self, layout: str, ignored: tuple[str, ...]) -> VaeRecord:
        return VaeRecord(**self.record().model_dump(), layout=layout, ignored=ignored)


def output_state(
    output: Path,
    source: FileIdentity,
    vae: FileIdentity | None,
    dtype: str,
    prediction_type: str | None = None,
    zero_terminal_snr: bool | None = None,
) -> tuple[State, str]:
    """(state, why) for an existing output; why completes "OUTPUT ..." in a message.

    ``prediction_type``/``zero_terminal_snr``: the options given (None: not given, the recorded decision stands).
    """
    if not output.exists():
        return "missing", ""
    if not output.is_dir():
        return "foreign", "is a file, not a model folder"
    if not (output / MANIFEST_NAME).is_file():
        if not any(output.iterdir()):
            return "missing", ""
        return "foreign", "exists and was not made by model_build (it has no manifest.json)"
    try:
        manifest = verify(output, full=False)
    except ModelFolderError as error:
        return "damaged", f"is damaged: {error.message}"
    if manifest.converter_version != CONVERTER_VERSION:
        return "outdated", f"was made by converter version {manifest.converter_version} (this is {CONVERTER_VERSION})"
    if not source.same_as(manifest.source):
        recorded = manifest.source
        held = f"{recorded.name}, sha256 {recorded.sha256}" if recorded else "no recorded source"
        return "outdated", f"holds another checkpoint ({held})"
    if manifest.dtype != dtype:
        return "outdated", f"holds {manifest.dtype} weights, not {dtype}"
    recorded_vae = manifest.vae
    if vae is None and recorded_vae:
        return "outdated", f"was converted with --vae {recorded_vae.name}"
    if vae is not None and not vae.same_as(recorded_vae):
        other = f"with another VAE ({recorded_vae.name})" if recorded_vae else "without --vae"
        return "outdated", f"was converted {other}"
    recorded = manifest.effective_prediction
    if not matches(recorded, prediction_type, zero_terminal_snr):
        return "outdated", f"was converted as {describe(recorded)}"
    return "current", ""
