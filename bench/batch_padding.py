"""How much work the batch runner's padding adds: the planner on generated, real-looking JSONL (no GPU, no model).

    python bench/batch_padding.py [--lines 1000] [--batch-sizes 4,8] [--seed 0] [--out FILE]

With ``--deterministic`` (the runner's default) every pipeline call holds exactly ``--batch-size`` images, so an
image's bytes never depend on its batch mates (``batch/README.md``, Determinism); a partial call is padded with copies
whose images are dropped. This prints one JSON line per scenario, batch size and order: images asked for, images
computed, padding images, their share of the work, pipeline calls and distinct keys (call shapes). ``order`` is
``line`` (the lines in file order into the planner, as the runner did before it grouped them) or ``grouped`` (the
runner's order now: :func:`batch.planner.order_jobs`, :meth:`batch.planner.Planner.start_group`); ``floor`` lines give
the least padding any planner needs for that identity (each key padded once, to a multiple of the batch size).

The jobs are parsed by the runner's own line parser and split, keyed and planned by the real functions; only the
prompt's chunk count, which the engine learns by encoding, is estimated from the text (the generated prompts are
either well under or well over 75 tokens). Scenarios:

- ``demo``: ``batch/examples/demo.jsonl``, the README's first batch (4 lines, 5 images, 4 keys);
- ``sizes``: SDXL's nine common resolutions x 2 step counts x 2 guidance scales (36 keys), 1-4 images a line;
- ``sizes+loras``: the same with one of 4 LoRA sets (none, A, B, A+B) on each line;
- ``mixed``: ``sizes+loras`` with 3 samplers, 10 % img2img lines (each its own input image), 8 % hires-fix lines
  and 10 % long (2-chunk) prompts;
- ``img2img``: one setting (1024², 30 steps) over 1,000 input pictures (with width/height given, lines over other
  pictures share a call; before that change each line was a group of its own).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from batch.jobs import Job, Shard, load_shard  # noqa: E402
from batch.planner import Call, Planner, group_of, order_jobs, split_job  # noqa: E402
from bench import jsonlines  # noqa: E402
from worker.generation.grouping import group_key  # noqa: E402
from worker.generation.hires import hires_view  # noqa: E402

# SDXL's training buckets people actually use, with rough shares (square dominates).
SIZES = {
    (1024, 1024): 35,
    (896, 1152): 12,
    (1152, 896): 12,
    (832, 1216): 12,
    (1216, 832): 12,
    (768, 1344): 6,
    (1344, 768): 6,
    (640, 1536): 2.5,
    (1536, 640): 2.5,
}
NUM_IMAGES = {1: 40, 2: 25, 3: 10, 4: 25}
LORA_SETS = (
    [],
    [{"name": "style-a", "scale": 0.8}],
    [{"name": "detail-b", "scale": 0.5}],
    [{"name": "style-a", "scale": 0.8}, {"name": "detail-b", "scale": 0.5}],
)
SAMPLERS = {"DPM++ 2M Karras": 60, "Euler a": 25, "UniPC": 15}
SUBJECTS = ("a lighthouse on a cliff", "a red fox in snow", "a quiet harbor", "an old car in rain", "a bowl of fruit")
STYLES = ("oil painting", "photograph, 35mm", "watercolor", "isometric render", "ink drawing")
LONG_TAIL = (
    "highly detailed, intricate textures, volumetric light, soft shadows, rich colour palette, sharp focus, "
    "masterpiece, award winning composition, cinematic framing, subtle film grain, depth of field, "
    "golden hour, atmospheric haze, reflections on wet surfaces, carefully balanced contrast, "
    "trending illustration style, fine brush strokes, elegant details, dramatic sky, gentle breeze"
)


def pick(rng: random.Random, weights: dict[Any, float]) -> Any:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def scenario_lines(name: str, count: int, rng: random.Random) -> list[dict[str, Any]]:
    lines = []
    for n in range(count):
        width, height = pick(rng, SIZES)
        line: dict[str, Any] = {
            "prompt": f"{rng.choice(SUBJECTS)}, {rng.choice(STYLES)}, variation {n}",
            "negative_prompt": "blurry, low quality",
            "width": width,
            "height": height,
            "num_inference_steps": rng.choice((25, 30)),
            "guidance_scale": rng.choice((5.0, 7.0)),
            "num_images": pick(rng, NUM_IMAGES),
            "seed": n,
        }
        if name == "img2img":  # one setting over a folder of pictures, as a restyling run
            line.update(width=1024, height=1024, num_inference_steps=30, guidance_scale=5.0, strength=0.6)
            line["image_url"] = f"https://images.example.com/inputs/{n:05d}.png"
        if name in ("sizes+loras", "mixed"):
            line["loras"] = rng.choice(LORA_SETS)
        if name == "mixed":
            line["scheduler"] = pick(rng, SAMPLERS)
            roll = rng.random()
            if roll < 0.10:  # img2img over the line's own picture
                line.update(image_url=f"https://images.example.com/inputs/{n:05d}.png", strength=0.6)
            elif roll < 0.18:  # hires fix: a smaller first pass, upscaled 1.5x
                line.update(width=width * 2 // 3 // 8 * 8, height=height * 2 // 3 // 8 * 8)
                line.update(enable_hr=True, hr_scale=1.5, denoising_strength=0.5)
            if rng.random() < 0.10:
                line["prompt"] += ", " + LONG_TAIL
        lines.append(line)
    return lines


def estimated_chunks(*texts: str | None) -> int:
    """The prompt's chunk count (75 tokens each), from a word-and-punctuation count: CLIP's BPE gives about one
    token per word of these prompts. The engine's own count comes from its encoding; this needs no tokenizer."""
    tokens = max(len(re.findall(r"\w+|[^\w\s]", text or "")) for text in texts)
    return max(1, math.ceil(tokens / 75))


