"""Smoke test of the worker on a GPU: full-size SDXL (random weights), the jobs a deployment must survive.

    python bench/smoke.py --full-size          # on a CUDA machine (nox -s smoke)
    python bench/smoke.py                      # dry run on the CPU with the dev-size model

Through :class:`worker.handler.Worker`, with the speed-up settings of the environment (``COMPILE=unet``
etc.), one JSON line per check, exit status 1 if any failed:

- ``square``: a 1024x1024 job (the official worker's defaults otherwise) returns one PNG;
- ``long_prompt``: a weighted prompt of several hundred tokens with BREAK returns an image;
- ``lora``: a random LoRA file in LORA_DIR changes the image, and the next job without it equals the
  first job without it byte for byte (nothing leaks between jobs);
- ``lora_url``: the same LoRA file served over HTTP on this machine (``ALLOW_PRIVATE_URLS=1`` here) and given by URL
  with its sha256 gives the ``lora`` check's image byte for byte; its time includes the download;
- ``lycoris``: the same for a random LyCORIS LoKr (Tucker convolutions), merged into the UNet and both text
  encoders (its ``cache`` entry's ``load_s`` is reading and checking the file; the merge is in the job's time);
  ``loha``: the same for a random LoHa; ``dora``: for a random Kohya LoRA with ``dora_scale`` (DoRA, merged);
- ``sampling_*``: one job per sampling mode (the SDXL-Lightning recipe: Euler, SGM Uniform, guidance 0; A1111's
  sampler + Automatic schedule; Align Your Steps; LCM; TCD; custom timesteps; guidance_rescale) with its time beside
  the plain job's, and the timesteps it ran;
- ``inpaint``: the square job's image with a centred mask (A1111's API defaults) returns one image of its size whose
  pixels outside the blurred mask are the input's; its time beside the plain job's;
- ``outpaint``: the square job's image extended by 1/8 of its side left and right (``outpaint``, 128 px at 1024²),
  generated at the whole new canvas, returns an image of the canvas's size whose pixels away from the new borders
  are the input's, in place; its time beside the plain job's;
- ``refiner``: with the full-size refiner loaded beside the base (converted by ``model_build`` from its
  random single-file checkpoint), the official worker's refiner job (``strength``) and the ensemble of experts
  (``high_noise_frac``) each return an image that the refiner made; ``--no-refiner`` skips it;
- ``controlnet``: a random SDXL ControlNet (``model_build dev-controlnet``, converted by ``model_build convert``)
  with the canny preprocessor changes the image, its time beside the plain job's, and the next job without it
  equals the first job byte for byte;
- ``embedding``: a random SDXL textual-inversion embedding (``model_build dev-embedding``: clip_l 768 and clip_g 1280
  wide at full size) named in the prompt and the negative prompt changes the image, is listed in the metadata, its
  time (loading on first use included) beside the plain job's; the encoding of a prompt naming it from the text
  encoders' CUDA graphs (captured again after the vocabulary grew) equals the eager one, and the next job without it
  equals the first job byte for byte; ``embedding_url``: the same file served over HTTP here and given by URL
  (``embeddings: [{name, url, sha256}]``) under another word makes the same image as the folder's file;
- ``ip_adapter_plus``, ``ip_adapter``, ``ip_adapter_scale0``, ``ip_adapter_lora``: random SDXL IP-Adapters (the plus
  and plain ViT-H kinds with a random ViT-H encoder, ``model_build dev-ip-adapter``) each steer the image, scale 0
  gives the square job's pixels, one with the fused LoRA runs and the LoRA job after it is unchanged; each with its
  time beside the plain job's, and the plain job after each equals the first (``bench/smoke_ip_adapter.py``);
- ``hires``: A1111's hires fix in one job (1024² -> 1536², latent upscale, 10 hires steps), its time beside the
  plain job's; ``hires_tiled``: 1024² -> 2048² with a Lanczos resize, above ``VAE_TILE_PIXELS`` (set to 1536² here
  unless the environment sets it), so the VAE decodes and encodes in tiles; each reports its peak GPU memory;
- ``out_of_memory``: with this process capped to a little more GPU memory than the weights take
  (``torch.cuda.set_per_process_memory_fraction``), a job fails with an error that sets ``refresh_worker``,
  and with the cap lifted the next job succeeds;
- ``v_prediction``: the random weights saved again as the converter saves a v-prediction model
  (``--prediction-type v_prediction --zero-terminal-snr``: scheduler config and manifest), served as MODEL_DIR by a
  second worker once the first is gone: the square job's metadata says v_prediction with zero terminal SNR, it starts
  at timestep 999, and its image differs from the first model's; ``v_prediction_rescale``: the README's v-prediction
  request (Euler a, ``guidance_rescale`` 0.7) runs and Heun is refused; each with its time (and the worker's start);
- ``inpaint_model``: a random 9-channel inpainting model (the ``sdxl_inpaint`` config, ``dev_inpaint`` in the dry
  run) served by a third worker (``COMPILE`` off: refused for such a model): the inpaint check's job keeps the
  unmasked pixels; ``inpaint_model_unmasked_refused``: a job without a mask is refused naming ``mask`` and the masked
  job again gives the same bytes.

Every line carries ``dynamo``: what torch.compile counted since the previous line (graphs, recompiles, guard
failures); with ``COMPILE`` set, a job at a warmed shape must show no new graph. With ``COMPILE=aot`` each line also
carries ``aot_unet_calls``: the UNet calls served by AOT packages and eagerly since the previous line (and
``aot_vae_calls`` the VAE decoder's, with ``COMPILE_VAE=1``).

``bench/smoke_inpainting.py``, ``bench/smoke_ip_adapter.py`` and ``bench/smoke_models.py`` hold the inpainting
checks, the IP-Adapter checks and the other model folders.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAILURES: list[str] = []


_DYNAMO_SEEN: dict[str, int] = {}


def dynamo_counters_delta() -> dict[str, int]:
    """What torch.compile did since the last check (new graphs, recompiles, guard failures), from Dynamo's own
    counters: with COMPILE set, a job at a warmed shape must add nothing here (no compile inside a paid job)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    now = {
        f"{group}.{key}"[:80]: int(value)
        for group, values in counters.items()
        if group not in ("aot_autograd", "inductor")  # the same events seen from the compiler's later stages
        for key, value in values.items()
    }
    delta = {key: value - _DYNAMO_SEEN.get(key, 0) for key, value in now.items() if value != _DYNAMO_SEEN.get(key, 0)}
    _DYNAMO_SEEN.clear()
    _DYNAMO_SEEN.update(now)
    return dict(sorted(delta.items())[:12])


