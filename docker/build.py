"""Build the worker's image with docker, podman or buildah, whichever is installed (``nox -s build``).

    python docker/build.py [--tag T] [--checkpoint SRC] [--sha256 HEX] [--cuda cu130] [--model-name NAME]
                           [--refiner SRC] [--refiner-sha256 HEX] [--refiner-name NAME] [--platform P]
                           [--base IMAGE] [--hf-token-file FILE] [--tool docker|podman|buildah] [--dry-run]

SRC is a file in the repository (it must lie inside the build context, e.g. checkpoints/NAME.safetensors),
``hf://owner/repo/file@<commit>`` or an https URL (with --sha256). A local file's sha256 is computed here and
passed as CHECKPOINT_SHA256: the converter checks it, and it is the conversion step's cache key (buildah keys a
bind-mounted file by nothing else). A Hub token comes from --hf-token-file or ``HF_TOKEN`` and goes to the build
only as a secret, never as a build argument. Standard library only, so it runs before any virtual environment
exists.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TAG = "sdxl-worker:latest"
TOOLS = ("docker", "podman", "buildah")


class BuildError(Exception):
    """The build cannot start; the message says what to do."""


def _docker_daemon_reachable() -> bool:
    """docker's CLI is often installed without a daemon (as in CI and sandboxes): then it cannot build."""
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def find_tool(requested: str | None = None) -> str:
    """The first usable build tool: docker with a running daemon, else podman, else buildah."""
    if requested:
        if not shutil.which(requested):
            raise BuildError(f"--tool {requested}: {requested} is not installed")
        return requested
    if shutil.which("docker") and _docker_daemon_reachable():
        return "docker"
    for tool in ("podman", "buildah"):
        if shutil.which(tool):
            return tool
    hint = " (docker is installed but its daemon is not running: start it)" if shutil.which("docker") else ""
    raise BuildError(
        f"no container build tool found{hint}: install Docker (https://docs.docker.com/engine/install/), "
        "podman or buildah (Debian/Ubuntu: apt-get install podman), then run again"
    )


def checkpoint_argument(source: str | None, context: Path) -> str:
    """The CHECKPOINT build argument: remote sources as given, a local file relative to the build context."""
    if not source:
        return ""
    if source.startswith(("hf://", "https://", "http://")):
        return source
    path = Path(source).expanduser().resolve()
    if not path.is_file():
        raise BuildError(f"{source}: no such file")
    try:
        relative = path.relative_to(context / "checkpoints").as_posix()
    except ValueError:
        raise BuildError(
            f"{source} is not in {context / 'checkpoints'}/, the one folder of the build context that .dockerignore "
            "lets local checkpoints through: copy (or hard-link) it there and pass that path"
        ) from None
    return f"checkpoints/{relative}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_build_args(prefix: str, source: str | None, sha256: str | None, context: Path) -> dict[str, str]:
    """CHECKPOINT (or REFINER_CHECKPOINT), its sha256 and, for a local file, CHECKPOINT_DIR=checkpoints.

    A local file's sha256 is computed when not given: without it, a different file under the same name would
    find the old conversion in buildah's cache (the mount's contents are not part of buildah's cache key).
    """
    argument = checkpoint_argument(source, context)
    if not argument:
        return {}
    values = {prefix: argument}
    local = argument.startswith("checkpoints/")
    if local:
        values["CHECKPOINT_DIR"] = "checkpoints"
    if sha256 or local:
        values[f"{prefix}_SHA256"] = sha256 or file_sha256(context / argument)
    return values


