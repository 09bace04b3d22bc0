"""The README's performance table, rendered from benchmark JSON lines (issue 23: the README says what the lines say).

    python bench/perf_table.py FILE [FILE ...]          # print the table for these files
    python bench/perf_table.py --write README.md        # re-render the table between the README's markers

Reads ``bench/engine_speed.py`` lines (``nox -s bench``: end-to-end, throughput, parts, memory, quality, its own
fresh-process starts) and ``bench/cold_start.py`` lines (starts through ``python -m worker`` with the page cache
dropped). Each row names the file its figures come from; a ratio is only ever formed within one file (stock and
this engine in one process). Rows whose lines are missing are left out rather than filled in.

The README block starts with ``<!-- perf-table: FILE FILE ... -->`` (paths from the repository root) and ends with
``<!-- perf-table:end -->``; ``--write`` keeps the file list and replaces what is between.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- perf-table: (?P<files>[^>]*?) -->\n.*?<!-- perf-table:end -->", re.DOTALL)
TARGETS = {
    "end_to_end": "≥ 2.8×, ≤ 0.9 s",
    "throughput": "≥ 2.5 images/s",
    "step": "≤ 20 ms",
    "start_plain": "≤ 8 s",
    "start_compiled": "≤ 15 s",
}


@dataclass(frozen=True)
class Line:
    source: str  # the file's name, as the table cites it
    record: dict[str, Any]


def read_lines(files: Iterable[Path]) -> list[Line]:
    """Every JSON object line of ``files`` (other lines, e.g. a log's, are skipped)."""
    lines = []
    for path in files:
        for text in path.read_text().splitlines():
            if text.startswith("{"):
                lines.append(Line(path.name, json.loads(text)))
    return lines


def render(files: list[Path]) -> str:
    """The markdown table (with its one-line preface) for the lines of ``files``."""
    lines = read_lines(files)
    rows = [*_speed_rows(lines), *_start_rows(lines)]
    if not rows:
        raise ValueError(f"no engine_speed or cold_start lines in {', '.join(map(str, files))}")
    table = [
        "| what | this worker | stock diffusers, same run | target | from |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {' | '.join(row)} |" for row in rows),
    ]
    peers = _peer_rows(lines)
    if peers:
        table += [
            "",
            "| peer | load | first image (compiles) | 1024², 30 steps | stock diffusers, same run | from |",
            "| --- | --- | --- | --- | --- | --- |",
            *(f"| {' | '.join(row)} |" for row in peers),
        ]
    return "\n".join([*_preface(lines), "", *table])


def _preface(lines: list[Line]) -> list[str]:
    configs = [line for line in lines if line.record.get("bench") == "config" and "script" not in line.record]
    starts = [line for line in lines if line.record.get("bench") == "engine_start"]
    said = []
    for config, start in zip(configs, starts, strict=False):
        record = config.record
        applied = ", ".join(start.record.get("applied", [])) or "none"
        said.append(
            f"- `{config.source}`: {record.get('device')}, torch {record.get('torch')}, diffusers "
            f"{record.get('diffusers')}; speed-ups applied: {applied}."
        )
    return said or ["Starts through `python -m worker` (`bench/cold_start.py`)."]