_AOT_SEEN: dict[tuple[str, str], int] = {}


def aot_calls_delta(what: str) -> dict[str, int] | None:
    """With COMPILE=aot: the calls of ``what`` ("UNet", "VAE decoder") served by AOT packages and eagerly since the
    last line (None where no such module is installed)."""
    if "worker.generation.aot_unet" not in sys.modules:
        return None
    from worker.generation.aot_unet import call_counts

    now = call_counts(what)
    if now is None:
        return None
    delta = {key: value - _AOT_SEEN.get((what, key), 0) for key, value in now.items()}
    _AOT_SEEN.update({(what, key): value for key, value in now.items()})
    return delta


def report(check: str, ok: bool, **details: Any) -> None:
    if not ok:
        FAILURES.append(check)
    extra = {}
    for field, what in (("aot_unet_calls", "UNet"), ("aot_vae_calls", "VAE decoder")):
        calls = aot_calls_delta(what)
        if calls is not None:
            extra[field] = calls
    print(json.dumps({"smoke": check, "ok": ok, **details, "dynamo": dynamo_counters_delta(), **extra}), flush=True)


def long_prompt() -> str:
    words = [
        "lighthouse",
        "cliff",
        "dawn",
        "storm",
        "waves",
        "seagulls",
        "granite",
        "moss",
        "lantern",
        "fog",
        "harbour",
        "boats",
        "nets",
        "rope",
    ]
    parts = []
    for k in range(60):
        word = words[k % len(words)]
        parts.append(f"({word}:1.{k % 5})" if k % 3 == 0 else f"{word} in the distance")
        if k == 30:
            parts.append("BREAK")
    return ", ".join(parts)


