"""What a weights file is, decided from its bytes: a safetensors header, read and checked by hand, or a refusal.

One implementation for the converter (checkpoints, ``--vae`` files) and the LoRA loader. Pure
Python and json: no torch, no safetensors library, so it runs before anything that could execute
a file's contents.

The format is decided by the safetensors header itself: 8 bytes of little-endian header length,
then that many bytes of JSON starting with ``{`` (the format requires it). Only a file that does
not start like that is then compared with the magic bytes of other formats. Guessing "pickle" from
a first byte of 0x80 is wrong: that byte is the low byte of the header length, and headers padded
to a multiple of 8 make about one safetensors file in 32 start with it.

Pickle files (``.ckpt``, ``.pt``, ``.bin``, ...) can run arbitrary code when loaded; they are
recognised by name and by content and never opened by anything here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

# Formats built on pickle: loading one can run arbitrary code, so they are refused by name before any read.
PICKLE_SUFFIXES: tuple[str, ...] = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
SAFETENSORS_SUFFIX = ".safetensors"
# The safetensors library refuses larger headers (its MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
SNIFF_BYTES = 64  # enough of a file's start to tell every format named below

# Bits per element of every safetensors dtype (the library's Dtype enum).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
# Floating-point dtypes whose values are weights as written (F8_E8M0 is a bare exponent, F4/F6 need block scales).
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

# What a file is when it is not safetensors, by its first bytes: (magic, description, is a pickle).
_OTHER_FORMATS: tuple[tuple[bytes, str, bool], ...] = (
    (b"PK\x03\x04", "a PyTorch zip archive of pickles", True),
    (b"GGUF", "a GGUF file (quantised weights)", False),
    (b"version https://git-lfs", "a Git LFS pointer, not the file itself", False),
)


class SafetensorsDamage(ValueError):
    """The file is not a well-formed safetensors file. ``str()`` completes "<file name> ..."; ``kind`` says how.

    Kinds: ``not_safetensors`` (the start is not a safetensors header), ``truncated`` (cut short),
    ``corrupt`` (the header or the layout is inconsistent).
    """

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # safetensors' name: F16, BF16, F32, I64, ...
    shape: tuple[int, ...]
    begin: int = 0  # byte offsets into the data section
    end: int = 0

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int = 0  # file offset of the data section (8 + header length)

    @property
    def data_bytes(self) -> int:
        return max((entry.end for entry in self.tensors.values()), default=0)


def pickle_suffix(name: str | os.PathLike) -> str | None:
    """The pickle suffix ``name`` ends with (lower case), or None."""
    text = os.fspath(name).lower()
    return next((suffix for suffix in PICKLE_SUFFIXES if text.endswith(suffix)), None)


def header_length(head: bytes) -> int | None:
    """The header length in the first 8 bytes, or None when too few bytes are given."""
    return int.from_bytes(head[:8], "little") if len(head) >= 8 else None


def starts_like_safetensors(head: bytes, size: int) -> bool:
    """A plausible header length (1..MAX_HEADER_BYTES) followed by ``{``; whether it fits ``size`` is checked later.

    ``head`` is the file's first bytes (at least 9 of them for a yes).
    """
    length = header_length(head)
    if length is None or not 0 < length <= MAX_HEADER_BYTES or len(head) < 9:
        return False
    return head[8:9] == b"{" and size >= 9


def foreign_format(head: bytes, size: int) -> tuple[str, bool] | None:
    """What a file is when it is not safetensors: (description, is a pickle); None when it starts like safetensors
    (then :func:`parse_header` has the last word) or like nothing known (:func:`parse_header` names the damage).

    ``head`` is the file's first :data:`SNIFF_BYTES` bytes. The safetensors header is asked first.
    """
    if starts_like_safetensors(head, size):
        return None
    for magic, description, is_pickle in _OTHER_FORMATS:
        if head.startswith(magic):
            return description, is_pickle
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        # The PROTO opcode and a protocol number: what pickle.dump and torch's legacy (non-zip) format write.
        return "a raw pickle", True
    if head.lstrip().lower().startswith((b"<!doctype", b"<html")):
        return "an HTML page (a download that returned an error or a login page)", False
    return None


def parse_header(head: bytes, size: int) -> SafetensorsHeader:
    """Parse and check the header at the start of a file of ``size`` bytes; ``head`` must hold 8 + its length.

    Raises :class:`SafetensorsDamage`. Checks what the safetensors library checks before it reads a
    tensor (dtype, shape and byte size agree; tensors tile the data section with no gap or overlap;
    the data section ends where the file ends), so a damaged file is named before anything reads it.
    """
    if size < 8:
        raise SafetensorsDamage("not_safetensors", f"is not a safetensors file ({size} bytes): empty or cut short")
    length = header_length(head)
    assert length is not None
    if length == 0 or length > MAX_HEADER_BYTES:
        raise SafetensorsDamage(
            "not_safetensors", f"is not a safetensors file (its first 8 bytes give a header of {length} bytes)"
        )
    if 8 + length > size:
        raise SafetensorsDamage(
            "truncated", f"is truncated: its header alone needs {8 + length} bytes, the file has {size}"
        )
    if len(head) < 8 + length:
        raise ValueError(f"parse_header needs the first {8 + length} bytes, got {len(head)}")  # a caller's bug
    raw = head[8 : 8 + length]
    if raw[:1] != b"{":  # the format requires it; a plausible length makes this a damaged header, not another format
        start = bytes(raw[:8])
        raise SafetensorsDamage("corrupt", f"has a corrupt safetensors header (it starts with {start!r}, not '{{')")
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise ValueError("__metadata__ is not a JSON object")
        tensors = {str(key): _entry(str(key), entry) for key, entry in header.items()}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise SafetensorsDamage("corrupt", f"has a corrupt safetensors header ({error})") from None
    _check_layout(tensors)
    result = SafetensorsHeader(tensors, {str(k): str(v) for k, v in metadata.items()}, 8 + length)
    available = size - result.data_start
    data_end = result.data_bytes
    if available < data_end:
        raise SafetensorsDamage(
            "truncated",
            f"is truncated: its header describes {data_end:,} bytes of tensor data, the file holds {available:,} "
            f"({100 * available / max(data_end, 1):.0f}%)",
        )
    if available > data_end:
        raise SafetensorsDamage(
            "corrupt",
            f"is corrupt: {available - data_end:,} bytes follow the last tensor, which safetensors does not allow "
            "(something was appended to the file)",
        )
    return result


def _entry(key: str, entry: object) -> TensorEntry:
    if not isinstance(entry, dict):
        raise ValueError(f"tensor {key} is described by {type(entry).__name__}, not an object")
    dtype = entry["dtype"]
    if dtype not in DTYPE_BITS:
        raise ValueError(f"tensor {key} has the unknown dtype {dtype!r}")
    shape = entry["shape"]
    offsets = entry["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"tensor {key} has the shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise ValueError(f"tensor {key} has the data offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise ValueError(f"tensor {key} has data offsets {begin}..{end}")
    numel = 1
    for dim in shape:
        numel *= dim
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - begin:
        raise ValueError(f"tensor {key} ({dtype} {shape}) needs {bits / 8:g} bytes but its offsets span {end - begin}")
    return TensorEntry(dtype, tuple(shape), begin, end)


def _check_layout(tensors: dict[str, TensorEntry]) -> None:
    """Tensors must tile the data section: sorted by offset, each starts where the previous one ended."""
    position = 0
    for key, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            what = "overlaps the previous tensor" if entry.begin < position else "leaves a gap before it"
            raise SafetensorsDamage(
                "corrupt", f"has a corrupt safetensors header (tensor {key} starts at byte {entry.begin}: it {what})"
            )
        position = entry.end


def read_header(path: Path) -> SafetensorsHeader:
    """Read and check the header of the file at ``path`` (two reads, however large the file)."""
    size = os.stat(path).st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = header_length(head)
        if length is not None and 0 < length <= MAX_HEADER_BYTES and 8 + length <= size:
            head += handle.read(length)
    return parse_header(head, size)
