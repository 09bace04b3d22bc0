"""Prompt-encoding benchmark for :class:`worker.prompting.encoding.PromptEncoder` (a benchmark, not a test).

Prints one JSON object per line. Two scales:

* dev (default): the tiny dev model on CPU. Times a 75-token against a 300-token prompt (median of many, cache off)
  and reports the ratio; the target is at most 2x.
* ``--full-size [--device cuda]``: SDXL base 1.0's two text encoders with random weights, built from
  ``model_build/configs/sdxl_base/text_encoder{,_2}/config.json`` (fp16 on cuda), with the real CLIP tokenizers.
  Times a 300-token encode per weighting mode (warm-up, ``torch.cuda.synchronize``, median of 50); the target on an
  H100/H200 is at most 15 ms. ``--device cpu`` runs the same code with few repetitions, as a sanity check only.

Both scales also time an A1111 prompt-editing encode against the same prompt without editing (``prompt_editing_*``)
and report the bytes one cache entry holds at 1, 16 and 64 chunks (``prompt_cache_entry_*``: what the byte budget of
``worker/prompting/cache.py`` buys). The full-size scale also times the encode without CUDA graphs
(``300_tokens_weighted_without_cuda_graphs``, what ``PROMPT_ENCODER_CUDA_GRAPHS=0`` runs).

Both scales also print the weighting measurement behind ``DEFAULT_WEIGHTING``. Random weights make image quality
unmeasurable, so it measures what each mode does to the embedding the UNet receives, against the same prompt
unweighted, over strongly weighted prompts (runs weighted 0.5 to 2.0):

* ``weighted_rows_gain``: median norm ratio of the weighted tokens' rows over the intended weight (1.0 = exactly
  as written; 1.1 means a 1.5 weight acted like 1.65).
* ``unweighted_rows_change``: median and max relative change of every row that was not weighted (BOS, other words,
  EOS, padding): side effects of weighting one word.
* ``restore_mean_factor``: the factor restore_mean applies to a whole chunk of one encoder, min and max, and how
  many chunks got a factor further than 10% from 1 or a negative one.
* ``chunk_mean_shift`` and ``norm_change``: how far each mode moves each chunk's mean and the whole embedding norm.

Both scales also check that short unweighted prompts give exactly diffusers' ``encode_prompt`` tensors on that device
(``equivalence_with_diffusers``: ``bit_identical`` should equal ``cases``). Times are wall-clock medians;
``cpu_median_ms`` is the process's CPU time, steadier than wall time on a shared machine.

Run: ``python bench/prompt_encode.py [--threads 1]`` (dev, CPU, about a minute);
``python bench/prompt_encode.py --full-size`` (GPU: cuda, fp16, UNet and VAE in the pipeline, a few minutes);
``python bench/prompt_encode.py --full-size --device cpu`` (sanity only: fp32, 1 repetition, ~8 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from anywhere: python bench/prompt_encode.py

from worker.prompting.encoding import PromptEncoder  # noqa: E402
from worker.prompting.weighting import DEFAULT_WEIGHTING, WEIGHTING_MODES  # noqa: E402

WEIGHTS = (0.5, 0.8, 1.2, 1.5, 2.0)


def emit(**record: Any) -> None:
    print(json.dumps(record, default=str), flush=True)


def median_ms(function: Callable[[], Any], device: str, repeats: int, warmup: int) -> dict[str, Any]:
    """Median wall time of ``function`` (synchronised on cuda); ``chunks`` from its last result when it has them."""

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    result = None
    for _ in range(warmup):
        result = function()
    times, cpu_times = [], []
    for _ in range(repeats):
        sync()
        started, cpu_started = time.perf_counter(), time.process_time()
        result = function()
        sync()
        times.append((time.perf_counter() - started) * 1000)
        cpu_times.append((time.process_time() - cpu_started) * 1000)
    record: dict[str, Any] = {
        "median_ms": round(statistics.median(times), 3),
        "min_ms": round(min(times), 3),
        # CPU time of this process (all its threads): on a shared machine it is far steadier than wall time.
        "cpu_median_ms": round(statistics.median(cpu_times), 3),
        "repeats": repeats,
    }
    if hasattr(result, "num_chunks"):
        record["chunks"] = result.num_chunks
    return record


# -- pipelines --------------------------------------------------------------------------------------------------------


def dev_pipeline(model_dir: Path | None) -> Any:
    """The dev model through the real converter (or an existing converted folder), fp32 on the CPU."""
    from diffusers import StableDiffusionXLPipeline

    if model_dir is None:
        from model_build.convert import convert
        from model_build.dev_model import write_dev_checkpoint

        scratch = Path(tempfile.mkdtemp(prefix="prompt-bench-"))
        checkpoint = write_dev_checkpoint(scratch / "sdxl-dev.safetensors")
        model_dir = scratch / "sdxl-dev"
        convert(checkpoint, model_dir)
    return StableDiffusionXLPipeline.from_pretrained(model_dir, dtype=torch.float32)


def full_size_text_pipeline(
    device: str, dtype: torch.dtype, config: str = "sdxl_base", with_denoiser: bool = True
) -> Any:
    """SDXL's tokenizers and text encoders (random weights) in a StableDiffusionXLPipeline.

    ``with_denoiser`` adds the UNet and VAE with uninitialised memory (never run): the encoder's cost includes what
    it pays for the pipeline around it (diffusers' ``_execution_device`` walks every module of every component).
    """
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from model_build.architectures import empty_component, materialize

    folder = materialize(config, Path(tempfile.mkdtemp(prefix=f"{config}-configs-")))
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: random init of 800M parameters on a CPU is slow
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    unet = vae = None
    if with_denoiser:
        unet = empty_component(config, "unet").to(dtype).to_empty(device=device).eval()
        vae = empty_component(config, "vae").to(dtype).to_empty(device=device).eval()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder.to(dtype).eval(),
        text_encoder_2=text_encoder_2.to(dtype).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        unet=unet,
        scheduler=None,
        force_zeros_for_empty_prompt=True,
    )


# -- prompts ----------------------------------------------------------------------------------------------------------


def vocabulary_words(pipe: Any) -> list[str]:
    """Lower-case words that are single CLIP tokens, so a prompt of N words is N tokens."""
    vocabulary = pipe.tokenizer.get_vocab()
    words = sorted(key[:-4] for key in vocabulary if key.endswith("</w>") and key[:-4].isascii() and key[:-4].isalpha())
    return [word for word in words if len(pipe.tokenizer(word, add_special_tokens=False).input_ids) == 1]


def prompt_of(pipe: Any, words: list[str], num_tokens: int, offset: int = 0) -> str:
    prompt = " ".join(words[offset : offset + num_tokens])
    assert len(pipe.tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids) == num_tokens
    return prompt


def weighted_prompt(rng: random.Random, words: list[str], num_words: int) -> tuple[str, str]:
    """A strongly weighted prompt and the same prompt with the syntax removed (same tokens, at spaces)."""
    chosen = rng.sample(words, num_words)
    weighted, plain, index = [], [], 0
    while index < len(chosen):
        span = chosen[index : index + rng.randint(1, 4)]
        index += len(span)
        plain.append(" ".join(span))
        if rng.random() < 0.3:
            weighted.append(f"({' '.join(span)}:{rng.choice(WEIGHTS)})")
        else:
            weighted.append(" ".join(span))
    return " ".join(weighted), " ".join(plain)


# -- measurements -----------------------------------------------------------------------------------------------------


def time_dev(pipe: Any, words: list[str], repeats: int) -> None:
    encoder = PromptEncoder(pipe, cache_bytes=0)
    short, long = prompt_of(pipe, words, 75), prompt_of(pipe, words, 300, offset=100)
    negative_short, negative_long = prompt_of(pipe, words, 75, offset=500), prompt_of(pipe, words, 300, offset=600)
    results = {}
    for name, call in {
        "75_tokens": lambda: encoder.encode(short),
        "300_tokens": lambda: encoder.encode(long),
        "75_tokens_with_75_token_negative": lambda: encoder.encode(short, negative_prompt=negative_short),
        "300_tokens_with_300_token_negative": lambda: encoder.encode(long, negative_prompt=negative_long),
        "diffusers_encode_prompt_75_tokens": lambda: pipe.encode_prompt(short),
    }.items():
        results[name] = median_ms(call, "cpu", repeats, warmup=5)
        emit(bench="prompt_encode_dev_cpu", case=name, **results[name])
    for suffix in ("", "_with_300_token_negative"):
        short_name = "75_tokens" + suffix.replace("300", "75")
        long_result, short_result = results["300_tokens" + suffix], results[short_name]
        ratio = long_result["median_ms"] / short_result["median_ms"]
        emit(
            bench="prompt_encode_dev_cpu",
            case=f"ratio_300_over_75{suffix}",
            ratio=round(ratio, 3),
            # Medians on a busy machine add the same noise to both and flatter the ratio: the minima show it too.
            ratio_of_minima=round(long_result["min_ms"] / short_result["min_ms"], 3),
            ratio_of_cpu_time=round(long_result["cpu_median_ms"] / short_result["cpu_median_ms"], 3),
            target="<= 2.0",
            meets_target=ratio <= 2.0,
            torch_threads=torch.get_num_threads(),
            chunks={"75": results[short_name]["chunks"], "300": results["300_tokens" + suffix]["chunks"]},
        )


def time_full_size(pipe: Any, words: list[str], device: str, repeats: int, warmup: int) -> None:
    rng = random.Random(1)
    long = prompt_of(pipe, words, 300)
    long_weighted, _ = weighted_prompt(rng, words, 300)
    negative = prompt_of(pipe, words, 300, offset=400)
    short = prompt_of(pipe, words, 75)
    for weighting in WEIGHTING_MODES:
        encoder = PromptEncoder(pipe, cache_bytes=0, weighting=weighting)
        cases = {
            "300_tokens_unweighted": lambda encoder=encoder: encoder.encode(long),
            "300_tokens_weighted": lambda encoder=encoder: encoder.encode(long_weighted),
            "300_tokens_weighted_with_300_token_negative": lambda encoder=encoder: encoder.encode(
                long_weighted, negative_prompt=negative
            ),
        }
        for name, call in cases.items():
            timing = median_ms(call, device, repeats, warmup)
            emit(
                bench="prompt_encode_full_size",
                device=device,
                weighting=weighting,
                case=name,
                target_ms=15.0 if name == "300_tokens_weighted" else None,
                **timing,
            )
    encoder = PromptEncoder(pipe, cache_bytes=0)
    emit(
        bench="prompt_encode_full_size",
        device=device,
        case="75_tokens",
        **median_ms(lambda: encoder.encode(short), device, repeats, warmup),
    )
    emit(
        bench="prompt_encode_full_size",
        device=device,
        case="diffusers_encode_prompt_75_tokens",
        **median_ms(lambda: pipe.encode_prompt(short), device, repeats, warmup),
    )
    emit(
        bench="prompt_encode_full_size",
        device=device,
        case="diffusers_pipe_execution_device_lookup",
        note="what every encode would pay without PromptEncoder's memo (diffusers walks all modules)",
        **median_ms(lambda: pipe._execution_device, device, repeats, warmup),
    )
    cached = PromptEncoder(pipe)
    emit(
        bench="prompt_encode_full_size",
        device=device,
        case="300_tokens_cache_hit",
        **median_ms(lambda: cached.encode(long_weighted), device, repeats, warmup),
    )
    very_long, _ = weighted_prompt(rng, words, 1000)
    emit(
        bench="prompt_encode_full_size",
        device=device,
        case="1000_tokens_weighted_with_300_token_negative",
        **median_ms(lambda: encoder.encode(very_long, negative_prompt=negative), device, repeats, warmup),
    )
    eager = PromptEncoder(pipe, cache_bytes=0, cuda_graphs=False)
    emit(
        bench="prompt_encode_full_size",
        device=device,
        case="300_tokens_weighted_without_cuda_graphs",
        note="the same encode as 300_tokens_weighted with PROMPT_ENCODER_CUDA_GRAPHS=0 (graphs apply on cuda only)",
        **median_ms(lambda: eager.encode(long_weighted), device, repeats, warmup),
    )
    measure_editing_and_cache(pipe, words, device, repeats, warmup, "full_size")


def measure_editing_and_cache(pipe: Any, words: list[str], device: str, repeats: int, warmup: int, label: str) -> None:
    """Prompt editing's encode cost, and what one cache entry holds at 1, 16 and 64 chunks (the cache's byte budget)."""
    encoder = PromptEncoder(pipe, cache_bytes=0)
    base = prompt_of(pipe, words, 60)
    edited = f"{base} [a cat:a dog:0.5] on a [red|blue] mat"
    distinct_texts = len(encoder.encode(edited, negative_prompt="blurry", steps=25).info["schedule"]["texts"])
    emit(
        bench=f"prompt_editing_{label}",
        device=device,
        case="edited_prompt_25_steps",
        distinct_texts=distinct_texts,
        **median_ms(lambda: encoder.encode(edited, negative_prompt="blurry", steps=25), device, repeats, warmup),
    )
    emit(
        bench=f"prompt_editing_{label}",
        device=device,
        case="same_prompt_without_editing",
        **median_ms(lambda: encoder.encode(base, negative_prompt="blurry", steps=25), device, repeats, warmup),
    )
    for chunks in (1, 16, 64):
        prompt = "x BREAK " * (chunks - 1) + "x"
        entry = encoder.encode(prompt, negative_prompt="blurry")
        emit(bench=f"prompt_cache_entry_{label}", device=device, chunks=entry.num_chunks, entry_bytes=entry.nbytes())


def check_equivalence(pipe: Any, words: list[str], device: str, label: str) -> None:
    """Short unweighted prompts: PromptEncoder against diffusers' encode_prompt, bit for bit, on this device."""
    encoder = PromptEncoder(pipe, cache_bytes=0)
    rng = random.Random(2)
    cases, identical = 0, 0
    for clip_skip in (None, 0, 1):
        for negative_prompt in (None, "", "blurry, low quality, watermark"):
            for prompt_2 in (None, "an oil painting, warm light"):
                prompt = " ".join(rng.sample(words, rng.randint(1, 70)))
                ours = encoder.encode(prompt, prompt_2, negative_prompt, None, clip_skip)
                theirs = pipe.encode_prompt(prompt, prompt_2, negative_prompt=negative_prompt, clip_skip=clip_skip)
                mine = ours.tensors()
                cases += 1
                identical += all(
                    a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
                    for a, b in zip(mine, theirs, strict=True)
                )
    emit(bench=f"equivalence_with_diffusers_{label}", device=device, cases=cases, bit_identical=identical)