def _speed_rows(lines: list[Line]) -> list[list[str]]:
    rows = []
    for source in dict.fromkeys(line.source for line in lines if line.record.get("bench") == "end_to_end"):
        # The peer's lines (engine_speed --peer relays bench/tuned_peer.py's) have their own table.
        mine = [line.record for line in lines if line.source == source and "process" not in line.record]
        if _one(mine, bench="config", script="tuned_peer"):
            continue
        this = _one(mine, bench="end_to_end", engine="this")
        stock = _one(mine, bench="end_to_end", engine="stock")
        if this and stock:
            ratio = stock["median_s"] / this["median_s"]
            label = f"{this['size']}², {this['steps']} steps, batch {this['batch']}, to base64"
            rows.append(
                [label, f"**{this['median_s']:.2f} s ({ratio:.2f}×)**", f"{stock['median_s']:.2f} s",
                 TARGETS["end_to_end"], f"`{source}`"]
            )  # fmt: skip
        mine_rate = {r["batch"]: r for r in mine if r.get("bench") == "throughput" and r.get("engine") == "this"}
        stock_rate = {r["batch"]: r for r in mine if r.get("bench") == "throughput" and r.get("engine") == "stock"}
        if mine_rate:
            batches = sorted(mine_rate)
            steps = mine_rate[batches[0]]["steps"]
            start = _one(mine, bench="engine_start")
            warmed = {s["batch"] for s in ((start or {}).get("warm_up") or {}).get("shapes", [])}
            eager = [b for b in batches if b not in warmed]
            note = f" ({' and '.join(map(str, eager))} not compiled)" if warmed and eager else ""
            rows.append(
                [f"{steps} steps, images/s at batch {' / '.join(map(str, batches))}{note}",
                 " / ".join(f"{mine_rate[b]['images_per_s']:.2f}" for b in batches),
                 " / ".join(f"{stock_rate[b]['images_per_s']:.2f}" if b in stock_rate else "—" for b in batches),
                 TARGETS["throughput"], f"`{source}`"]
            )  # fmt: skip
        step = _one(mine, bench="unet_step", engine="this")
        if this and "denoise_ms_per_step" in this:
            replayed = f"; the call replayed {step['ms']['median_ms']:.1f}" if step else ""
            rows.append(
                ["UNet, ms per CFG step (in the job)", f"{this['denoise_ms_per_step']:.1f}{replayed}", "—",
                 TARGETS["step"], f"`{source}`"]
            )  # fmt: skip
        parts = _parts(mine)
        if parts:
            rows.append(["VAE decode / text encode / PNG + base64", *parts, "—", f"`{source}`"])
        peak = _one(mine, bench="peak_gpu_memory", engine="this")
        if this and peak and stock:
            stock_peak = max(r.get("peak_gpu_gib", 0) for r in mine if r.get("engine") == "stock")
            rows.append(
                ["peak GPU memory, batch 1 / largest", f"{this['peak_gpu_gib']:.1f} / {peak['gib']:.1f} GiB",
                 f"{stock['peak_gpu_gib']:.1f} / {stock_peak:.1f} GiB", "—", f"`{source}`"]
            )  # fmt: skip
        quality = _one([r for r in mine if r.get("engine", "this") == "this"], bench="quality")
        determinism = _one(mine, bench="determinism")
        if quality:
            nan = "NaN in the latents" if quality["latents_nan"] else "no NaN"
            same = ""
            if determinism:
                same = "; identical requests bit-identical" if determinism["bit_identical"] else "; NOT bit-identical"
            rows.append(
                ["quality against stock, same seed",
                 f"latents cosine {quality['latents_cosine']}, PSNR {quality['image']['psnr_db']:.1f} dB, {nan}{same}",
                 "—", "—", f"`{source}`"]
            )  # fmt: skip
        for started in (r for r in mine if r.get("bench") == "cold_start" and "case" in r):
            label = f"process start to first image, engine_speed's own start (`{started['case']}`)"
            seconds = f"{started['process_start_to_first_image_s']:.1f} s"
            rows.append(_start_row(label, seconds, started["case"] != "off", source))
    return rows


def _start_row(label: str, seconds: str, compiled: bool, source: str) -> list[str]:
    return [label, seconds, "—", TARGETS["start_compiled" if compiled else "start_plain"], f"`{source}`"]


