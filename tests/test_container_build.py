"""``nox -s build`` (docker/build.py): the tool it picks, the command it runs, and where a token goes.

The image itself is built and run by the opt-in ``nox -s image_test`` (root, buildah); these checks are fast.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("docker_build", ROOT / "docker" / "build.py")
assert _spec and _spec.loader
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


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


def test_the_hub_files_parse_and_name_only_real_settings() -> None:
    from core.settings import SETTINGS_FIELDS

    hub = json.loads((ROOT / ".runpod" / "hub.json").read_text())
    tests = json.loads((ROOT / ".runpod" / "tests.json").read_text())
    known = {spec.metadata["env"] for spec in SETTINGS_FIELDS} | {"HF_TOKEN"}  # HF_TOKEN: read by huggingface_hub
    assert {entry["key"] for entry in hub["config"]["env"]} <= known
    assert {entry["key"] for entry in tests["config"]["env"]} <= known
    official = next(test for test in tests["tests"] if test["name"] == "official_worker_sample")
    assert official["input"]["scheduler"] == "K_EULER" and official["input"]["high_noise_frac"] == 0.8