def key_of(unit: Any) -> Hashable:
    """The engine's group key, the prompts' chunk counts estimated rather than encoded."""
    request = unit.request
    encoded = SimpleNamespace(num_chunks=estimated_chunks(request.prompt, request.negative_prompt))
    hires = None
    if request.enable_hr:
        view = hires_view(request)
        hires = SimpleNamespace(num_chunks=estimated_chunks(view.prompt, view.negative_prompt))
    return group_key(request, encoded, hires)  # type: ignore[arg-type]


def plan(jobs: list[Job], batch_size: int, grouped: bool, key: Callable[[Any], Hashable]) -> list[Call]:
    """The calls the local runner makes for ``jobs`` (its loop without the engine): every job valid, none failing."""
    planner = Planner(batch_size, pad=True, key_of=key)
    calls: list[Call] = []
    for job in order_jobs(jobs) if grouped else jobs:
        if grouped:
            calls += planner.start_group(group_of(job))
        for unit in split_job(job):
            calls += planner.add(unit)
    return calls + planner.flush()


def figures(jobs: list[Job], calls: list[Call]) -> dict[str, int]:
    asked = sum(job.request.num_images for job in jobs)
    computed = sum(call.num_images for call in calls)
    padding = sum(request.num_images for call in calls for request in call.padding)
    assert computed - padding == asked, "the planner lost or duplicated an image"
    img2img = sum(request.num_images for call in calls if call.units[0].request.image_url for request in call.padding)
    return {
        "images_requested": asked,
        "images_computed": computed,
        "padding_images": padding,
        "calls": len(calls),
        "partial_calls": sum(1 for call in calls if call.padding),
        "padding_in_img2img_calls": img2img,
    }


def floor(jobs: list[Job], batch_size: int) -> dict[str, int]:
    """Strict identity's least padding, counted without the planner: each key's images rounded up to whole calls."""
    per_key: Counter[Hashable] = Counter()
    alone = 0
    for job in jobs:
        if job.per_call_noise:
            alone += job.request.num_images  # one call of its own, never padded
        else:
            per_key.update(key_of(unit) for unit in split_job(job))
    asked = sum(per_key.values()) + alone
    computed = sum(math.ceil(n / batch_size) * batch_size for n in per_key.values()) + alone
    return {"images_requested": asked, "images_computed": computed, "padding_images": computed - asked}


def summed(parts: Iterable[dict[str, int]]) -> dict[str, Any]:
    """The shards' figures added up, with the padding's share of the work and the work per image asked for."""
    total: dict[str, int] = {}
    for part in parts:
        for name, value in part.items():
            total[name] = total.get(name, 0) + value
    computed, asked = total["images_computed"], total["images_requested"]
    return {
        **total,
        "padding_share": round(total["padding_images"] / computed, 4),
        "work_ratio": round(computed / asked, 3),
    }


def write_source(name: str, lines: int, seed: int, folder: Path) -> Path:
    if name == "demo":
        return ROOT / "batch" / "examples" / "demo.jsonl"
    source = folder / f"{name.replace('+', '_')}.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in scenario_lines(name, lines, random.Random(seed))))
    return source


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1000, help="lines per generated scenario")
    parser.add_argument("--batch-sizes", default="4,8", help="comma-separated --batch-size values")
    parser.add_argument("--shards", default="1", help="comma-separated shard counts (each shard planned on its own)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated lines")
    parser.add_argument("--scenarios", default="demo,sizes,sizes+loras,mixed,img2img")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    jsonlines.start(args.out)
    batch_sizes = [int(value) for value in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.scenarios.split(","):
            source = write_source(name, args.lines, args.seed, Path(tmp))
            everything = load_shard(source, Shard(0, 1))
            if everything.invalid:
                raise SystemExit(f"lines the parser refused: {everything.invalid[:3]}")
            keys = {key_of(unit) for job in everything.jobs if not job.per_call_noise for unit in split_job(job)}
            for count in (int(value) for value in args.shards.split(",")):
                shards = [load_shard(source, Shard(index, count)).jobs for index in range(count)]
                for batch_size in batch_sizes:
                    common = {"scenario": name, "lines": len(everything.jobs), "seed": args.seed, "shards": count}
                    common.update(batch_size=batch_size, distinct_keys=len(keys))
                    for order in ("line", "grouped"):
                        grouped = order == "grouped"
                        total = summed(figures(jobs, plan(jobs, batch_size, grouped, key_of)) for jobs in shards)
                        jsonlines.emit(**common, order=order, **total)
                    jsonlines.emit(**common, order="floor", **summed(floor(jobs, batch_size) for jobs in shards))


if __name__ == "__main__":
    main()