def build_refiner(work: Path, full_size: bool) -> Path:
    """The random refiner as a user makes one: a single-file checkpoint converted and verified by model_build."""
    checkpoint = work / "sdxl-refiner.safetensors"
    size = ["--full-size"] if full_size else []
    for command in (
        ["dev-checkpoint", str(checkpoint), "--refiner", *size],
        ["convert", str(checkpoint), "--output", str(work / "sdxl-refiner")],
    ):
        subprocess.run([sys.executable, "-m", "model_build", "-q", *command], check=True, cwd=ROOT)
    checkpoint.unlink()  # disk: the folder is what the worker loads
    return work / "sdxl-refiner"


def save_kohya_dora(pipe: Any, path: Path, device: str) -> Path:
    """A random Kohya LoRA with ``dora_scale`` per input channel on every layer, as sd-scripts/LyCORIS save DoRA."""
    from model_build.dev_lora import kohya_state_dict, random_lora, save_kohya_lora

    lora = random_lora(pipe, rank=8, seed=21, strength=0.5, device=device)
    generator = torch.Generator().manual_seed(21)
    magnitudes = {
        key.replace("lora_down.weight", "dora_scale"): 1.0 + 0.3 * torch.rand(1, tensor.shape[1], generator=generator)
        for key, tensor in kohya_state_dict(lora, pipe).items()
        if key.endswith(".lora_down.weight")
    }
    return save_kohya_lora(lora, pipe, path, extra=magnitudes)


def build_controlnet(work: Path, full_size: bool) -> Path:
    """A random SDXL ControlNet as a user makes one: one original-layout file, converted into CONTROLNET_DIR."""
    single_file, root = work / "controlnet.safetensors", work / "controlnets"
    for command in (
        ["dev-controlnet", str(single_file), *(["--full-size"] if full_size else [])],
        ["convert", str(single_file), "--output", str(root / "smoke-controlnet")],
    ):
        subprocess.run([sys.executable, "-m", "model_build", "-q", *command], check=True, cwd=ROOT)
    single_file.unlink()
    return root