def _start_rows(lines: list[Line]) -> list[list[str]]:
    """``bench/cold_start.py`` starts, page cache dropped, one row per variant's settings."""
    groups: dict[tuple[str, str], list[float]] = {}
    for line in lines:
        record = line.record
        if record.get("bench") != "cold_start" or "variant" not in record or record.get("first_image_s") is None:
            continue
        if record.get("page_cache") != "all" or record.get("exit_code") != 0:
            continue
        settings = record.get("settings") or {}
        # The settings that change what a start compiles or loads; cache folders and dtypes do not name a row.
        shown = ("COMPILE_MODE", "COMPILE_VAE")
        named = ", ".join(f"{key}={value}" for key, value in sorted(settings.items()) if key in shown)
        named = ", ".join(filter(None, [f"COMPILE={settings['COMPILE']}" if "COMPILE" in settings else "", named]))
        groups.setdefault((line.source, named or "COMPILE=off"), []).append(record["first_image_s"])
    rows = []
    for (source, named), seconds in groups.items():
        label = f"`python -m worker` start to first image, page cache dropped, {named}"
        values = f"{' / '.join(f'{value:.1f}' for value in seconds)} s (median {statistics.median(seconds):.1f})"
        rows.append(_start_row(label, values, named != "COMPILE=off", source))
    return rows


def _peer_rows(lines: list[Line]) -> list[list[str]]:
    """``bench/tuned_peer.py``'s peer (diffusers tuned by its own guide), with stock from its own process."""
    rows = []
    for source in dict.fromkeys(line.source for line in lines):
        mine = [line.record for line in lines if line.source == source]
        peer = _one(mine, bench="end_to_end", engine="tuned diffusers")
        stock = _one(mine, bench="end_to_end", engine="stock")
        if not (peer and _one(mine, bench="config", script="tuned_peer")):
            continue
        label = f"diffusers tuned by its guide, `torch.compile` mode {peer['mode']}"
        stock_s = f"{stock['median_s']:.2f} s" if stock else "—"
        if "median_s" in peer:
            ratio = f" ({stock['median_s'] / peer['median_s']:.2f}×)" if stock else ""
            rows.append([label, f"{peer['load_s']:.1f} s", f"{peer['first_image_s']:.1f} s",
                         f"{peer['median_s']:.2f} s{ratio}", stock_s, f"`{source}`"])  # fmt: skip
        else:
            rows.append([label, "—", f"{peer['outcome']}, still {peer['still']}", "—", stock_s, f"`{source}`"])
    return rows


def _parts(records: list[dict]) -> list[str] | None:
    vae = _one(records, bench="vae_decode", engine="this")
    text = _one(records, bench="text_encode", engine="this")
    text_stock = _one(records, bench="text_encode", engine="stock")
    png = _one(records, bench="image_encode", engine="this")
    png_stock = _one(records, bench="image_encode", engine="stock")
    if not (vae and text and png):
        return None

    def ms(record: dict | None) -> str:
        return f"{record['median_s'] * 1000:.0f} ms" if record else "—"

    return [f"{ms(vae)} / {ms(text)} / {ms(png)}", f"— / {ms(text_stock)} / {ms(png_stock)}"]


def _one(records: list[dict], **match: str) -> dict | None:
    found = [r for r in records if all(r.get(key) == value for key, value in match.items())]
    return found[-1] if found else None


def write_readme(readme: Path) -> None:
    """Re-render each perf-table block of ``readme`` from the files its marker names."""
    text = readme.read_text()

    def replace(match: re.Match) -> str:
        files = [ROOT / name for name in match["files"].split()]
        return f"<!-- perf-table: {match['files']} -->\n{render(files)}\n<!-- perf-table:end -->"

    updated, count = BLOCK.subn(replace, text)
    if not count:
        raise SystemExit(f"{readme}: no <!-- perf-table: FILES --> ... <!-- perf-table:end --> block")
    readme.write_text(updated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="JSON lines files (engine_speed, cold_start)")
    parser.add_argument("--write", type=Path, help="re-render the perf-table blocks of this README")
    args = parser.parse_args()
    if args.write:
        write_readme(args.write)
    elif args.files:
        print(render(args.files))
    else:
        parser.error("give FILES to print a table, or --write README.md")


if __name__ == "__main__":
    main()
