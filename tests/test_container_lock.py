"""The image's locks (requirements-lock-<build>.txt, written by ``nox -s lock``) against requirements.txt.

Fast and offline: whether the locks are still what uv would resolve today is ``nox -s lock -- --check`` (network).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCKS = sorted(ROOT.glob("requirements-lock-*.txt"))
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(text: str) -> dict[str, str]:
    return {normalize(m[1]): m[2] for line in text.splitlines() if (m := PIN.match(line.strip()))}


def locked_entries(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes): each entry is a pin line followed by its ``--hash=`` continuation lines."""
    entries: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        if match := PIN.match(line):
            current = normalize(match[1])
            entries[current] = (match[2], [])
        elif line.strip().startswith("--hash=") and current is not None:
            entries[current][1].append(line.strip().removeprefix("--hash=").rstrip(" \\"))
    return entries


def test_the_cpu_and_cu130_builds_are_locked() -> None:
    assert {path.name for path in LOCKS} >= {"requirements-lock-cpu.txt", "requirements-lock-cu130.txt"}


@pytest.mark.parametrize("lock", LOCKS, ids=lambda path: path.name)
def test_a_lock_pins_requirements_txt_and_hashes_every_file(lock: Path) -> None:
    build = lock.stem.removeprefix("requirements-lock-")
    wanted = pins((ROOT / "requirements.txt").read_text())
    entries = locked_entries(lock)
    for name, version in wanted.items():
        if name == "torch" and build != "cu130":  # cu130: PyPI's own torch, which is the CUDA 13.0 build
            version = f"{version}+{build}"
        assert entries.get(name, ("absent",))[0] == version, f"{lock.name}: {name} is not {version}"
    assert len(entries) > len(wanted)  # the whole closure, not only the direct requirements
    for name, (_, hashes) in entries.items():
        assert hashes, f"{lock.name}: {name} has no hash"
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", digest) for digest in hashes), name
    assert f"CUDA={build}," in lock.read_text().splitlines()[0]


def test_cu130_lock_holds_pypis_cuda_13_wheels_and_cpu_none() -> None:
    cu130 = locked_entries(ROOT / "requirements-lock-cu130.txt")
    cpu = locked_entries(ROOT / "requirements-lock-cpu.txt")
    assert cu130["cuda-toolkit"][0].startswith("13.0.") and "nvidia-cudnn-cu13" in cu130 and "triton" in cu130
    assert not [name for name in cpu if name.startswith(("nvidia-", "cuda-"))]
    shared = set(cpu) & set(cu130)  # everything that is not CUDA: the same versions in both builds
    assert {name: cpu[name][0] for name in shared - {"torch"}} == {name: cu130[name][0] for name in shared - {"torch"}}


def test_unlocked_builds_are_held_to_the_cu130_versions_except_torch_and_its_cuda_wheels(tmp_path: Path) -> None:
    """The constraints install_requirements.sh derives for cu126/cu128, by running its own two lines."""
    script = (ROOT / "docker" / "install_requirements.sh").read_text()
    start = script.index("  sed -n 's/^")
    derive = script[start : script.index(">/tmp/constraints.txt", start)].replace('"$src/', f'"{ROOT}/')
    done = subprocess.run(["sh", "-c", derive], capture_output=True, text=True, check=True)
    constraints = pins(done.stdout)
    cu130 = locked_entries(ROOT / "requirements-lock-cu130.txt")
    assert "torch" not in constraints and "triton" not in constraints
    assert not [name for name in constraints if name.startswith(("nvidia-", "cuda-"))]
    assert constraints["diffusers"] == pins((ROOT / "requirements.txt").read_text())["diffusers"]
    assert len(constraints) == len(
        [n for n in cu130 if n not in ("torch", "triton") and not n.startswith(("nvidia-", "cuda-"))]
    )