def control_image(size: int) -> str:
    """A PNG data URI with shapes for canny to find."""
    import base64
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (30, 60, 90))
    draw = ImageDraw.Draw(image)
    draw.rectangle((size // 8, size // 8, size // 2, size // 2), fill=(240, 200, 40))
    draw.ellipse((size // 2, size // 3, size - size // 10, size - size // 10), fill=(200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def serve_file(path: Path) -> tuple[str, str]:
    """``path`` served by an HTTP server on 127.0.0.1 (a daemon thread); its URL and sha256."""
    import functools
    import hashlib
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(path.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{path.name}"
    return url, hashlib.sha256(path.read_bytes()).hexdigest()


def image_pixels(uri: str | None) -> bytes | None:
    """An image's decoded pixels (its PNG text, which names the LoRAs, left out)."""
    import base64
    import io

    from PIL import Image

    return None if uri is None else Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).tobytes()


def prompt_encoder_check(worker: Any) -> None:
    """The CUDA-graph encoder replay equals eager CLIP (the CPU suite cannot check it)."""
    from worker.prompting.encoding import PromptEncoder

    eager = PromptEncoder(worker.engine.pipe, cache_bytes=0, cuda_graphs=False)
    graphed = PromptEncoder(worker.engine.pipe, cache_bytes=0)
    prompts = ("a cat", "a (cat:1.3) on a mat BREAK at night, " * 6)
    equal = all(
        all(
            torch.equal(a, b)
            for _ in range(2)  # the first call captures, the second replays
            for a, b in zip(
                graphed.encode(p, negative_prompt="dog").tensors(),
                eager.encode(p, negative_prompt="dog").tensors(),
                strict=True,
            )
        )
        for p in prompts
    )
    report("prompt_encoder_cuda_graphs", equal and graphed._graphs.broken is None, broken=graphed._graphs.broken)


def embedding_check(worker: Any, base: dict[str, Any], first: dict[str, Any]) -> dict[str, Any]:
    """The ``embedding`` check (module docstring): its image, metadata, CUDA-graph encoding and the job after it."""
    from bench.smoke_inpainting import run_job
    from worker.prompting.encoding import PromptEncoder

    fields = {"prompt": base["prompt"] + ", (embedding:smoke-embedding:1.1)", "negative_prompt": "smoke-embedding"}
    output, seconds = run_job(worker, "embedding", **{**base, **fields}, seed=7)
    again, _ = run_job(worker, "after-embedding", **base, seed=7)
    ok = "error" not in output and "error" not in again and "error" not in first
    listed = [entry["name"] for entry in output.get("metadata", {}).get("embeddings", [])]
    engine = worker.engine
    eager = PromptEncoder(engine.pipe, cache_bytes=0, cuda_graphs=False)
    eager.use_embedding_names(engine.encoders.embeddings)
    engine.encoders.clear_caches()  # encode from the graphs, not from the cache
    graphed = engine.prompt_encoder.encode(fields["prompt"], negative_prompt=fields["negative_prompt"])
    reference = eager.encode(fields["prompt"], negative_prompt=fields["negative_prompt"])
    graphs_equal = all(torch.equal(a, b) for a, b in zip(graphed.tensors(), reference.tensors(), strict=True))
    return {
        "ok": ok
        and output["images"][0] != first["images"][0]
        and again["images"][0] == first["images"][0]
        and listed == ["smoke-embedding"]
        and graphs_equal,
        "seconds": round(seconds, 2),
        "error": output.get("error") or again.get("error"),
        "embeddings": output.get("metadata", {}).get("embeddings"),
        "text_encoding_s": output.get("metadata", {}).get("timings", {}).get("text_encoding_s"),
        "encoders_equal_eager": graphs_equal,
        "no_embedding_after_equals_before": ok and again["images"][0] == first["images"][0],
    }


def embedding_url_check(worker: Any, base: dict[str, Any], path: Path) -> dict[str, Any]:
    """The ``embedding_url`` check (module docstring): a word by URL makes the image its folder file makes."""
    from bench.smoke_inpainting import run_job

    url, sha256 = serve_file(path)
    by_name, _ = run_job(worker, "embedding-name", **base, negative_prompt="smoke-embedding", seed=7)
    entry = {"name": "smoke-remote", "url": url, "sha256": sha256}
    by_url, seconds = run_job(
        worker, "embedding-url", **base, negative_prompt="smoke-remote", embeddings=[entry], seed=7
    )
    ok = "error" not in by_name and "error" not in by_url
    return {
        "ok": ok and image_pixels(by_url["images"][0]) == image_pixels(by_name["images"][0]),
        "seconds": round(seconds, 2),
        "error": by_name.get("error") or by_url.get("error"),
        "embeddings": by_url.get("metadata", {}).get("embeddings"),
    }


def out_of_memory_check(worker: Any, base: dict[str, Any], first: dict[str, Any], device: str) -> None:
    """A job past a memory cap ends with refresh_worker; the cap lifted, the next job equals the first (also run by
    --loras-only: the shortest smoke that checks it)."""
    from bench.smoke_inpainting import run_job

    if device != "cuda":
        report("out_of_memory", True, skipped="no CUDA device: the memory cap needs one")
    else:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_allocated() + 2**28) / total))
        try:
            failed, _ = run_job(worker, "oom", **base, seed=9, num_images=4)
        except Exception:  # the contract is an error output, never an exception: record it as a failure
            failed = {"exception": traceback.format_exc(limit=3)}
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        after, after_seconds = run_job(worker, "after-oom", **base, seed=7)
        report(
            "out_of_memory",
            bool(failed.get("refresh_worker")) and "error" not in after and after["images"][0] == first["images"][0],
            error=failed.get("error") or failed.get("exception"),
            refresh_worker=failed.get("refresh_worker"),
            next_job_ok="error" not in after,
            next_job_equals_first=after.get("images", [None])[0] == first["images"][0],
            next_job_s=round(after_seconds, 2),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full-size", action="store_true", help="full-size SDXL on CUDA (default: dev-size, CPU)")
    parser.add_argument("--model-dir", help="a converted folder to use instead of building a random one")
    parser.add_argument("--steps", type=int, help="steps per job (default 25 full-size, 4 dev)")
    parser.add_argument("--no-refiner", action="store_true", help="skip the refiner (saves its conversion)")
    parser.add_argument(
        "--loras-only",
        action="store_true",
        help="only the square, long-prompt, LoRA-family and out-of-memory checks (no refiner, ControlNet, adapters "
        "or other folders)",
    )
    parser.add_argument(
        "--no-model-folders",
        action="store_true",
        help="skip the v-prediction and inpainting model folders (saves building them and two worker starts)",
    )
    args = parser.parse_args()
    device = "cuda" if args.full_size else "cpu"
    if args.full_size and not torch.cuda.is_available():
        raise SystemExit("--full-size needs a CUDA GPU; without one, run the dry run (no --full-size)")
    size = 1024 if args.full_size else 256
    steps = args.steps or (25 if args.full_size else 4)
    dtype = torch.float16 if args.full_size else torch.float32

    from bench.fullsize import build_random_pipeline, save_as_model_dir
    from bench.smoke_inpainting import inpaint_check, inpaint_model_checks, outpaint_check, run_job
    from bench.smoke_ip_adapter import build_ip_adapters, ip_adapter_checks
    from bench.smoke_models import (
        build_inpaint_folder,
        free_gpu,
        save_vpred_folder,
        start_worker,
        vpred_checks,
        without_compile,
    )
    from core.settings import load_settings
    from model_build.dev_lora import random_lora, save_diffusers_lora
    from model_build.dev_lycoris import random_lycoris, save_lycoris
    from worker.handler import Worker

    work = Path(tempfile.mkdtemp(prefix="smoke-"))
    started = time.perf_counter()
    pipe = build_random_pipeline("sdxl_base" if args.full_size else "dev_tiny", device, dtype)
    lora_dir = work / "loras"
    lora_dir.mkdir()
    save_diffusers_lora(random_lora(pipe, rank=16, device=device), lora_dir / "smoke-lora.safetensors")
    lokr = random_lycoris(pipe, "lokr", rank=8, strength=0.3, tucker=True, device=device)
    save_lycoris(lokr, pipe, lora_dir / "smoke-lokr.safetensors")
    loha = random_lycoris(pipe, "loha", rank=8, strength=0.3, seed=1, device=device)
    save_lycoris(loha, pipe, lora_dir / "smoke-loha.safetensors")
    save_kohya_dora(pipe, lora_dir / "smoke-dora.safetensors", device)
    model_dir = Path(args.model_dir) if args.model_dir else save_as_model_dir(pipe, work / "sdxl-random")
    folders = not (args.no_model_folders or args.loras_only)
    vpred_dir = save_vpred_folder(pipe, work / "sdxl-random-vpred") if folders else None  # same weights, v-pred
    del pipe
    free_gpu(device)
    inpaint_dir = build_inpaint_folder(work / "sdxl-random-inpaint", args.full_size, device, dtype) if folders else None
    refiner_dir = None if args.no_refiner or args.loras_only else build_refiner(work, args.full_size)
    embedding_root = work / "embeddings"
    if args.loras_only:  # empty folders: the worker starts as it would with none installed
        controlnet_root, ip_adapter_root, ip_adapter_names = work / "controlnets", work / "ip-adapters", []
        for folder in (controlnet_root, ip_adapter_root, embedding_root):
            folder.mkdir()
    else:
        controlnet_root = build_controlnet(work, args.full_size)
        ip_adapter_root, ip_adapter_names = build_ip_adapters(work, args.full_size)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "model_build",
                "-q",
                "dev-embedding",
                str(embedding_root / "smoke-embedding.safetensors"),
            ]
            + ([] if args.full_size else ["--model", str(model_dir)]),  # full size: SDXL's 768 and 1280
            check=True,
            cwd=ROOT,
        )
    report(
        "setup",
        True,
        seconds=round(time.perf_counter() - started, 1),
        model_dir=str(model_dir),
        refiner_dir=str(refiner_dir) if refiner_dir else None,
        vpred_dir=str(vpred_dir) if vpred_dir else None,
        inpaint_dir=str(inpaint_dir) if inpaint_dir else None,
    )

    os.environ["LORA_DIR"] = str(lora_dir)  # the engine's LoRA manager reads its settings from the environment
    lora_url = serve_file(lora_dir / "smoke-lora.safetensors")  # the lora_url check: downloads from this machine
    os.environ.update(ALLOW_LORA_DOWNLOAD="1", ALLOW_PRIVATE_URLS="1", LORA_DOWNLOAD_DIR=str(work / "downloads"))
    os.environ["CONTROLNET_DIR"] = str(controlnet_root)
    os.environ["EMBEDDINGS_DIR"] = str(embedding_root)
    os.environ["IP_ADAPTER_DIR"] = str(ip_adapter_root)
    os.environ.setdefault("VAE_TILE_PIXELS", str((size * 3 // 2) ** 2))  # hires_tiled's 2x is over it, 1.5x is not
    settings = load_settings(None, offload="none")
    started = time.perf_counter()
    worker = Worker(settings)
    worker.start(model_dir, refiner_dir)
    accelerator = getattr(worker.engine, "accelerator", None)
    if worker.engine is not None and accelerator is None:  # an engine that does not apply them itself
        from worker.generation.acceleration import accelerate

        accelerator = accelerate(worker.engine.pipe, settings)
    dtypes = {name: str(getattr(worker.engine.pipe, name).dtype) for name in ("unet", "vae")} if worker.engine else {}
    report(
        "start",
        worker.engine is not None,
        seconds=round(time.perf_counter() - started, 1),
        error=str(worker.startup_error) if worker.engine is None else None,
        speedups=accelerator.describe() if accelerator is not None else None,
        warm_up=accelerator.report.to_dict() if accelerator is not None and accelerator.report else None,
        dtypes=dtypes,
    )
    if worker.engine is None:
        sys.exit(1)

    if device == "cuda":
        prompt_encoder_check(worker)

    base = {"prompt": "a lighthouse on a cliff at dawn", "width": size, "height": size, "num_inference_steps": steps}
    if refiner_dir is not None:  # the base-only checks stay base-only; the refiner has checks of its own below
        base["refiner"] = False
    first, seconds = run_job(worker, "square", **base, seed=7)
    plain_seconds = seconds
    report(
        "square",
        "error" not in first and len(first.get("images", [])) == 1,
        seconds=round(seconds, 2),
        error=first.get("error"),
        timings=first.get("metadata", {}).get("timings"),
    )

    output, seconds = run_job(worker, "long", **{**base, "prompt": long_prompt()}, seed=8)
    report(
        "long_prompt",
        "error" not in output,
        seconds=round(seconds, 2),
        error=output.get("error"),
        prompt=output.get("metadata", {}).get("prompt"),
    )

    images: dict[str, Any] = {}
    for check, lora in (
        ("lora", {"name": "smoke-lora"}),
        ("lora_url", {"name": lora_url[0], "sha256": lora_url[1]}),
        ("lycoris", {"name": "smoke-lokr"}),
        ("loha", {"name": "smoke-loha"}),
        ("dora", {"name": "smoke-dora"}),
    ):
        with_lora, seconds = run_job(worker, check, **base, seed=7, loras=[{**lora, "scale": 0.8}])
        images[check] = image_pixels(with_lora.get("images", [None])[0])
        again, _ = run_job(worker, f"after-{check}", **base, seed=7)
        lora_ok = "error" not in with_lora and "error" not in again and "error" not in first
        same_as_lora_dir = check != "lora_url" or images["lora_url"] == images["lora"]
        report(
            check,
            lora_ok
            and with_lora["images"][0] != first["images"][0]
            and again["images"][0] == first["images"][0]
            and same_as_lora_dir,
            seconds=round(seconds, 2),
            error=with_lora.get("error") or again.get("error"),
            lora_changes_image=lora_ok and with_lora["images"][0] != first["images"][0],
            no_lora_after_equals_before=lora_ok and again["images"][0] == first["images"][0],
            cache=with_lora.get("metadata", {}).get("cache", {}).get("loras"),
            **({"equals_lora_dir_image": same_as_lora_dir} if check == "lora_url" else {}),
        )

    if args.loras_only:
        out_of_memory_check(worker, base, first, device)
        report("summary", not FAILURES, failed=FAILURES)
        sys.exit(1 if FAILURES else 0)

    # Sampling modes (README "Samplers and schedules"): each beside the plain job's time.
    for check, fields in (
        (
            "lightning",
            {"sampler_name": "Euler", "scheduler": "SGM Uniform", "num_inference_steps": 4, "guidance_scale": 0},
        ),
        ("a1111_automatic", {"sampler_name": "DPM++ 2M", "scheduler": "Automatic"}),
        ("align_your_steps", {"sampler_name": "DPM++ 2M", "scheduler": "Align Your Steps"}),
        ("lcm", {"sampler_name": "LCM", "num_inference_steps": 4, "guidance_scale": 1.0}),
        ("tcd", {"sampler_name": "TCD", "num_inference_steps": 4, "guidance_scale": 0, "eta": 0.3}),
        ("custom_timesteps", {"scheduler": "Euler", "timesteps": [999, 749, 499, 249], "num_inference_steps": 4}),
        ("guidance_rescale", {"sampler_name": "Euler a", "guidance_rescale": 0.7}),
    ):
        output, seconds = run_job(worker, f"sampling-{check}", **{**base, **fields}, seed=7)
        metadata = output.get("metadata", {})
        report(
            f"sampling_{check}",
            "error" not in output and len(output.get("images", [])) == 1,
            seconds=round(seconds, 2),
            plain_seconds=round(plain_seconds, 2),
            error=output.get("error"),
            sampling=metadata.get("sampling"),
            timesteps=metadata.get("stages", [{}])[0].get("timesteps"),
        )

    unit = {"name": "smoke-controlnet", "image": control_image(size), "preprocessor": "canny"}
    controlled, seconds = run_job(worker, "controlnet", **base, seed=7, controlnets=[unit])
    again, _ = run_job(worker, "after-controlnet", **base, seed=7)
    controlnet_ok = "error" not in controlled and "error" not in again and "error" not in first
    report(
        "controlnet",
        controlnet_ok and controlled["images"][0] != first["images"][0] and again["images"][0] == first["images"][0],
        seconds=round(seconds, 2),
        plain_seconds=round(plain_seconds, 2),
        error=controlled.get("error") or again.get("error"),
        controlnets=controlled.get("metadata", {}).get("controlnets"),
        timings=controlled.get("metadata", {}).get("timings"),
        no_controlnet_after_equals_before=controlnet_ok and again["images"][0] == first["images"][0],
    )

    report("embedding", **embedding_check(worker, base, first), plain_seconds=round(plain_seconds, 2))
    embedding_file = embedding_root / "smoke-embedding.safetensors"
    report("embedding_url", **embedding_url_check(worker, base, embedding_file), plain_seconds=round(plain_seconds, 2))
    for check, details in ip_adapter_checks(worker, base, first, ip_adapter_names, "smoke-lora"):
        report(check, **details, plain_seconds=round(plain_seconds, 2))

    for check, run_check in (("inpaint", inpaint_check), ("outpaint", outpaint_check)):
        report(check, **run_check(worker, base, first, size), plain_seconds=round(plain_seconds, 2))

    if refiner_dir is not None:
        for check, fields in (
            ("refiner", {"refiner": True, "refiner_inference_steps": steps, "strength": 0.3}),
            ("refiner_ensemble", {"refiner": True, "high_noise_frac": 0.8}),
        ):
            output, seconds = run_job(worker, check, **{**base, **fields}, seed=7)
            used = output.get("metadata", {}).get("refiner", {}).get("used")
            report(
                check,
                "error" not in output and len(output.get("images", [])) == 1 and used is True,
                seconds=round(seconds, 2),
                error=output.get("error"),
                refiner=output.get("metadata", {}).get("refiner"),
                timings=output.get("metadata", {}).get("timings"),
            )

    for check, fields in (
        ("hires", {"hr_scale": 1.5, "hr_upscaler": "Latent"}),
        # JPEG: a 2048² PNG of noise is over the 10 MB payload limit (the worker says so, correctly)
        ("hires_tiled", {"hr_scale": 2.0, "hr_upscaler": "Lanczos", "output_format": "jpeg"}),
    ):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        hires = {"enable_hr": True, "hr_second_pass_steps": min(steps, 10), "denoising_strength": 0.5, **fields}
        output, seconds = run_job(worker, check, **base, **hires, seed=7)
        metadata = output.get("metadata", {})
        side = int(size * fields["hr_scale"])
        report(
            check,
            "error" not in output
            and (metadata.get("width"), metadata.get("height")) == (side, side)
            and metadata.get("vae_tiling", {}).get("decode") == (check == "hires_tiled"),
            seconds=round(seconds, 2),
            plain_job_s=round(first.get("metadata", {}).get("timings", {}).get("total_s", 0.0), 2),
            error=output.get("error"),
            hires=metadata.get("hires"),
            vae_tiling=metadata.get("vae_tiling"),
            timings=metadata.get("timings"),
            peak_gpu_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        )

    # Every mode above shares the base's modules: a plain job after them all must still give the first job's bytes
    # (the VAE left in fp16 by diffusers' img2img encode broke this on the GPU; worker.generation.vae_tiling).
    after_modes, _ = run_job(worker, "after-modes", **base, seed=7)
    report(
        "plain_after_modes",
        "error" not in after_modes and "error" not in first and after_modes["images"][0] == first["images"][0],
        error=after_modes.get("error"),
        vae_dtype=str(worker.engine.pipe.vae.dtype),
    )

    out_of_memory_check(worker, base, first, device)

    # Other model folders, each served by a worker of its own as MODEL_DIR; one worker holds the GPU at a time.
    del worker, accelerator
    if vpred_dir is None or inpaint_dir is None:  # --no-model-folders
        report("summary", not FAILURES, failed=FAILURES)
        sys.exit(1 if FAILURES else 0)
    vpred_worker, started_details = start_worker(settings, vpred_dir, device)
    if vpred_worker is None:
        report("v_prediction", False, **started_details)
    else:
        plain, rescale = vpred_checks(vpred_worker, base, first, same_weights=args.model_dir is None)
        report("v_prediction", **plain, plain_seconds=round(plain_seconds, 2), **started_details)
        report("v_prediction_rescale", **rescale, plain_seconds=round(plain_seconds, 2))
    del vpred_worker
    inpaint_settings, compile_note = without_compile(settings)
    inpaint_worker, started_details = start_worker(inpaint_settings, inpaint_dir, device)
    if inpaint_worker is None or "error" in first:
        report("inpaint_model", False, **{"error": "the square job failed: no image to inpaint", **started_details})
    else:
        masked, unmasked = inpaint_model_checks(inpaint_worker, base, first["images"][0], size)
        details = {**started_details, "compile": compile_note, "plain_seconds": round(plain_seconds, 2)}
        report("inpaint_model", **masked, **details)
        report("inpaint_model_unmasked_refused", **unmasked)
    report("summary", not FAILURES, failed=FAILURES)
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
