"""Reading a checkpoint file safely: its format judged before any parser sees it, its header parsed by hand.

The format is judged from the file name and its first bytes, so a pickle is never handed to anything that could
unpickle it. The safetensors header is then parsed by hand, so a truncated download is named as such instead of
"incomplete metadata". :class:`TensorReader` reads one tensor at a time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from core.safetensors_files import (
    SNIFF_BYTES,
    SafetensorsDamage,
    SafetensorsHeader,
    foreign_format,
    pickle_suffix,
)
from core.safetensors_files import read_header as read_safetensors_header
from model_build.errors import CheckpointError

# --- 1. format: decided from the name and the safetensors header, before any other parser sees the file ---

_FORMAT_ADVICE = {
    "a GGUF file (quantised weights)": "only .safetensors checkpoints convert",
    "a Git LFS pointer, not the file itself": "run `git lfs pull` or download the file",
    "an HTML page (a download that returned an error or a login page)": (
        "check the URL (and your access to it) and fetch it again"
    ),
}


def check_file_format(path: Path, role: str = "checkpoint") -> None:
    """Refuse anything that is not plausibly a safetensors file, above all pickles (never unpickled).

    A pickle suffix is refused by name alone. Otherwise the file's own safetensors header decides
    (:func:`core.safetensors_files.foreign_format`); only a file that does not start like one is
    named by the magic bytes of another format. :func:`read_header` checks the header in full.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{role} {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{role} {path} is a folder; pass the single-file .safetensors checkpoint")
    if not path.is_file():
        raise CheckpointError(f"{role} {path} is not a regular file (a pipe, socket or device); pass a .safetensors")
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
    suffix = pickle_suffix(path.name)
    other = foreign_format(head, path.stat().st_size)
    pickle_kind = other[0] if other and other[1] else (f"a {suffix} file" if suffix else None)
    if pickle_kind:
        raise CheckpointError(
            f"{path.name} is {pickle_kind}, a pickle checkpoint: loading a pickle can run arbitrary code, so it is "
            "never opened here. Use the model's .safetensors release, or convert the file to safetensors yourself "
            "in a sandbox you trust."
        )
    if other:
        description = other[0]
        raise CheckpointError(f"{path.name} is {description}, not a checkpoint; {_FORMAT_ADVICE[description]}")


# --- 2. the safetensors header, parsed by hand so that damage is named precisely ---

_DAMAGE_ADVICE = {
    "truncated": "The download or copy was cut short; fetch it again (a --sha256 pin catches this).",
    "corrupt": "Fetch it again.",
    "not_safetensors": "Only .safetensors checkpoints convert; fetch it again if it should be one.",
}


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate the header; raise :class:`CheckpointError` for a truncated or corrupt file."""
    path = Path(path)
    try:
        header = read_safetensors_header(path)
    except SafetensorsDamage as damage:
        raise CheckpointError(f"{path.name} {damage}. {_DAMAGE_ADVICE[damage.kind]}") from None
    try:  # the library must agree before anything is read through it
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except SafetensorError as error:
        raise CheckpointError(f"{path.name} is not a valid safetensors file ({error}); fetch it again") from error
    return header


_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class TensorReader:
    """Reads one tensor at a time with plain file reads.

    safetensors' own reader maps the file: every page it touches stays mapped, and counted in the
    process's memory, until the file is closed, so streaming a 7 GB checkpoint through it shows up
    as 7 GB more memory. Plain reads leave only the tensor itself (the page cache is the kernel's).
    """

    def __init__(self, path: Path, header: SafetensorsHeader | None = None) -> None:
        self.path = Path(path)
        self.header = header or read_header(self.path)
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 (closed by close() / the with block)

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def get(self, key: str) -> torch.Tensor:
        entry = self.header.tensors[key]
        dtype = _TORCH_DTYPES.get(entry.dtype)
        if dtype is None:
            raise CheckpointError(f"tensor {key} of {self.path.name} has dtype {entry.dtype}, which is not converted")
        data = bytearray(entry.end - entry.begin)
        view, done = memoryview(data), 0
        self._file.seek(self.header.data_start + entry.begin)
        while done < len(data):
            count = self._file.readinto(view[done:])
            if not count:
                raise CheckpointError(f"{self.path.name} ended while reading tensor {key}: the file was cut short")
            done += count
        if not data:
            return torch.empty(entry.shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(entry.shape)
