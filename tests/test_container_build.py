"""``nox -s build`` (docker/build.py): the tool it picks, the command it runs, and where a token goes.

The image itself is built and run by the opt-in ``nox -s image_test`` (root, buildah); these checks are fast.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("docker_build", ROOT / "docker" / "build.py")
assert _spec and _spec.loader
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)
sys.modules.setdefault("build", build)  # image_test.py imports its neighbour as ``build``
_spec = importlib.util.spec_from_file_location("docker_image_test", ROOT / "docker" / "image_test.py")
assert _spec and _spec.loader
image_test = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(image_test)
# RunPod's serverless GPU pools (docs.runpod.io/references/gpu-types#gpu-pools), memory in GB.
GPU_POOLS = {"AMPERE_16": 16, "AMPERE_24": 24, "ADA_24": 24, "AMPERE_48": 48, "ADA_48_PRO": 48}
GPU_POOLS |= {"AMPERE_80": 80, "ADA_80_PRO": 80, "HOPPER_141": 141}


def test_no_build_tool_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no docker, podman or buildah
    with pytest.raises(build.BuildError, match=r"no container build tool found.*install Docker.*podman or buildah"):
        build.find_tool()
    with pytest.raises(build.BuildError, match=r"--tool podman: podman is not installed"):
        build.find_tool("podman")


def test_the_build_command_of_each_tool(tmp_path: Path) -> None:
    args = {"CUDA": "cu128", "CHECKPOINT": "checkpoints/x.safetensors"}
    docker = build.build_command("docker", "me/w:1", args, tmp_path, tmp_path / "token")
    assert docker[:2] == ["docker", "build"] and docker[-1] == str(tmp_path)
    assert "--build-arg" in docker and "CHECKPOINT=checkpoints/x.safetensors" in docker
    assert f"id=hf_token,src={tmp_path / 'token'}" in docker
    assert build.build_command("buildah", "t", {}, tmp_path)[:3] == ["buildah", "build", "--layers"]
    assert "--layers" not in build.build_command("buildah", "t", {}, tmp_path, cache_layers=False)


def test_checkpoints_must_be_remote_or_in_the_context_folder(tmp_path: Path) -> None:
    hf = "hf://o/r/m.safetensors@" + "0" * 40
    assert build.checkpoint_argument(hf, tmp_path) == hf
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "m.safetensors").write_bytes(b"x")
    assert build.checkpoint_argument(str(tmp_path / "checkpoints" / "m.safetensors"), tmp_path) == (
        "checkpoints/m.safetensors"
    )
    (tmp_path / "elsewhere.safetensors").write_bytes(b"x")
    with pytest.raises(build.BuildError, match=r"not in .*checkpoints/.*copy \(or hard-link\) it there"):
        build.checkpoint_argument(str(tmp_path / "elsewhere.safetensors"), tmp_path)
    with pytest.raises(build.BuildError, match=r"no such file"):
        build.checkpoint_argument(str(tmp_path / "absent.safetensors"), tmp_path)


def test_a_token_goes_to_the_build_as_a_secret_file_never_on_the_command_line(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_NOT_A_REAL_TOKEN")
    hf = "hf://o/r/m.safetensors@" + "0" * 40
    assert build.main(["--dry-run", "--tool", "podman", "--checkpoint", hf, "--refiner", hf, "--cuda", "cu126"]) == 0
    printed = capsys.readouterr().out
    assert "--secret id=hf_token,src=" in printed and "hf_NOT_A_REAL_TOKEN" not in printed
    assert "CUDA=cu126" in printed and f"REFINER_CHECKPOINT={hf}" in printed and "REFINER_NAME=sdxl-refiner" in printed
    assert build.main(["--dry-run", "--checkpoint", "https://x.org/m.safetensors"]) == 2
    assert "pass --sha256 too" in capsys.readouterr().err


def test_platform_passes_to_every_tool_and_a_dry_run_names_the_tool_a_real_run_would_use(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for tool in build.TOOLS:
        command = build.build_command(tool, "t", {}, tmp_path, platform="linux/amd64")
        assert command[0] == tool and command[command.index("--platform") + 1] == "linux/amd64"
    podman = tmp_path / "podman"  # the only build tool on PATH
    podman.write_text("#!/bin/sh\nexit 1\n")
    podman.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert build.main(["--dry-run", "--platform", "linux/amd64"]) == 0
    assert capsys.readouterr().out.startswith("+ podman build --tag sdxl-worker:latest")
    podman.unlink()
    assert build.main(["--dry-run"]) == 0  # none installed: the docker command, and a note saying so
    printed = capsys.readouterr()
    assert printed.out.startswith("+ docker build") and "no container build tool found" in printed.err


def test_a_local_checkpoint_is_keyed_by_its_sha256_and_mounted_from_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "m.safetensors").write_bytes(b"weights")
    args = build.checkpoint_build_args("CHECKPOINT", str(tmp_path / "checkpoints" / "m.safetensors"), None, tmp_path)
    assert args == {
        "CHECKPOINT": "checkpoints/m.safetensors",
        "CHECKPOINT_DIR": "checkpoints",
        "CHECKPOINT_SHA256": hashlib.sha256(b"weights").hexdigest(),
    }
    hf = "hf://o/r/m.safetensors@" + "0" * 40
    assert build.checkpoint_build_args("REFINER_CHECKPOINT", hf, None, tmp_path) == {"REFINER_CHECKPOINT": hf}


def dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    return [part.strip() for part in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if part.strip()]


def test_the_dockerfile_copies_what_steps_depend_on_and_binds_only_what_their_keys_pin() -> None:
    """buildah keys a bind-mounted file by nothing: a bind of the whole context made rebuilds ship old code."""
    instructions = dockerfile_instructions()
    binds = [re.findall(r"--mount=type=bind,([^ ]+)", line) for line in instructions]
    sources = sorted(option.split("source=")[1].split(",")[0] for found in binds for option in found)
    assert sources == ["${CHECKPOINT_DIR}", "${WHEELHOUSE}"]
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", "\n".join(instructions), flags=re.MULTILINE))
    assert defaults["WHEELHOUSE"] == defaults["CHECKPOINT_DIR"] == "docker/empty"
    assert (ROOT / "docker" / "empty").is_dir() and [p.name for p in (ROOT / "docker" / "empty").iterdir()] == [
        "README.md"
    ]
    copied = [line.split()[1:-1] for line in instructions if line.startswith("COPY ") and "--from" not in line]
    for sources_of_copy in copied:
        for source in sources_of_copy:
            assert list(ROOT.glob(source.rstrip("/"))), f"COPY {source}: not in the repository"
    code = {source for sources_of_copy in copied for source in sources_of_copy}
    assert {"core/", "model_build/", "worker/", "batch/", "handler.py", "requirements-lock-*.txt"} <= code
    install = next(line for line in instructions if "install_requirements.sh" in line and line.startswith("RUN"))
    assert "type=cache" in install and "UV_NO_CACHE" not in "\n".join(instructions)
    base = defaults["BASE_IMAGE"]
    assert re.fullmatch(r"docker\.io/library/python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", base)
    assert not (ROOT / "Dockerfile").read_text().startswith("# syntax=")  # no frontend pulled from a registry
    assert 'CMD ["python", "-u", "/app/handler.py"]' in instructions
    # Only the code's COPY after the conversion: an edit of the worker re-runs that step alone.
    assert instructions[-1] == "COPY --from=app /stage /app" and "convert_checkpoint.sh" in instructions[-2]


def test_dockerignore_lets_every_copied_file_into_the_context() -> None:
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"}
    for needed in ("core", "model_build", "worker", "batch", "docker", "handler.py", "requirements-lock-*.txt"):
        assert needed in allowed


def test_the_root_handler_is_a_thin_entry_to_the_same_worker() -> None:
    """RunPod's Hub looks for handler.py at the root; it must start what ``python -m worker`` starts, nothing else
    (the COMPILE check lives in worker.__main__.main: tests/worker/test_compile_prerequisites.py runs both)."""
    tree = ast.parse((ROOT / "handler.py").read_text())
    imports = [(node.module, [a.name for a in node.names]) for node in tree.body if isinstance(node, ast.ImportFrom)]
    assert imports == [("worker.__main__", ["main"])]
    main_block = next(node for node in tree.body if isinstance(node, ast.If))
    assert [ast.unparse(node) for node in main_block.body] == ["main()"]


def test_image_test_reads_cache_use_worker_logs_and_shortened_results() -> None:
    output = "\n".join(
        [
            "[1/4] STEP 3/3: RUN --mount=type=cache,target=/root/.cache/uv sh /build/install_requirements.sh /build",
            "--> Using cache 4ec6726f4a4e5c8b015f2a5f677dd54b98f86a6ebde53dd745aa9cce5c0ee1bc",
            "[3/4] STEP 2/4: COPY worker/ /stage/worker/",
            "--> 6675b5723ae",
        ]
    )
    steps = image_test.step_cache_use(output)
    assert [step["cached"] for step in steps] == [True, False]
    problems = image_test.check_cache_use(steps)
    assert "install step (install_requirements.sh) ran again" not in problems
    assert "conversion step (convert_checkpoint.sh) not found" in problems
    log = "2026-12-03 07:00:00,123 INFO loaded sdxl in 2.1 s\n--- Starting Serverless Worker |  Version 1.12.0 ---"
    assert image_test.worker_log(log) == ["2026-12-03 07:00:00,123 INFO loaded sdxl in 2.1 s"]
    line = "{'output': {'images': ['data:image/png;base64,<15,092 characters>'], 'image_url': 'x', 'seed': 42, "
    line += "'metadata': {'model': 'sdxl', 'device': 'cpu', 'refiner': {'used': True}}}}"
    result = image_test.read_job_result(f"INFO   | Job result: {line}\nINFO   | Local testing complete, exiting.\n")
    assert result["image"] == {"mime": "image/png", "base64_chars": 15092, "bytes_about": 11319}
    assert result["seed"] == 42 and result["refiner"] == {"used": True}


def test_the_hub_files_parse_and_name_only_real_settings() -> None:
    from core.settings import SETTINGS_FIELDS

    hub = json.loads((ROOT / ".runpod" / "hub.json").read_text())
    tests = json.loads((ROOT / ".runpod" / "tests.json").read_text())
    known = {spec.metadata["env"] for spec in SETTINGS_FIELDS} | {"HF_TOKEN"}  # HF_TOKEN: read by huggingface_hub
    assert {entry["key"] for entry in hub["config"]["env"]} <= known
    assert {entry["key"] for entry in tests["config"]["env"]} <= known
    official = next(test for test in tests["tests"] if test["name"] == "official_worker_sample")
    assert official["input"]["scheduler"] == "K_EULER" and official["input"]["high_noise_frac"] == 0.8


def test_hub_pools_include_the_80_gb_cards_and_tests_allow_a_first_start() -> None:
    hub = json.loads((ROOT / ".runpod" / "hub.json").read_text())
    tests = json.loads((ROOT / ".runpod" / "tests.json").read_text())
    pools = hub["config"]["gpuIds"].split(",")
    assert set(pools) <= set(GPU_POOLS) and {"AMPERE_80", "ADA_80_PRO", "HOPPER_141"} <= set(pools)
    assert min(GPU_POOLS[pool] for pool in pools) >= 24  # SDXL fp16 with the refiner: more than 16 GB
    # A Hub test worker has no volume and no baked model: image pull, a 6.9 GB download and a ~60 s conversion
    # come before the first job. 20 minutes each, as each test may land on a fresh worker.
    assert all(test["timeout"] >= 20 * 60 * 1000 for test in tests["tests"])
    assert (ROOT / "handler.py").is_file() and (ROOT / "Dockerfile").is_file() and (ROOT / "README.md").is_file()


def test_the_hub_asks_for_drivers_that_run_the_default_cuda_build() -> None:
    """The Hub builds the Dockerfile's defaults: its hosts must have a driver for that CUDA build (a 12.x driver
    cannot load CUDA 13 libraries), and the README must say which driver that is."""
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", "\n".join(dockerfile_instructions()), flags=re.MULTILINE))
    cuda = defaults["CUDA"]
    assert re.fullmatch(r"cu1\d\d", cuda) and (ROOT / f"requirements-lock-{cuda}.txt").is_file()  # locked, hashed
    major, minor = int(cuda[2:-1]), int(cuda[-1])
    for name in ("hub.json", "tests.json"):
        config = json.loads((ROOT / ".runpod" / name).read_text())["config"]
        versions = [tuple(map(int, version.split("."))) for version in config["allowedCudaVersions"]]
        assert versions and min(versions) >= (major, minor), name
    assert build._parser().parse_args([]).cuda == cuda  # nox -s build's default is the Dockerfile's
    deploy = (ROOT / "README.md").read_text().split("## 4. Deploy", 1)[1].split("\n## ", 1)[0]
    # NVIDIA's table of CUDA toolkits and the Linux drivers they need (the release notes, Table 3), GA releases.
    driver = {"cu126": "560.28.03", "cu128": "570.26", "cu130": "580.65.06"}[cuda]
    assert f"CUDA {major}.{minor}" in deploy and f"driver ≥ {driver}" in deploy
