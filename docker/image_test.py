"""Build the image for real and run a job in it, with buildah and no registry (``nox -s image_test``).

1. a Debian 12 base made with debootstrap and imported into buildah (docker/local_base.sh, cached as a tarball);
2. a build context with the repository's image files, a wheelhouse (every wheel of requirements-lock-cpu.txt, each
   checked against its sha256, and uv) and the dev checkpoints; a fake Hub token is given as the build secret;
3. cache keys: the baked image (the dev checkpoint and refiner converted during the build) is built with
   ``--layers``, as ``nox -s build`` runs buildah; then a comment is appended to worker/handler.py in the context
   and it is rebuilt: the install, compiler, venv-copy and conversion steps must come from the cache, the code's
   steps must not, and the new image must hold the edited file (the layered images are deleted afterwards: vfs
   keeps a full copy of the file system per layer);
4. reproducibility: the baked image is built again from scratch (``--no-cache``) and both file trees are compared
   by content (sha256 of every file, modes, link targets); any difference fails the test and is listed;
5. the "volume" image: no model, no C compiler (``C_COMPILER=0``); its size against the baked one's is the
   compiler's;
6. ``python -u /app/handler.py --test_input ...`` (the image's CMD) runs in the baked image (``buildah run``) and
   must return a PNG; the volume image runs with a folder mounted at /runpod-volume that holds the checkpoint and
   CHECKPOINT set to it: the first start converts it onto the volume, a second start finds it converted;
7. the compile path: in the baked image a C compiler builds a Python extension against Python.h and Python
   imports it (what Triton does for its CUDA launcher); the volume image, built without one, must refuse
   ``COMPILE=unet`` at start-up with a configuration error (exit 2); ``COMPILE=aot`` in the baked image with a
   volume mounted: the first start builds the UNet's AOTInductor package with g++ onto the volume and its job
   runs from it, the second start loads it without building;
8. the fake token must appear nowhere: not in the image's history or config, not in any file of either image.

Sizes, times, cache use, tree differences and the jobs' results go to build/image_test/summary.json; buildah's
storage (vfs: one full copy of the file system per layer) is deleted at the end unless --keep. Needs root,
debootstrap and buildah (Debian: apt-get install buildah debootstrap). Standard library only; the dev checkpoint
is made by the nox session.
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build import build_command  # docker/ is not a package: build.py is imported as a neighbour

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = "localhost/sdxl-worker-test-base:bookworm"
BAKED_IMAGE = "localhost/sdxl-worker:image-test-baked"
VOLUME_IMAGE = "localhost/sdxl-worker:image-test-volume"
LAYERED_IMAGE = "localhost/sdxl-worker:image-test-baked-layers"
EDITED_IMAGE = "localhost/sdxl-worker:image-test-baked-edited"
CONTEXT_ITEMS = ("Dockerfile", ".dockerignore", "requirements.txt", "test_input.json", "handler.py", "core")
CONTEXT_ITEMS += ("model_build", "worker", "batch", "docker")
LOCK = "requirements-lock-cpu.txt"
MIN_FREE_DISK = 6 << 30  # the machine's other users need their disk too
# Steps of the Dockerfile that an edit of the worker's code must not re-run, and the first one it must.
CACHED_AFTER_CODE_EDIT = {
    "install": "install_requirements.sh",
    "compiler": "apt-get install",
    "venv copy": "COPY --from=builder /opt/venv",
    "converter copy": "COPY --from=converter /stage",
    "conversion": "convert_checkpoint.sh",
}
RERUN_AFTER_CODE_EDIT = {"worker copy": "COPY worker/", "app copy": "COPY --from=app /stage /app"}
# What Triton does at run time for its CUDA launcher, without CUDA: a C extension built with the compiler it
# would pick ($CC, else gcc, else clang) against Python.h, then imported.
COMPILE_PROBE = r"""
import os, shutil, subprocess, sys, sysconfig, tempfile
cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
if cc is None:
    sys.exit("no C compiler")
folder = tempfile.mkdtemp()
source = os.path.join(folder, "probe.c")
with open(source, "w") as handle:
    handle.write('#include <Python.h>\n'
                 'static struct PyModuleDef m = {PyModuleDef_HEAD_INIT, "probe", NULL, -1, NULL};\n'
                 'PyMODINIT_FUNC PyInit_probe(void) { return PyModule_Create(&m); }\n')