def measure_weighting(pipe: Any, words: list[str], num_prompts: int, label: str) -> None:
    """What each weighting mode does to the embedding, against the same tokens unweighted; see the module docstring."""
    rng = random.Random(0)
    encoders = {mode: PromptEncoder(pipe, cache_bytes=0, weighting=mode) for mode in WEIGHTING_MODES}
    plain_encoder = encoders[WEIGHTING_MODES[0]]
    widths = [pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size]
    stats: dict[str, dict[str, list[float]]] = {
        mode: {"gain": [], "unweighted_change": [], "mean_shift": [], "norm_change": [], "factor": []}
        for mode in WEIGHTING_MODES
    }
    for _ in range(num_prompts):
        weighted_text, plain_text = weighted_prompt(rng, words, 120)  # 2 chunks
        reference = plain_encoder.encode(plain_text, do_classifier_free_guidance=False).prompt_embeds[0].float().cpu()
        rows = torch.tensor([w for chunk in plain_encoder.tokenize(weighted_text, 0).weights for w in chunk])
        for mode, encoder in encoders.items():
            result = encoder.encode(weighted_text, do_classifier_free_guidance=False).prompt_embeds[0].float().cpu()
            collect = stats[mode]
            collect["norm_change"].append(float(result.norm() / reference.norm() - 1))
            start = 0
            for width in widths:  # per encoder: the weighting acts per encoder and chunk
                ref_part, res_part = reference[:, start : start + width], result[:, start : start + width]
                start += width
                ref_norms, res_norms = ref_part.norm(dim=1), res_part.norm(dim=1)
                weighted_rows = rows != 1.0
                collect["gain"] += (res_norms[weighted_rows] / ref_norms[weighted_rows] / rows[weighted_rows]).tolist()
                change = (res_part - ref_part).norm(dim=1) / ref_part.norm(dim=1)
                collect["unweighted_change"] += change[~weighted_rows].tolist()
                for chunk_index in range(ref_part.shape[0] // 77):
                    chunk = slice(77 * chunk_index, 77 * (chunk_index + 1))
                    ref_chunk, res_chunk = ref_part[chunk], res_part[chunk]
                    collect["mean_shift"].append(
                        float((res_chunk.mean() - ref_chunk.mean()).abs() / ref_chunk.abs().mean())
                    )
                    plain_rows = ~weighted_rows[chunk]
                    if bool((~plain_rows).any()):
                        # The factor applied to the chunk's unweighted rows (1 for "multiply").
                        ref_plain, res_plain = ref_chunk[plain_rows], res_chunk[plain_rows]
                        collect["factor"].append(float((res_plain * ref_plain).sum() / (ref_plain * ref_plain).sum()))
    for mode, collect in stats.items():
        factors = collect["factor"]
        emit(
            bench=f"weighting_measurement_{label}",
            weighting=mode,
            default=mode == DEFAULT_WEIGHTING,
            prompts=num_prompts,
            weighted_rows_gain={
                "median": _r(statistics.median(collect["gain"])),
                "min": _r(min(collect["gain"])),
                "max": _r(max(collect["gain"])),
            },
            unweighted_rows_change={
                "median": _r(statistics.median(collect["unweighted_change"])),
                "max": _r(max(collect["unweighted_change"])),
            },
            restore_mean_factor={
                "min": _r(min(factors)),
                "max": _r(max(factors)),
                "chunks": len(factors),
                "off_by_more_than_10_percent": sum(abs(f - 1) > 0.1 for f in factors),
                "negative": sum(f < 0 for f in factors),
            },
            chunk_mean_shift={
                "median": _r(statistics.median(collect["mean_shift"])),
                "max": _r(max(collect["mean_shift"])),
            },
            norm_change={
                "median": _r(statistics.median(collect["norm_change"])),
                "max_abs": _r(max(map(abs, collect["norm_change"]))),
            },
        )


def _r(value: float) -> float:
    return round(value, 5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full-size", action="store_true", help="SDXL base text encoders with random weights")
    parser.add_argument("--device", default=None, help="cuda (default with --full-size) or cpu")
    parser.add_argument("--model", type=Path, default=None, help="a converted dev-model folder (default: build one)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (median)")
    parser.add_argument("--measure-prompts", type=int, default=None, help="prompts for the weighting measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--text-encoders-only",
        action="store_true",
        help="full size: leave the UNet and VAE out of the pipeline (default: in on cuda, out on cpu)",
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    if not args.full_size:
        pipe = dev_pipeline(args.model)
        words = vocabulary_words(pipe)
        emit(bench="setup", scale="dev", device="cpu", torch=torch.__version__, threads=torch.get_num_threads())
        time_dev(pipe, words, args.repeats or 100)
        measure_editing_and_cache(pipe, words, "cpu", args.repeats or 100, 5, "dev")
        check_equivalence(pipe, words, "cpu", "dev")
        measure_weighting(pipe, words, args.measure_prompts or 20, "dev")
        return

    device = args.device or "cuda"
    on_gpu = device.startswith("cuda")
    dtype = torch.float16 if on_gpu else torch.float32  # fp16 matmuls on a CPU are slow and not what runs in production
    with_denoiser = on_gpu and not args.text_encoders_only
    pipe = full_size_text_pipeline(device, dtype, with_denoiser=with_denoiser)
    words = vocabulary_words(pipe)
    emit(
        bench="setup",
        scale="full_size",
        device=device,
        device_name=torch.cuda.get_device_name() if on_gpu else "cpu",
        dtype=str(dtype),
        unet_and_vae_in_pipeline=with_denoiser,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    repeats = args.repeats or (50 if on_gpu else 1)
    time_full_size(pipe, words, device, repeats, warmup=5 if on_gpu else 1)
    if on_gpu:
        check_equivalence(pipe, words, device, "full_size")
    measure_weighting(pipe, words, args.measure_prompts or (20 if on_gpu else 2), "full_size")


if __name__ == "__main__":
    main()
