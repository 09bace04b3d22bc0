"""Regenerate the shipped CLIP BPE tokenizer files from open-clip-torch's BPE data.

SDXL's two tokenizers are the same CLIP BPE (49,408 tokens). The data ships in the PyPI package
open-clip-torch as ``open_clip/bpe_simple_vocab_16e6.txt.gz``; this module turns it into the
``vocab.json``/``merges.txt`` pair that transformers' ``CLIPTokenizer`` reads, byte for byte the
same every time, so the repository can ship the result and conversion never needs the network.

    python -m model_build.clip_vocab path/to/bpe_simple_vocab_16e6.txt.gz [OUT_DIR]
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

SHIPPED_DIR = Path(__file__).parent / "configs" / "clip_tokenizer"
NUM_MERGES = 49152 - 256 - 2  # the merge count CLIP was trained with


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def build_vocab_and_merges(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    lines = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, [" ".join(m) for m in merges]


def write_tokenizer_files(bpe_gz: Path, out_dir: Path = SHIPPED_DIR) -> None:
    vocab, merges = build_vocab_and_merges(bpe_gz)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_tokenizer_files(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else SHIPPED_DIR)
