"""COMPILE=aot on the CPU with the dev model: a real AOTInductor package is built once (about a minute on 2 cores),
then loaded by a second engine without building, served for its shape, bypassed for everything else.

Speed is the GPU bench's business (bench/results/README.md); here only what must hold on any device: the package's
images agree with eager ones, LoRAs merged in place reach it, a changed module structure is never served by it, and
a start that can neither load nor build a package says so.
"""

from __future__ import annotations

import logging
import shutil
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench.engine_speed import unet_inputs
from core.errors import ConfigurationError
from core.settings import WORKER, load_settings
from model_build.dev_lora import write_dev_lora
from worker.generation import compile_prerequisites
from worker.generation.acceleration import SpeedupOptions, apply_speedups
from worker.generation.engine import Engine
from worker.request.schema import GenerationRequest

JOB = {"prompt": "a lighthouse at dawn", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 7}
WARMED = "64x64"


def aot_settings(cache: Path, loras: Path, **more: str):
    return load_settings(
        {"COMPILE": "aot", "COMPILE_CACHE_DIR": str(cache), "WARMUP_SIZES": WARMED, "LORA_DIR": str(loras), **more}
    )


@pytest.fixture(scope="module")
def engines(dev_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("aot")
    loras = root / "loras"
    write_dev_lora(dev_model_dir, loras / "style.safetensors", seed=1)
    cache = root / "cache"
    aot = Engine(dev_model_dir, settings=aot_settings(cache, loras))
    eager = Engine(dev_model_dir, settings=load_settings({"LORA_DIR": str(loras)}))
    return SimpleNamespace(aot=aot, eager=eager, cache=cache, loras=loras, model=dev_model_dir)


def run_engine(engine: Engine, **changes) -> np.ndarray:
    request = GenerationRequest(**{**JOB, **changes})
    return np.asarray(engine.generate(request).images[0].convert("RGB"), dtype=np.int16)


def counts(engine: Engine) -> tuple[int, int]:
    aot = engine.accelerator.aot
    return aot.packaged_calls, aot.eager_calls


def test_the_first_start_builds_a_package_that_agrees_with_the_eager_unet(engines: SimpleNamespace) -> None:
    report = engines.aot.accelerator.report
    assert report.error is None
    (package,) = report.aot_packages  # one warm-up shape with guidance: one UNet call shape
    assert not package["hit"] and package["agreement"] >= 0.999
    assert Path(package["file"]).is_file() and Path(package["file"]).parent == engines.cache / "aot"
    assert list((engines.cache / "aot").glob("*.partial*")) == []  # written under a temporary name, renamed
    assert any(item.startswith("compile_unet_aot:") for item in engines.aot.accelerator.describe()["applied"])


def test_a_job_at_the_warmed_size_runs_the_package_and_matches_the_eager_worker(engines: SimpleNamespace) -> None:
    packaged, eager = counts(engines.aot)
    image = run_engine(engines.aot)
    assert counts(engines.aot) == (packaged + 3, eager)  # 3 steps, each one packaged call (guidance batched)
    # Compiled kernels sum in another order: the last bits differ, a pixel at most by rounding.
    assert np.abs(image - run_engine(engines.eager)).max() <= 2


def test_other_sizes_and_calls_a_package_cannot_hold_run_eagerly(engines: SimpleNamespace) -> None:
    packaged, eager = counts(engines.aot)
    wide = run_engine(engines.aot, width=128)
    assert counts(engines.aot) == (packaged, eager + 3)
    assert np.array_equal(wide, run_engine(engines.eager, width=128))  # the same eager code: the same bytes
    unet = engines.aot.pipe.unet
    with torch.no_grad():  # the warmed 64x64 call with guidance, but cross_attention_kwargs set
        unet(**unet_inputs(unet, 64, 1, "cpu", torch.float32), cross_attention_kwargs={"a": 1})
    assert counts(engines.aot) == (packaged, eager + 4)


def test_a_merged_lora_reaches_the_package_and_leaves_with_the_job(engines: SimpleNamespace) -> None:
    before = run_engine(engines.aot)
    packaged, eager = counts(engines.aot)
    styled = run_engine(engines.aot, loras=[{"name": "style", "scale": 1.0}])
    assert counts(engines.aot) == (packaged + 3, eager)  # merged in place: the same modules, the package serves
    assert np.abs(styled - run_engine(engines.eager, loras=[{"name": "style", "scale": 1.0}])).max() <= 2
    assert np.abs(styled - before).mean() > 5  # the LoRA changed the image
    assert np.abs(run_engine(engines.aot) - before).max() == 0  # restored bit for bit


def test_a_changed_module_structure_is_never_served_by_the_package(engines: SimpleNamespace) -> None:
    """What peft's layers (LORA_FUSE=0, DoRA) and IP-Adapter's processors do: a module replaced by assignment."""
    unet = engines.aot.pipe.unet
    attention = next(module for name, module in unet.named_modules() if name.endswith("attn1"))
    original = attention.to_q

    class Doubled(torch.nn.Module):
        def __init__(self, base: torch.nn.Module) -> None:
            super().__init__()
            self.base = base

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * self.base(x)

    before = run_engine(engines.aot)
    attention.to_q = Doubled(original)
    try:
        packaged, eager = counts(engines.aot)
        changed = run_engine(engines.aot)
        assert counts(engines.aot) == (packaged, eager + 3)
        assert np.abs(changed - before).mean() > 0
    finally:
        attention.to_q = original
    packaged, eager = counts(engines.aot)
    assert np.abs(run_engine(engines.aot) - before).max() == 0  # the exported structure again: the package serves again
    assert counts(engines.aot) == (packaged + 3, eager)


def test_processors_put_back_without_a_hook_serve_the_package_from_the_next_job(
    engines: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IP-Adapter's way: module processors in (a registration: noticed), the plain originals back (no hook)."""
    unet = engines.aot.pipe.unet
    attention = next(module for name, module in unet.named_modules() if name.endswith("attn2"))
    original = attention.processor

    class Halved(torch.nn.Module):
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return original(attn, hidden_states, *args, **kwargs) / 2

    aot = engines.aot.accelerator.aot
    comparisons = []
    fingerprint = aot._fingerprint
    monkeypatch.setattr(aot, "_fingerprint", lambda: comparisons.append(1) or fingerprint())
    before = run_engine(engines.aot)
    attention.set_processor(Halved())
    packaged, eager = counts(engines.aot)
    assert np.abs(run_engine(engines.aot) - before).mean() > 0
    assert counts(engines.aot) == (packaged, eager + 3)
    assert len(comparisons) == 1  # after the registration, not on every eager step
    attention.set_processor(original)  # a plain object: no registration hook fires
    packaged, eager = counts(engines.aot)
    assert np.abs(run_engine(engines.aot) - before).max() == 0
    assert counts(engines.aot) == (packaged + 3, eager)
    assert len(comparisons) == 2  # at the start of the job's denoising loop


def test_a_second_start_loads_the_package_without_building(
    engines: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also with COMPILE_MODE=reduce-overhead: CUDA graphs are captured around a package, not compiled into it, so
    that start loads the default mode's package. On the CPU its record says why no graph runs; the capture itself
    needs a GPU (the bench's `end_to_end` with --compile aot --compile-mode reduce-overhead, bench/results)."""

    def no_build(*args, **kwargs):
        raise AssertionError("a second start must not build")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_build)
    monkeypatch.setattr(torch.export, "export", no_build)
    first = engines.aot.accelerator.report.aot_packages[0]
    assert first["cuda_graph"] == "off"  # COMPILE_MODE=default
    second = Engine(engines.model, settings=aot_settings(engines.cache, engines.loras, COMPILE_MODE="reduce-overhead"))
    (package,) = second.accelerator.report.aot_packages
    assert second.accelerator.report.error is None and package["hit"] and package["agreement"] >= 0.999
    assert package["key"] == first["key"] and package["cuda_graph"] == "not on cpu"
    assert np.abs(run_engine(second) - run_engine(engines.eager)).max() <= 2


def test_one_package_serves_every_batch_size_and_each_warmed_one_is_checked(
    engines: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch is left open at export: WARMUP_BATCH_SIZES=1,2 loads the one package the first start built and checks
    it at both UNet batches (2 and 4 rows with guidance); a batch size nobody warmed (3 images) still runs it."""

    def no_build(*args, **kwargs):
        raise AssertionError("another batch size must not build another package")

    first = engines.aot.accelerator.report.aot_packages[0]
    assert first["batch_rows"] == [2, 32] and first["inputs"][0][0][0] == 2
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_build)
    two = Engine(engines.model, settings=aot_settings(engines.cache, engines.loras, WARMUP_BATCH_SIZES="1,2"))
    records = two.accelerator.report.aot_packages
    assert [record["inputs"][0][0][0] for record in records] == [2, 4]
    assert all(record["hit"] and record["agreement"] >= 0.999 for record in records)
    assert {record["file"] for record in records} == {first["file"]}
    packaged, eager = counts(engines.aot)
    request = GenerationRequest(**{**JOB, "num_images": 3})
    images = [np.asarray(image.convert("RGB"), dtype=np.int16) for image in engines.aot.generate(request).images]
    assert counts(engines.aot) == (packaged + 3, eager)  # 6 rows: not warmed, still packaged
    expected = engines.eager.generate(request).images
    for image, reference in zip(images, expected, strict=True):
        assert np.abs(image - np.asarray(reference.convert("RGB"), dtype=np.int16)).max() <= 2


RUNNER_FAILURE = (  # what torch 2.11's AOTInductor runner raised for CUDA's out of memory on the H200 (smoke, 12-04)
    "run_func_( container_handle_, input_handles.data(), input_handles.size(), output_handles.data(), "
    "output_handles.size(), reinterpret_cast<AOTInductorStreamHandle>(stream_handle), proxy_executor_handle_) "
    "API call failed at /pytorch/torch/csrc/inductor/aoti_runner/model_container_runner.cpp, line 144"
)


def test_a_package_that_fails_mid_job_hands_the_call_to_the_eager_unet(
    engines: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner reports every failure inside a package, out of memory included, as one generic error. The call
    then runs eagerly: a real out of memory raises torch's OutOfMemoryError there (which the handler turns into
    refresh_worker), anything else is computed, the eager worker's bytes; other errors are not swallowed."""
    aot = engines.aot.accelerator.aot
    (loaded,) = {id(package): package for package in aot.packages.values()}.values()

    def failing(*inputs):
        raise RuntimeError(RUNNER_FAILURE)

    monkeypatch.setattr(loaded, "model", failing)
    packaged, eager = counts(engines.aot)
    assert np.array_equal(run_engine(engines.aot), run_engine(engines.eager))
    assert counts(engines.aot) == (packaged, eager + 3)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(aot, "eager_forward", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        run_engine(engines.aot)

    def other(*inputs):
        raise RuntimeError("a bug elsewhere")

    monkeypatch.setattr(loaded, "model", other)
    with pytest.raises(RuntimeError, match="a bug elsewhere"):
        run_engine(engines.aot)


def test_a_package_that_disagrees_with_the_eager_unet_never_serves(
    engines: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The load-time check (a stale package, wrong weights): the start says which file and what to do, and the
    worker serves eagerly, the eager worker's bytes."""
    from worker.generation import aot_unet

    monkeypatch.setattr(aot_unet.AotUNet, "_agreement", lambda self, loaded, inputs: 0.5)
    try:
        doubtful = Engine(engines.model, settings=aot_settings(engines.cache, engines.loras))
    finally:
        torch.compiler.set_stance("default")  # the failed warm-up set force_eager process-wide
    error = doubtful.accelerator.report.error
    assert "disagrees with the eager UNet (cosine 0.50000 < 0.999)" in error
    assert "sdxl-unet-" in error and "delete it to rebuild, or set COMPILE=off" in error
    assert doubtful.accelerator.aot.disabled and doubtful.accelerator.describe()["compile_error"] == error
    assert np.array_equal(run_engine(doubtful), run_engine(engines.eager))
    assert doubtful.accelerator.aot.packaged_calls == 0


def test_a_start_without_a_cxx_compiler_still_loads_the_package(engines: SimpleNamespace, tmp_path: Path) -> None:
    """Loading needs no compiler (README): a fresh process with no C++ compiler and an empty Inductor cache (where
    torch's loader would compile its CPU probes) loads the package the first start built."""
    import json
    import os
    import subprocess
    import sys

    child = (
        "import json, sys\n"
        "from core.settings import load_settings\n"
        "from worker.generation.engine import Engine\n"
        "from worker.generation.compile_prerequisites import aot_build_missing\n"
        "engine = Engine(sys.argv[1], settings=load_settings(json.loads(sys.argv[2])))\n"
        "print(json.dumps({'missing': aot_build_missing(False), 'report': engine.accelerator.report.to_dict()}))\n"
    )
    settings = {"COMPILE": "aot", "COMPILE_CACHE_DIR": str(engines.cache), "WARMUP_SIZES": WARMED}
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind")}
    done = subprocess.run(
        [sys.executable, "-c", child, str(engines.model), json.dumps(settings)],
        capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2], timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert any("C++ compiler" in item for item in result["missing"])  # nothing here could build one
    (package,) = result["report"]["aot_packages"]
    assert result["report"]["error"] is None and package["hit"] and package["agreement"] >= 0.999


def test_a_start_waits_while_another_worker_builds_the_package(engines: SimpleNamespace) -> None:
    """Workers starting together on one volume: the package's lock is held (here by another process), so a start
    waits instead of building a second copy, then loads what is there once the lock is free."""
    import subprocess
    import sys
    import threading

    (package,) = (engines.cache / "aot").glob("*.pt2")
    hold = "import sys; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); print('held')"
    holder = subprocess.Popen(
        [sys.executable, "-u", "-c", hold + "; sys.stdin.read()", str(package) + ".lock"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started: list[Engine] = []
        thread = threading.Thread(
            target=lambda: started.append(Engine(engines.model, settings=aot_settings(engines.cache, engines.loras)))
        )
        thread.start()
        thread.join(timeout=8)  # long enough to load the model and reach the package
        assert thread.is_alive() and not started
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    thread.join(timeout=120)
    (record,) = started[0].accelerator.report.aot_packages
    assert record["hit"] and record["seconds"] >= 1  # it waited, then loaded


def test_no_package_and_no_compiler_stops_the_start_with_the_fix(
    engines: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A foreign or truncated package is rebuilt; where nothing can build it, the start fails naming the fix."""
    cache = tmp_path / "cache"
    shutil.copytree(engines.cache, cache)
    for package in (cache / "aot").glob("*.pt2"):
        package.write_bytes(package.read_bytes()[:1000])
    missing = compile_prerequisites.CompilePrerequisites("cpu", None, Path("/nowhere"), ("a C++ compiler (g++)",))
    monkeypatch.setattr(compile_prerequisites, "find_prerequisites", lambda cuda, cxx=False: missing)
    with caplog.at_level(logging.WARNING), pytest.raises(ConfigurationError) as refused:
        Engine(engines.model, settings=aot_settings(cache, engines.loras))
    assert "not loadable" in caplog.text
    message = str(refused.value)
    assert "COMPILE=aot has no package" in message and "a C++ compiler (g++)" in message
    assert "COMPILE=off" in message and str(cache / "aot") in message
    # At the worker's start-up check only a warning: packages built elsewhere load without a compiler.
    settings = load_settings({"COMPILE": "aot"}, command=WORKER)
    with caplog.at_level(logging.WARNING):
        assert compile_prerequisites.check_compile_prerequisites(settings).startswith("COMPILE=aot")
    assert "only AOT packages already in the cache folder" in caplog.text


def test_the_batch_runner_serves_its_calls_from_the_package(engines: SimpleNamespace, tmp_path: Path) -> None:
    """``python -m batch run`` with COMPILE=aot and the package folder the first start filled: loaded, not built."""
    from PIL import Image

    from tests.batch.batch_testing import run, sidecars, write_jsonl

    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{**JOB, "id": "aot"}])
    out = tmp_path / "out"
    env = {"COMPILE": "aot", "COMPILE_CACHE_DIR": str(engines.cache), "WARMUP_SIZES": WARMED, "LOG_LEVEL": "INFO"}
    code, _, log = run("run", jobs, "--out", out, "--model", engines.model, env=env)
    assert code == 0, log[-2000:]
    assert "AOT package" in log and "loaded" in log and "built" not in log
    sidecar = sidecars(out)["aot"]
    assert any(item.startswith("compile_unet_aot") for item in sidecar["generation"]["device"]["speedups"]["applied"])
    image = np.asarray(Image.open(out / sidecar["images"][0]["file_name"]).convert("RGB"), dtype=np.int16)
    assert np.abs(image - run_engine(engines.eager)).max() <= 2


def test_a_package_is_keyed_by_what_its_code_depends_on(engines: SimpleNamespace, monkeypatch) -> None:
    """Not the weights (the package reads the live ones), but the diffusers code, the dtype and the options."""
    import diffusers

    from worker.generation.acceleration import _aot_options_digest

    pipe = engines.eager.pipe
    plain = _aot_options_digest(pipe, SpeedupOptions(compile="aot"))
    assert plain == _aot_options_digest(pipe, SpeedupOptions(compile="aot", warmup_sizes=((512, 512),)))
    assert plain != _aot_options_digest(pipe, SpeedupOptions(compile="aot", fuse_qkv=True))
    monkeypatch.setattr(diffusers, "__version__", "0.0.1")
    assert plain != _aot_options_digest(pipe, SpeedupOptions(compile="aot"))


def test_a_failed_warm_up_leaves_an_eager_worker(tmp_path: Path) -> None:
    """A warm-up that fails before any package exists (a shape the pipeline refuses) serves eagerly, said once."""
    from bench.fullsize import build_random_pipeline

    pipe = build_random_pipeline("dev_tiny", "cpu", torch.float32)
    accelerator = apply_speedups(pipe, SpeedupOptions(compile="aot", warmup_sizes=((100, 100),), cache_dir=tmp_path))
    try:
        report = accelerator.warm_up(steps=1)
        assert report.error is not None and "100" in report.error and report.aot_packages == []
        assert accelerator.aot.disabled and accelerator.describe()["compile_error"] == report.error
        with torch.no_grad():
            pipe(prompt="a cat", width=64, height=64, num_inference_steps=2, output_type="latent")
        assert (accelerator.aot.packaged_calls, accelerator.aot.eager_calls) == (0, 2)
        assert not (tmp_path / "aot").exists() or list((tmp_path / "aot").iterdir()) == []
    finally:
        torch.compiler.set_stance("default")  # process-wide; later tests expect the default
        accelerator.aot.uninstall()


def test_building_a_gpu_package_needs_what_triton_needs_too(monkeypatch: pytest.MonkeyPatch) -> None:
    found = {
        (True, True): ("a C++ compiler (g++)",),
        (True, False): ("a C compiler (gcc)", "the triton package"),
        (False, True): ("a C++ compiler (g++)",),
    }

    def find(cuda: bool, cxx: bool = False):
        return compile_prerequisites.CompilePrerequisites("x", None, Path("/nowhere"), found[(cuda, cxx)])

    monkeypatch.setattr(compile_prerequisites, "find_prerequisites", find)
    assert compile_prerequisites.aot_build_missing(cuda=True) == [
        "a C++ compiler (g++)",
        "a C compiler (gcc)",
        "the triton package",
    ]
    assert compile_prerequisites.aot_build_missing(cuda=False) == ["a C++ compiler (g++)"]


@pytest.mark.parametrize(
    ("options", "fix"),
    [
        ({"quantize": "fp8"}, "use QUANTIZE=off, or COMPILE=unet"),
    ],
)
def test_aot_refuses_what_it_cannot_package(engines: SimpleNamespace, options: dict, fix: str) -> None:
    with pytest.raises(ConfigurationError, match=fix):
        apply_speedups(engines.eager.pipe, SpeedupOptions(compile="aot", **options))


@pytest.mark.parametrize(
    ("mode", "autotuned", "graphs"),
    [
        ("default", False, False),
        ("reduce-overhead", False, True),
        ("max-autotune-no-cudagraphs", True, False),
        ("max-autotune", True, True),
    ],
)
def test_each_compile_mode_splits_into_autotuning_built_in_and_graphs_around(
    engines: SimpleNamespace, mode: str, autotuned: bool, graphs: bool
) -> None:
    """COMPILE=aot takes every COMPILE_MODE: autotuning is compiled into the package (so it keys another one), CUDA
    graphs are captured around whichever package serves. Installed only: nothing is built until a warm-up."""
    accelerator = apply_speedups(engines.eager.pipe, SpeedupOptions(compile="aot", compile_mode=mode))
    try:
        aot = accelerator.aot
        assert aot.inductor_configs["max_autotune"] is autotuned and aot.cuda_graphs is graphs
    finally:
        accelerator.aot.uninstall()
    assert not hasattr(engines.eager.pipe.unet.forward, "packages")  # the eager engine's own forward is back


def test_a_gpu_package_loads_without_probing_the_cpu(engines: SimpleNamespace, monkeypatch) -> None:
    """torch 2.11 probes the CPU's vector ISA at each package load by compiling C++ and loading each probe in a
    child that imports torch (35-45 s of a 46 s load on the H200 machine); a CUDA package is loaded with the ISA
    it recorded instead. Checked here with the CPU package: inside the context no probe is built."""
    from torch._inductor import codecache, cpu_vec_isa

    from worker.generation.aot_unet import _cpu_isa_as_recorded

    (package,) = sorted((engines.cache / "aot").glob("*.pt2"))
    recorded = torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(str(package), "model")["AOTI_CPU_ISA"]

    def no_probe(*args, **kwargs):
        raise AssertionError("a CPU ISA probe was built")

    monkeypatch.setattr(cpu_vec_isa.VecISA, "check_build", no_probe)
    original = cpu_vec_isa.pick_vec_isa
    # What torch._inductor.codecache does when the load imports it first: bind pick_vec_isa by name. On the H200
    # the stand-in it kept broke the next package build (a VAE decoder's, after the UNet's load).
    imported_meanwhile = types.ModuleType("torch._inductor._imported_during_the_load")
    monkeypatch.setitem(sys.modules, imported_meanwhile.__name__, imported_meanwhile)
    with _cpu_isa_as_recorded(package):
        assert codecache.get_device_information("cpu")["AOTI_CPU_ISA"] == recorded
        loaded = torch._inductor.aoti_load_package(str(package))
        imported_meanwhile.pick_vec_isa = cpu_vec_isa.pick_vec_isa
        assert imported_meanwhile.pick_vec_isa is not original
    assert cpu_vec_isa.pick_vec_isa is original and imported_meanwhile.pick_vec_isa is original
    assert loaded.get_constant_fqns()  # a real package, loaded inside the context


def test_the_refiner_gets_its_own_package_and_a_refiner_job_runs_compiled(
    engines: SimpleNamespace, dev_refiner_dir: Path, tmp_path: Path
) -> None:
    """The official worker's default job refines every image; its refining steps must not fall back to eager.
    The base's package is loaded from the module's cache, the refiner's (another UNet: 1280-wide prompts, 5 time
    ids) is built beside it at the same warm-up size, and the refiner job's image matches an eager worker's."""
    cache = tmp_path / "cache"
    shutil.copytree(engines.cache, cache)
    settings = aot_settings(cache, engines.loras)
    compiled = Engine(engines.model, refiner_dir=dev_refiner_dir, settings=settings)
    eager = Engine(engines.model, refiner_dir=dev_refiner_dir, settings=load_settings({"LORA_DIR": str(engines.loras)}))
    base, refiner = compiled.accelerator.aot, compiled.refiner_accelerator.aot
    assert [record.hit for record in base.records] == [True]
    (built,) = refiner.records
    prompt_width = compiled.refiner.unet.config.cross_attention_dim  # the refiner's: OpenCLIP's alone
    assert not built.hit and built.agreement >= 0.999
    assert built.inputs[2][0] == [2, 77, prompt_width] and built.inputs[4][0] == [2, 5]  # aesthetic score ids
    assert len(list((cache / "aot").glob("*.pt2"))) == 2
    before = refiner.packaged_calls, refiner.eager_calls
    job = {"refiner_inference_steps": 4, "strength": 0.5}
    image = run_engine(compiled, **job)
    assert refiner.packaged_calls - before[0] == 2 and refiner.eager_calls == before[1]  # 4 steps at strength 0.5
    assert np.abs(image - run_engine(eager, **job)).max() <= 2
    assert eager.refiner_accelerator.aot is None  # COMPILE=off: nothing packaged


def test_a_refiner_that_fails_to_compile_serves_eagerly_and_leaves_the_base_compiled(
    engines: SimpleNamespace, dev_refiner_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.generation import acceleration

    def broken_warm_up(*args, **kwargs):
        raise RuntimeError("the refiner's compile failed (simulated)")

    monkeypatch.setattr(acceleration, "_run_dummy_refinement", broken_warm_up)
    engine = Engine(engines.model, refiner_dir=dev_refiner_dir, settings=aot_settings(engines.cache, engines.loras))
    refiner = engine.refiner_accelerator
    assert "simulated" in refiner.report.error and refiner.aot.disabled
    assert engine.accelerator.report.error is None
    base_before = counts(engine)
    plain = run_engine(engine, refiner=False)
    assert counts(engine)[0] - base_before[0] == JOB["num_inference_steps"]  # the base still runs its package
    assert np.abs(plain - run_engine(engines.eager)).max() <= 2
    before = refiner.aot.eager_calls
    run_engine(engine, refiner_inference_steps=4, strength=0.5)
    assert refiner.aot.eager_calls - before == 2 and refiner.aot.packaged_calls == 0