include = sysconfig.get_paths()["include"]
output = os.path.join(folder, "probe.so")
subprocess.run([cc, source, "-O1", "-shared", "-fPIC", "-I" + include, "-o", output], check=True)
sys.path.insert(0, folder)
import probe
print(f"compiled and imported {probe.__file__} with {cc} against {include}/Python.h")
"""
# worker.generation.compile_prerequisites as the worker runs it on a GPU (cuda=True: a C compiler, Python.h, triton).
WORKER_CHECK = (
    "from worker.generation.compile_prerequisites import find_prerequisites; "
    "print(list(find_prerequisites(cuda=True).missing))"
)
UV_VERSION = "0.13.9"  # the Dockerfile's default UV_VERSION
# A small version of test_input.json: the dev model's images are noise at any size, and the CPU is shared.
JOB = {
    "input": {
        "prompt": "a lighthouse on a cliff at dawn, (dramatic sky:1.2), oil painting",
        "negative_prompt": "blurry, low quality",
        "width": 256,
        "height": 256,
        "num_inference_steps": 4,
        "scheduler": "DPM++ 2M Karras",
        "seed": 42,
    }
}


class ImageTestError(Exception):
    pass


class Buildah:
    """buildah on a private storage folder (vfs: no kernel overlay needed) with chroot isolation."""

    def __init__(self, work: Path, log: Path) -> None:
        self.options = ["--root", str(work / "storage"), "--runroot", str(work / "run"), "--storage-driver", "vfs"]
        self.log = log

    def command(self, *args: str) -> list[str]:
        return ["buildah", *self.options, *args]

    def run(self, *args: str, capture: bool = False, env: dict | None = None) -> str:
        command = self.command(*args)
        with open(self.log, "a") as log:
            log.write(f"\n$ {' '.join(command)}\n")
            log.flush()
            done = subprocess.run(
                command,
                stdout=subprocess.PIPE if capture else log,
                stderr=log,
                text=True,
                env=env,
            )
        if done.returncode != 0:
            raise ImageTestError(f"{' '.join(command[:8])} ... failed (exit {done.returncode}); see {self.log}")
        return done.stdout if capture else ""

    def has_image(self, name: str) -> bool:
        done = subprocess.run(self.command("inspect", "--type", "image", name), capture_output=True)
        return done.returncode == 0


def say(message: str) -> None:
    print(f"[image_test] {message}", flush=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def png_size(data: bytes) -> tuple[int, int]:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ImageTestError("the job's image is not a PNG")
    return struct.unpack(">II", data[16:24])


def make_wheelhouse(wheelhouse: Path, python: str, log: Path) -> None:
    """Every file of the CPU lock (pip checks each against the lock's sha256) and uv: the build has no index."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    download = [python, "-m", "pip", "download", "--quiet", "--dest", str(wheelhouse), "--only-binary", ":all:"]
    with open(log, "a") as out:
        # torch's CPU build: from pip's own configuration if it has it (a local wheel folder), else PyTorch's index.
        locked = [*download, "--no-deps", "--require-hashes", "-r", str(ROOT / LOCK)]
        if subprocess.run(locked, stdout=out, stderr=out).returncode != 0:
            subprocess.run(
                [*locked, "--extra-index-url", "https://download.pytorch.org/whl/cpu"], check=True, stdout=out
            )
        subprocess.run([*download, f"uv=={UV_VERSION}"], check=True, stdout=out, stderr=out)


def make_context(work: Path, wheelhouse: Path, checkpoints: Sequence[Path]) -> Path:
    """The build context: the image's files from this checkout, the wheelhouse and the checkpoint (hard links)."""
    context = work / "context"
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    for item in (*CONTEXT_ITEMS, *(path.name for path in ROOT.glob("requirements-lock-*.txt"))):
        source = ROOT / item
        if source.is_dir():
            shutil.copytree(source, context / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, context / item)
    shutil.copytree(wheelhouse, context / "wheelhouse", copy_function=os.link)
    (context / "checkpoints").mkdir()
    for checkpoint in checkpoints:
        os.link(checkpoint, context / "checkpoints" / checkpoint.name)
    return context


def run_in(buildah: Buildah, image: str, name: str, args: Sequence[str], env: dict[str, str], volume: Path | None):
    """``args`` in a fresh container of ``image``: the finished process and its wall time."""
    subprocess.run(buildah.command("rm", name), capture_output=True)  # a leftover of an earlier run
    buildah.run("from", "--name", name, image)
    for key, value in env.items():
        buildah.run("config", "--env", f"{key}={value}", name)
    mount = ["--volume", f"{volume}:/runpod-volume"] if volume else []
    started = time.perf_counter()
    command = [*buildah.command("run", "--isolation", "chroot", *mount, name, "--"), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    with open(buildah.log, "a") as log:
        log.write(f"\n$ {' '.join(command)}\n{done.stdout}{done.stderr}\n")
    subprocess.run(buildah.command("rm", name), capture_output=True)
    return done, seconds


# The worker's own log lines ("2026-12-03 07:00:00,123 INFO message": logging.basicConfig in worker/__main__.py).
WORKER_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING|ERROR|CRITICAL) ")
# How the worker logs a data URI (worker/__main__.py, shorten_images_in_runpod_logs): its header and length.
SHORTENED_URI = re.compile(r"^data:([\w.+-]+/[\w.+-]+);base64,<([\d,]+) characters>$")


def worker_log(output: str, limit: int = 40) -> list[str]:
    """The worker's own log lines of a run (not RunPod's), each cut to 300 characters."""
    return [line.strip()[:300] for line in output.splitlines() if WORKER_LOG_LINE.match(line.strip())][:limit]


def run_job(buildah: Buildah, image: str, name: str, env: dict[str, str], volume: Path | None) -> dict:
    """The image's CMD with ``--test_input JOB`` in a fresh container of ``image``; the job's output and timings."""
    command = ["python", "-u", "/app/handler.py", "--test_input", json.dumps(JOB)]
    done, seconds = run_in(buildah, image, name, command, env, volume)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise ImageTestError(f"the job in {image} failed (exit {done.returncode}):\n{tail}")
    return {"wall_s": round(seconds, 1), **read_job_result(done.stdout), "log": worker_log(done.stdout + done.stderr)}


def read_job_result(stdout: str) -> dict:
    """The job's image and metadata from ``--test_input``'s "Job result: {...}" log line.

    RunPod's logger keeps the first and last 2,048 characters of a longer line, so the image is checked by
    what survives: the head of the first data URI (PNG signature and IHDR: format and size), the end of the
    last one (the IEND chunk: the PNG is complete), and the seed and metadata, which come last.
    """
    text = stdout.split("Job result: ", 1)[1].split("\nINFO ", 1)[0]
    head, cut, tail = text.partition("\n...TRUNCATED ")
    if not cut:  # short enough to be logged whole
        output = ast.literal_eval(text.strip())["output"]
        shortened = SHORTENED_URI.match(output["images"][0])
        if shortened:  # the worker logs each image as its header and length: the bytes cannot be checked here
            mime, characters = shortened[1], int(shortened[2].replace(",", ""))
            if mime != "image/png" or characters < 100:
                raise ImageTestError(f"the job did not return a PNG: {output['images'][0]}")
            metadata = output.get("metadata", {})
            image = {"mime": mime, "base64_chars": characters, "bytes_about": characters * 3 // 4}
            return {
                "image": image,
                "seed": output["seed"],
                "model": metadata.get("model"),
                "device": metadata.get("device"),
                "refiner": metadata.get("refiner"),
                "speedups": metadata.get("speedups"),
                "timings": metadata.get("timings"),
            }
        data = base64.b64decode(output["images"][0].split(",", 1)[1])
        width, height = png_size(data)
        return {"image": {"format": "png", "size": [width, height], "bytes": len(data), "complete": True}, **output}
    uri_head = head.split("'images': ['", 1)[1]
    mime = uri_head.split(";", 1)[0].removeprefix("data:")
    encoded = uri_head.split(",", 1)[1]
    width, height = png_size(base64.b64decode(encoded[:32]))
    truncated = int(tail.split(" ", 1)[0])
    # A whole base64 string's length is a multiple of 4, so its last 32 characters decode on their own.
    last_uri_end = tail.split("', 'seed': ", 1)[0][-32:]
    ends_with_iend = base64.b64decode(last_uri_end).endswith(b"IEND\xaeB`\x82")
    rest = "{'seed': " + tail.split("', 'seed': ", 1)[1]
    while rest:
        try:
            output = ast.literal_eval(rest)
            break
        except (SyntaxError, ValueError):
            rest = rest[:-1]  # the closing braces of the enclosing dicts
    image = {"mime": mime, "size": [width, height], "png_end_seen": ends_with_iend, "log_chars_cut": truncated}
    if mime != "image/png" or not ends_with_iend:
        raise ImageTestError(f"the job did not return a whole PNG: {image}")
    metadata = output.get("metadata", {})
    return {
        "image": image,
        "seed": output["seed"],
        "model": metadata.get("model"),
        "device": metadata.get("device"),
        "refiner": metadata.get("refiner"),
        "timings": metadata.get("timings"),
    }


def image_size(buildah: Buildah, image: str) -> str:
    """buildah's own figure (uncompressed layers), as it prints it."""
    return buildah.run("images", "--format", "{{.Size}}", image, capture=True).strip()


def folder_sizes(buildah: Buildah, image: str, folders: Sequence[str]) -> dict[str, int]:
    name = "image-test-sizes"
    subprocess.run(buildah.command("rm", name), capture_output=True)
    buildah.run("from", "--name", name, image)
    try:
        # One du per folder: a single du counts a folder inside an earlier argument only once.
        script = 'for folder in "$@"; do du -sbx "$folder"; done'
        out = buildah.run("run", "--isolation", "chroot", name, "--", "sh", "-c", script, "du", *folders, capture=True)
    finally:
        subprocess.run(buildah.command("rm", name), capture_output=True)
    return {path: int(size) for size, path in (line.split("\t") for line in out.strip().splitlines())}


def token_leaks(buildah: Buildah, image: str, token: str) -> list[str]:
    """Where the fake token shows up: the image's config and history, or any file of its file system."""
    found = []
    inspect = buildah.run("inspect", "--type", "image", image, capture=True)
    if token in inspect:
        found.append(f"{image}: buildah inspect (config/history)")
    name = "image-test-secret"
    subprocess.run(buildah.command("rm", name), capture_output=True)
    buildah.run("from", "--name", name, image)
    try:
        root = buildah.run("mount", name, capture=True).strip()
        grep = subprocess.run(["grep", "-rlF", "--", token, root], capture_output=True, text=True)
        found += [f"{image}: file {path.removeprefix(root)}" for path in grep.stdout.splitlines()]
        buildah.run("umount", name)
    finally:
        subprocess.run(buildah.command("rm", name), capture_output=True)
    return found


def build(buildah: Buildah, image: str, build_args: dict, context: Path, token_file: Path, layers: bool) -> dict:
    """One ``buildah build``; its time and, per Dockerfile step, whether it came from the cache."""
    extra = ["--isolation", "chroot", *([] if layers else ["--no-cache"])]
    command = build_command("buildah", image, build_args, context, token_file, extra, cache_layers=layers)
    started = time.perf_counter()
    with open(buildah.log, "a") as log:
        log.write(f"\n$ {' '.join(command)}\n")
    output = buildah.log.with_suffix(".build")
    with open(output, "w") as out:
        process = subprocess.Popen(buildah.command(*command[1:]), stdout=out, stderr=subprocess.STDOUT)
        while process.poll() is None:  # vfs copies the whole file system per layer: stop before the disk is full
            time.sleep(5)
            if shutil.disk_usage(buildah.log.parent).free < MIN_FREE_DISK:
                process.kill()
                process.wait()
                raise ImageTestError(f"building {image}: stopped, less than {MIN_FREE_DISK >> 30} GiB of disk left")
    text = output.read_text(errors="replace")
    with open(buildah.log, "a") as log:
        log.write(text)
    if process.returncode != 0:
        tail = "\n".join(text.strip().splitlines()[-20:])
        raise ImageTestError(f"building {image} failed (exit {process.returncode}):\n{tail}")
    return {"build_s": round(time.perf_counter() - started, 1), "steps": step_cache_use(text)}


def step_cache_use(output: str) -> list[dict]:
    """buildah's "[2/3] STEP 4/9: RUN ..." lines, each with whether "--> Using cache" followed it."""
    steps: list[dict] = []
    for line in output.splitlines():
        if re.match(r"^\[\d+/\d+\] STEP \d+/\d+: ", line) or re.match(r"^STEP \d+/\d+: ", line):
            steps.append({"step": line.split(": ", 1)[1][:160], "cached": False})
        elif line.startswith("--> Using cache") and steps:
            steps[-1]["cached"] = True
    return steps


def check_cache_use(steps: list[dict]) -> list[str]:
    """What a rebuild after a code edit did wrong: a heavy step re-ran, or the code's step came from the cache."""
    problems = []
    for name, marker in CACHED_AFTER_CODE_EDIT.items():
        found = [step for step in steps if marker in step["step"]]
        if not found or not all(step["cached"] for step in found):
            problems.append(f"{name} step ({marker}) {'not found' if not found else 'ran again'}")
    for name, marker in RERUN_AFTER_CODE_EDIT.items():
        found = [step for step in steps if marker in step["step"]]
        if not found or any(step["cached"] for step in found):
            problems.append(f"{name} step ({marker}) {'not found' if not found else 'came from the cache'}")
    return problems


def file_tree(buildah: Buildah, image: str) -> dict[str, str]:
    """Every path of ``image``'s file system: its type, mode and content (sha256, link target)."""
    name = "image-test-tree"
    subprocess.run(buildah.command("rm", name), capture_output=True)
    buildah.run("from", "--name", name, image)
    tree: dict[str, str] = {}
    try:
        root = buildah.run("mount", name, capture=True).strip()
        for folder, folders, files in os.walk(root):
            for entry in (*folders, *files):
                path = os.path.join(folder, entry)
                info = os.lstat(path)
                mode = f"{stat.S_IMODE(info.st_mode):o}"
                if stat.S_ISLNK(info.st_mode):
                    value = f"link {os.readlink(path)}"
                elif stat.S_ISREG(info.st_mode):
                    value = f"file {mode} {sha256_of(Path(path))}"
                elif stat.S_ISDIR(info.st_mode):
                    value = f"dir {mode}"
                else:
                    value = f"other {stat.S_IFMT(info.st_mode):o} {mode}"
                tree[path.removeprefix(root)] = value
        buildah.run("umount", name)
    finally:
        subprocess.run(buildah.command("rm", name), capture_output=True)
    return tree


def compare_trees(first: dict[str, str], second: dict[str, str]) -> dict:
    only_first = sorted(set(first) - set(second))
    only_second = sorted(set(second) - set(first))
    changed = sorted(path for path in set(first) & set(second) if first[path] != second[path])
    return {
        "paths": len(first),
        "identical": not (only_first or only_second or changed),
        "only_in_first": only_first[:50],
        "only_in_second": only_second[:50],
        "differing": changed[:100],
        "counts": {"only_in_first": len(only_first), "only_in_second": len(only_second), "differing": len(changed)},
    }


def check_aot_starts(buildah: Buildah, image: str, volume: Path) -> dict:
    """Two ``COMPILE=aot`` starts on one volume: the first builds the package (g++), the second only loads it."""
    shutil.rmtree(volume, ignore_errors=True)
    volume.mkdir(parents=True)
    env = {"COMPILE": "aot", "WARMUP_SIZES": f"{JOB['input']['width']}x{JOB['input']['height']}"}
    jobs = {}
    for start, verb in (("aot_first_start", "built"), ("aot_second_start", "loaded")):
        job = jobs[start] = run_job(buildah, image, "image-test-aot", env, volume)
        device = job.get("device") or (job.get("metadata") or {}).get("device") or {}
        applied = (device.get("speedups") or {}).get("applied", [])
        if not any(str(item).startswith("compile_unet_aot") for item in applied):
            raise ImageTestError(f"{start}: COMPILE=aot not applied: {device}")
        if not any("AOT package" in line and verb in line for line in job["log"]):
            raise ImageTestError(f"{start}: no 'AOT package ... {verb}' line in the worker's log: {job['log']}")
    packages = sorted(volume.rglob("sdxl-unet-*.pt2"))
    if len(packages) != 1:
        raise ImageTestError(f"expected one AOT package on the volume, found {[str(p) for p in packages]}")
    jobs["aot_first_start"]["package"] = {
        "path": str(packages[0].relative_to(volume)),
        "bytes": packages[0].stat().st_size,
    }
    return jobs


def check_compile_path(buildah: Buildah, with_compiler: str, without_compiler: str) -> dict:
    """The baked image builds and imports a C extension as Triton does; the image without gcc refuses COMPILE."""
    done, _ = run_in(buildah, with_compiler, "image-test-probe", ["python", "-c", COMPILE_PROBE], {}, None)
    if done.returncode != 0:
        raise ImageTestError(f"{with_compiler} cannot build a Python extension: {(done.stdout + done.stderr)[-800:]}")
    # The worker's own start-up check, as it runs on a GPU: only triton may be missing (a CPU build has none; the
    # CUDA locks hold it, tests/test_container_lock.py).
    check = ["sh", "-c", f"cd /app && python -c '{WORKER_CHECK}'"]
    worker_check, _ = run_in(buildah, with_compiler, "image-test-check", check, {}, None)
    missing = worker_check.stdout.strip().splitlines()[-1:] if worker_check.returncode == 0 else ["(check failed)"]
    if missing != ["['the triton package']"]:
        raise ImageTestError(
            f"the worker's compile check in {with_compiler}: {(worker_check.stdout + worker_check.stderr)[-800:]}"
        )
    job = ["python", "-u", "/app/handler.py", "--test_input", json.dumps(JOB)]
    refused, seconds = run_in(buildah, without_compiler, "image-test-refuse", job, {"COMPILE": "unet"}, None)
    message = (refused.stdout + refused.stderr).strip().splitlines()
    if refused.returncode != 2 or not any("cannot work here" in line for line in message):
        raise ImageTestError(f"{without_compiler} with COMPILE=unet did not refuse to start: {message[-5:]}")
    return {
        "probe": done.stdout.strip(),
        "worker_check_missing_on_gpu": missing[0],
        "refused_without_compiler": {
            "exit": refused.returncode,
            "wall_s": round(seconds, 1),
            "message": next(line for line in message if "cannot work here" in line),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nox -s image_test --", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="the dev checkpoint (.safetensors)")
    parser.add_argument("--refiner", type=Path, help="a dev refiner: baked in too, must refine the job")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "image_test")
    parser.add_argument("--python", default=sys.executable, help="a Python whose pip downloads the wheelhouse")
    parser.add_argument("--keep", action="store_true", help="keep buildah's storage (images) afterwards")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not shutil.which("buildah") or not shutil.which("debootstrap"):
        print("error: run as root with buildah and debootstrap installed (apt-get install buildah debootstrap)")
        return 2

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "image_test.log"
    log.write_text("")
    # buildah keeps RUN --mount=type=cache folders (uv's download cache) and its temporary files under TMPDIR
    # (/var/tmp by default): here they stay in the test's folder and go with it.
    os.environ["TMPDIR"] = str(work / "tmp")
    (work / "tmp").mkdir(exist_ok=True)
    buildah = Buildah(work, log)
    summary: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        started = time.perf_counter()
        if not buildah.has_image(BASE_IMAGE):
            say("making the Debian 12 base with debootstrap (cached in build/image_test/base)")
            env = dict(os.environ, BUILDAH_OPTS=" ".join(buildah.options))
            with open(log, "a") as out:
                subprocess.run(
                    ["bash", str(ROOT / "docker" / "local_base.sh"), str(work / "base"), BASE_IMAGE],
                    check=True,
                    env=env,
                    stdout=out,
                    stderr=out,
                )
        summary["base_s"] = round(time.perf_counter() - started, 1)
        say("downloading the wheelhouse (CPU torch)")
        started = time.perf_counter()
        make_wheelhouse(work / "wheelhouse", args.python, log)
        summary["wheelhouse_s"] = round(time.perf_counter() - started, 1)
        checkpoint = args.checkpoint.resolve()
        refiner = args.refiner.resolve() if args.refiner else None
        context = make_context(work, work / "wheelhouse", [checkpoint, *([refiner] if refiner else [])])
        token = f"hf_imagetest{secrets.token_hex(12)}"  # a fake token: it must not end up anywhere in the image
        token_file = work / "hf_token"
        token_file.touch(mode=0o600)
        token_file.write_text(token)
        common = {"BASE_IMAGE": BASE_IMAGE, "CUDA": "cpu", "WHEELHOUSE": "wheelhouse"}
        baked_args = {
            **common,
            "CHECKPOINT": f"checkpoints/{checkpoint.name}",
            "CHECKPOINT_SHA256": sha256_of(checkpoint),
            "CHECKPOINT_DIR": "checkpoints",
            **(
                {"REFINER_CHECKPOINT": f"checkpoints/{refiner.name}", "REFINER_NAME": "sdxl-refiner"} if refiner else {}
            ),
        }
        summary["builds"] = {}
        failures: list[str] = []

        def build_and_measure(image: str, build_args: dict, layers: bool) -> dict:
            say(f"building {image}{' with --layers' if layers else ' from scratch (--no-cache)'} (log: {log})")
            result = build(buildah, image, build_args, context, token_file, layers)
            folders = ["/", "/opt/venv", "/app", *(["/models"] if "CHECKPOINT" in build_args else [])]
            sizes = folder_sizes(buildah, image, folders)
            result = {**result, "image_size": image_size(buildah, image), "du_bytes": sizes}
            summary["builds"][image] = result
            say(f"built {image} in {result['build_s']} s: {result['image_size']}, du {sizes}")
            return result

        # 1. With --layers (as `nox -s build` runs buildah), then again after an edit of the worker's code.
        build_and_measure(LAYERED_IMAGE, baked_args, True)
        first_tree = file_tree(buildah, LAYERED_IMAGE)
        say("cache keys: worker/handler.py edited in the context, baked image rebuilt with --layers")
        marker = f"# image_test: an edit of the worker's code ({secrets.token_hex(4)})\n"
        with open(context / "worker" / "handler.py", "a") as handle:
            handle.write(marker)
        rebuilt = build(buildah, EDITED_IMAGE, baked_args, context, token_file, True)
        problems = check_cache_use(rebuilt["steps"])
        done, _ = run_in(buildah, EDITED_IMAGE, "image-test-edited", ["tail", "-1", "/app/worker/handler.py"], {}, None)
        if done.stdout.strip() != marker.strip():
            problems.append(f"the rebuilt image holds the old worker/handler.py (its last line: {done.stdout!r})")
        ids = [
            buildah.run("inspect", "--type", "image", "--format", "{{.FromImageID}}", image, capture=True).strip()
            for image in (LAYERED_IMAGE, EDITED_IMAGE)
        ]
        if ids[0] == ids[1]:
            problems.append("the rebuilt image is the first build's image (same ID)")
        summary["rebuild_after_code_edit"] = {**rebuilt, "problems": problems}
        say(f"rebuilt in {rebuilt['build_s']} s; {'; '.join(problems) or 'only the code steps ran again'}")
        failures += problems
        with open(context / "worker" / "handler.py") as handle:  # the context as it was, for the builds below
            original = handle.read().removesuffix(marker)
        with open(context / "worker" / "handler.py", "w") as handle:
            handle.write(original)
        # vfs keeps a full copy of the file system per layer: the layered images go before the next builds.
        subprocess.run(buildah.command("rmi", "--force", EDITED_IMAGE, LAYERED_IMAGE), capture_output=True)
        subprocess.run(buildah.command("rmi", "--prune"), capture_output=True)

        # 2. From scratch, the same inputs: must give the same files (the jobs below run in this image).
        build_and_measure(BAKED_IMAGE, baked_args, False)
        say("reproducibility: comparing the file trees of the two baked builds (sha256 of every file)")
        started = time.perf_counter()
        comparison = compare_trees(first_tree, file_tree(buildah, BAKED_IMAGE))
        summary["reproducible"] = {**comparison, "compare_s": round(time.perf_counter() - started, 1)}
        say(f"{comparison['paths']} paths, differences: {comparison['counts']}")
        if not comparison["identical"]:
            failures.append(f"two builds differ: {comparison['counts']}, e.g. {comparison['differing'][:5]}")

        # 3. No model, no compiler.
        build_and_measure(VOLUME_IMAGE, {**common, "C_COMPILER": "0"}, False)
        baked, volume_sizes = summary["builds"][BAKED_IMAGE]["du_bytes"], summary["builds"][VOLUME_IMAGE]["du_bytes"]
        summary["compiler_bytes"] = baked["/"] - baked["/models"] - volume_sizes["/"]
        say(f"gcc, g++ + libc6-dev add {summary['compiler_bytes'] / 1e6:.0f} MB (baked image less /models vs volume)")

        say("compile path: a C extension built against Python.h in the baked image; COMPILE refused without gcc")
        summary["compile_path"] = check_compile_path(buildah, BAKED_IMAGE, VOLUME_IMAGE)
        inspected = json.loads(buildah.run("inspect", "--type", "image", BAKED_IMAGE, capture=True))
        summary["history"] = [entry.get("created_by", "") for entry in inspected["OCIv1"].get("history", [])]
        summary["config_env"] = inspected["OCIv1"]["config"].get("Env", [])

        say("job in the baked image")
        jobs = {"baked": run_job(buildah, BAKED_IMAGE, "image-test-baked", {}, None)}
        if refiner and not (jobs["baked"]["refiner"] or {}).get("used"):
            raise ImageTestError(f"the baked refiner did not refine the job: {jobs['baked']['refiner']}")
        volume = work / "volume"
        shutil.rmtree(volume, ignore_errors=True)
        (volume / "checkpoints").mkdir(parents=True)
        shutil.copy2(checkpoint, volume / "checkpoints" / checkpoint.name)
        env = {"CHECKPOINT": f"/runpod-volume/checkpoints/{checkpoint.name}"}
        say("job in the volume image, first start (converts onto the volume)")
        jobs["volume_first_start"] = run_job(buildah, VOLUME_IMAGE, "image-test-volume", env, volume)
        say("job in the volume image, second start (finds it converted)")
        jobs["volume_second_start"] = run_job(buildah, VOLUME_IMAGE, "image-test-volume", env, volume)
        converted = volume / "models" / "sdxl" / "manifest.json"
        if not converted.is_file():
            raise ImageTestError(f"the volume has no converted model ({converted} is missing)")
        jobs["volume_first_start"]["volume_manifest_source"] = json.loads(converted.read_text())["source"]["name"]
        say(
            "COMPILE=aot in the baked image: the first start builds the UNet package onto the volume, the next loads it"
        )
        jobs.update(check_aot_starts(buildah, BAKED_IMAGE, work / "aot-volume"))
        for name, job in jobs.items():
            say(f"{name}: {job['image']} seed {job['seed']}, {job['wall_s']} s from container start to exit")
        summary["jobs"] = jobs

        leaks = [leak for image in (BAKED_IMAGE, VOLUME_IMAGE) for leak in token_leaks(buildah, image, token)]
        summary["token_leaks"] = leaks
        if leaks:
            raise ImageTestError(f"the build secret leaked into the image: {leaks}")
        say("the build secret appears in no layer, file, config or history entry")
        if failures:
            raise ImageTestError("; ".join(failures))
        summary["result"] = "passed"
        return 0
    except (ImageTestError, subprocess.CalledProcessError) as error:
        summary["result"] = f"failed: {error}"
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        say(f"summary: {work / 'summary.json'}")
        if not args.keep:  # the storage is this test's own (--root): everything in it may go
            subprocess.run(buildah.command("rm", "--all"), capture_output=True)
            subprocess.run(buildah.command("rmi", "--all", "--force"), capture_output=True)
            shutil.rmtree(work / "storage", ignore_errors=True)
            shutil.rmtree(work / "context", ignore_errors=True)
            shutil.rmtree(work / "tmp", ignore_errors=True)
            say("deleted buildah's storage and the build context (--keep keeps them)")


if __name__ == "__main__":
    sys.exit(main())
