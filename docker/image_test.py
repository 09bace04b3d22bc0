"""Build the image for real and run a job in it, with buildah and no registry (``nox -s image_test``).

1. a Debian 12 base made with debootstrap and imported into buildah (docker/local_base.sh, cached as a tarball);
2. a build context with the repository's image files, a wheelhouse (every wheel of requirements.txt, torch's CPU
   build, uv) and the dev checkpoint; a fake Hub token is given as the build secret;
3. the image is built twice with the repository's Dockerfile, CUDA=cpu, offline from the wheelhouse: "baked"
   (CHECKPOINT=the dev checkpoint, converted during the build) and "volume" (no model);
4. ``python -u -m worker --test_input ...`` runs in the baked image (``buildah run``) and must return a PNG;
5. the volume image runs with a folder mounted at /runpod-volume that holds the checkpoint and CHECKPOINT set to
   it: the first start converts it onto the volume, a second start finds it converted; both must return a PNG;
6. the fake token must appear nowhere: not in the image's history or config, not in any file of either image.

Sizes, times and both jobs' results go to build/image_test/summary.json; buildah's storage (vfs: one full copy of
the file system per layer) is deleted at the end unless --keep. Needs root, debootstrap and buildah (Debian:
apt-get install buildah debootstrap). Standard library only; the dev checkpoint is made by the nox session.
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import json
import os
import secrets
import shutil
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
CONTEXT_ITEMS = ("Dockerfile", ".dockerignore", "requirements.txt", "test_input.json", "core", "model_build")
CONTEXT_ITEMS += ("worker", "batch", "docker")
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
    """Every wheel the image installs (CPU torch), downloaded here because the build has no index to reach."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    requirements = (ROOT / "requirements.txt").read_text()
    torch_pin = next(line.split()[0] for line in requirements.splitlines() if line.startswith("torch=="))
    download = [python, "-m", "pip", "download", "--quiet", "--dest", str(wheelhouse), "--only-binary", ":all:"]
    with open(log, "a") as out:
        # torch's CPU build: from pip's own configuration if it has it (a local wheel folder), else PyTorch's index.
        cpu = [*download, "--no-deps", f"{torch_pin}+cpu"]
        if subprocess.run(cpu, stdout=out, stderr=out).returncode != 0:
            subprocess.run([*cpu, "--extra-index-url", "https://download.pytorch.org/whl/cpu"], check=True, stdout=out)
        subprocess.run(
            [*download, "-r", str(ROOT / "requirements.txt"), f"{torch_pin}+cpu", f"uv=={UV_VERSION}"],
            check=True,
            stdout=out,
            stderr=out,
        )


def make_context(work: Path, wheelhouse: Path, checkpoints: Sequence[Path]) -> Path:
    """The build context: the image's files from this checkout, the wheelhouse and the checkpoint (hard links)."""
    context = work / "context"
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    for item in CONTEXT_ITEMS:
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


def run_job(buildah: Buildah, image: str, name: str, env: dict[str, str], volume: Path | None) -> dict:
    """``python -u -m worker --test_input JOB`` in a fresh container of ``image``; the job's output and timings."""
    subprocess.run(buildah.command("rm", name), capture_output=True)  # a leftover of an earlier run
    buildah.run("from", "--name", name, image)
    for key, value in env.items():
        buildah.run("config", "--env", f"{key}={value}", name)
    mount = ["--volume", f"{volume}:/runpod-volume"] if volume else []
    started = time.perf_counter()
    command = buildah.command("run", "--isolation", "chroot", *mount, name, "--")
    command += ["python", "-u", "-m", "worker", "--test_input", json.dumps(JOB)]
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    with open(buildah.log, "a") as log:
        log.write(f"\n$ {' '.join(command)}\n{done.stdout}{done.stderr}\n")
    subprocess.run(buildah.command("rm", name), capture_output=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise ImageTestError(f"the job in {image} failed (exit {done.returncode}):\n{tail}")
    wanted = ("loaded ", "converted ", "is converted from", "no network volume", "waiting")
    lines = (done.stdout + done.stderr).splitlines()
    log_lines = [line.strip()[:300] for line in lines if ".py " in line and any(word in line for word in wanted)]
    return {"wall_s": round(seconds, 1), **read_job_result(done.stdout), "log": log_lines}


def read_job_result(stdout: str) -> dict:
    """The job's image and metadata from ``--test_input``'s "Job result: {...}" log line.

    RunPod's logger keeps the first and last 2,048 characters of a longer line, so the image is checked by
    what survives: the head of the first data URI (PNG signature and IHDR: format and size), the end of the
    last one (the IEND chunk: the PNG is complete), and the seed and metadata, which come last.
    """
    text = stdout.split("Job result: ", 1)[1].split("\nINFO ", 1)[0]
    head, cut, tail = text.partition("\n...TRUNCATED ")
    if not cut:  # short enough to be logged whole
        output = ast.literal_eval(text)["output"]
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
        builds = {
            BAKED_IMAGE: {
                **common,
                "CHECKPOINT": f"checkpoints/{checkpoint.name}",
                "CHECKPOINT_SHA256": sha256_of(checkpoint),
                **(
                    {"REFINER_CHECKPOINT": f"checkpoints/{refiner.name}", "REFINER_NAME": "sdxl-refiner"}
                    if refiner
                    else {}
                ),
            },
            VOLUME_IMAGE: common,
        }
        summary["builds"] = {}
        for image, build_args in builds.items():
            say(f"building {image} (log: {log})")
            started = time.perf_counter()
            extra = ["--isolation", "chroot"]
            command = build_command("buildah", image, build_args, context, token_file, extra, cache_layers=False)
            buildah.run(*command[1:])
            seconds = round(time.perf_counter() - started, 1)
            folders = ["/", "/opt/venv", "/app", *(["/models"] if image == BAKED_IMAGE else [])]
            sizes = folder_sizes(buildah, image, folders)
            summary["builds"][image] = {"build_s": seconds, "image_size": image_size(buildah, image), "du_bytes": sizes}
            say(f"built {image} in {seconds} s: {summary['builds'][image]['image_size']}, du {sizes}")
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
        for name, job in jobs.items():
            say(f"{name}: {job['image']} seed {job['seed']}, {job['wall_s']} s from container start to exit")
        summary["jobs"] = jobs

        leaks = [leak for image in builds for leak in token_leaks(buildah, image, token)]
        summary["token_leaks"] = leaks
        if leaks:
            raise ImageTestError(f"the build secret leaked into the image: {leaks}")
        say("the build secret appears in no layer, file, config or history entry")
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
            say("deleted buildah's storage and the build context (--keep keeps them)")


if __name__ == "__main__":
    sys.exit(main())
