"""The README's performance table says what the benchmark lines say, and only that (bench/perf_table.py)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import perf_table


def write(path: Path, *records: dict) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_the_peer_gets_its_own_table_and_never_feeds_the_engine_rows(tmp_path: Path) -> None:
    engine = write(
        tmp_path / "engine.jsonl",
        {"bench": "config", "device": "GPU", "torch": "t", "diffusers": "d"},
        {"bench": "engine_start", "applied": ["compile_unet_aot:reduce-overhead"], "warm_up": {"shapes": []}},
        {"bench": "end_to_end", "engine": "stock", "size": 1024, "steps": 30, "batch": 1, "median_s": 2.0},
        {"bench": "end_to_end", "engine": "this", "size": 1024, "steps": 30, "batch": 1, "median_s": 1.0},
        {"bench": "quality", "latents_cosine": 0.999996, "latents_nan": False, "image": {"psnr_db": 49.6}},
        # a peer run in the engine's process (void: its stance) and one relayed from its own process
        {"bench": "quality", "engine": "tuned diffusers", "latents_cosine": 0.39, "latents_nan": False,
         "image": {"psnr_db": 10.4}},
        {"bench": "end_to_end", "engine": "stock", "median_s": 9.0, "process": "tuned_peer.py"},
    )  # fmt: skip
    peer = write(
        tmp_path / "peer.jsonl",
        {"bench": "config", "script": "tuned_peer"},
        {"bench": "end_to_end", "engine": "stock", "median_s": 2.5},
        {"bench": "end_to_end", "engine": "tuned diffusers", "mode": "default", "median_s": 1.25, "load_s": 4.0,
         "first_image_s": 180.0},
    )  # fmt: skip
    table = perf_table.render([engine, peer])
    assert "**1.00 s (2.00×)** | 2.00 s" in table
    assert "latents cosine 0.999996" in table and "0.39" not in table
    assert (
        "| diffusers tuned by its guide, `torch.compile` mode default | 4.0 s | 180.0 s | 1.25 s (2.00×) | 2.50 s"
        in (table)
    )


def test_a_peer_that_never_finished_says_so(tmp_path: Path) -> None:
    peer = write(
        tmp_path / "peer.jsonl",
        {"bench": "config", "script": "tuned_peer"},
        {"bench": "end_to_end", "engine": "stock", "median_s": 2.07},
        {"bench": "end_to_end", "engine": "tuned diffusers", "mode": "default", "outcome": "no figure within 200 s",
         "still": "compiling (the first image)"},
        {"bench": "cold_start", "variant": "after", "page_cache": "all", "exit_code": 0, "first_image_s": 22.1},
    )  # fmt: skip
    table = perf_table.render([peer])
    assert "no figure within 200 s, still compiling (the first image) | — | 2.07 s" in table


def test_start_rows_name_what_a_start_compiles_not_where_its_cache_is(tmp_path: Path) -> None:
    settings = {
        "COMPILE": "aot",
        "COMPILE_MODE": "reduce-overhead",
        "COMPILE_VAE": "1",
        "VAE_DTYPE": "bf16",
        "COMPILE_CACHE_DIR": "/tmp/cc",
    }
    starts = write(
        tmp_path / "cold.jsonl",
        {"bench": "cold_start", "variant": "after", "settings": {}, "page_cache": "all", "exit_code": 0,
         "first_image_s": 22.9},
        {"bench": "cold_start", "variant": "aot-vae", "settings": settings, "page_cache": "all", "exit_code": 0,
         "first_image_s": 25.5},
        {"bench": "cold_start_warm_cache", "variant": "aot-vae", "settings": settings, "page_cache": "kept",
         "exit_code": 0, "first_image_s": 22.5},
    )  # fmt: skip
    table = perf_table.render([starts])
    assert "page cache dropped, COMPILE=off | 22.9 s (median 22.9) | — | ≤ 8 s" in table
    packaged = "page cache dropped, COMPILE=aot, COMPILE_MODE=reduce-overhead, COMPILE_VAE=1 | 25.5 s (median 25.5)"
    assert packaged in table
    assert "/tmp/cc" not in table and "bf16" not in table and "22.5" not in table  # the warm start is not a row