def build_command(
    tool: str,
    tag: str,
    build_args: dict[str, str],
    context: Path,
    secret_file: Path | None = None,
    extra: Sequence[str] = (),
    cache_layers: bool = True,
    platform: str | None = None,
) -> list[str]:
    """The build command line for ``tool`` (all three take the same flags for what is used here).

    ``cache_layers``: buildah keeps every step as a cached layer only when asked (docker and podman always
    do); without it, each stage is committed once, which on the vfs storage driver saves a full copy of
    the file system per step.
    """
    command = [tool, "build", "--tag", tag, "--file", str(context / "Dockerfile")]
    if tool == "buildah" and cache_layers:
        command[1:2] = ["build", "--layers"]
    if platform:  # e.g. linux/amd64 on an ARM machine (Apple Silicon): RunPod runs amd64 images
        command += ["--platform", platform]
    for name, value in build_args.items():
        command += ["--build-arg", f"{name}={value}"]
    if secret_file is not None:
        command += ["--secret", f"id=hf_token,src={secret_file}"]
    return [*command, *extra, str(context)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nox -s build --", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default=DEFAULT_TAG, help=f"image name (default {DEFAULT_TAG})")
    parser.add_argument("--checkpoint", help="bake this checkpoint in: a file in the repo, hf://...@rev, or https URL")
    parser.add_argument("--sha256", help="expected sha256 of --checkpoint (required for a URL)")
    parser.add_argument("--model-name", default="sdxl", help="folder name under /models (default sdxl)")
    parser.add_argument("--refiner", help="bake an SDXL refiner in too (same forms as --checkpoint)")
    parser.add_argument("--refiner-sha256", help="expected sha256 of --refiner (required for a URL)")
    parser.add_argument("--refiner-name", default="sdxl-refiner", help="its folder under /models (sdxl-refiner)")
    parser.add_argument("--cuda", default="cu130", help="PyTorch CUDA build: cu130 (default, locked), cu128, cu126")
    parser.add_argument("--base", help="base image (default: the Dockerfile's python:3.11 slim bookworm, by digest)")
    parser.add_argument("--platform", help="target platform, e.g. linux/amd64 (needed on ARM machines for RunPod)")
    parser.add_argument("--no-compiler", action="store_true", help="leave gcc out (C_COMPILER=0): COMPILE refused")
    parser.add_argument("--hf-token-file", type=Path, help="file holding a Hub token (default: $HF_TOKEN, if set)")
    parser.add_argument("--tool", choices=TOOLS, help="build tool (default: the first one usable)")
    parser.add_argument("--dry-run", action="store_true", help="print the command of the tool a real run would use")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        for source, pin, flag in (
            (args.checkpoint, args.sha256, "--sha256"),
            (args.refiner, args.refiner_sha256, "--refiner-sha256"),
        ):
            if source and source.startswith(("https://", "http://")) and not pin:
                raise BuildError(f"{source} is a URL: pass {flag} too (sha256sum prints it)")
        build_args = {"CUDA": args.cuda, "MODEL_NAME": args.model_name}
        build_args |= checkpoint_build_args("CHECKPOINT", args.checkpoint, args.sha256, ROOT)
        if args.refiner:
            build_args |= checkpoint_build_args("REFINER_CHECKPOINT", args.refiner, args.refiner_sha256, ROOT)
            build_args["REFINER_NAME"] = args.refiner_name
        if args.base:
            build_args["BASE_IMAGE"] = args.base
        if args.no_compiler:
            build_args["C_COMPILER"] = "0"
        if args.hf_token_file is not None and not args.hf_token_file.is_file():
            raise BuildError(f"--hf-token-file {args.hf_token_file}: no such file")
        # A dry run names the tool a real run would use: the one asked for, else the first usable one.
        tool = args.tool if args.dry_run and args.tool else find_tool(args.tool)
    except BuildError as error:
        if not (args.dry_run and str(error).startswith("no container build tool")):
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"note: {error}; the command a docker build would run:", file=sys.stderr)
        tool = "docker"

    with tempfile.TemporaryDirectory(prefix="sdxl-build-") as scratch:
        secret = args.hf_token_file
        if secret is None and os.environ.get("HF_TOKEN"):
            # The token goes to the build as a secret file readable only by this user, deleted afterwards.
            secret = Path(scratch) / "hf_token"
            secret.touch(mode=0o600)
            secret.write_text(os.environ["HF_TOKEN"])
        command = build_command(tool, args.tag, build_args, ROOT, secret, platform=args.platform)
        print("+", " ".join(command), flush=True)
        if args.dry_run:
            return 0
        env = dict(os.environ, DOCKER_BUILDKIT="1")  # RUN --mount needs BuildKit (docker's default since 23.0)
        return subprocess.run(command, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
