"""COMPILE where it cannot work is a start-up error (worker.generation.compile_prerequisites), not an eager worker.

The image's side (gcc and Python.h in the runtime stage, a refusal in an image built without them) is checked by
``nox -s image_test``; here the check itself, against this machine's own compiler and against fake ones.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from core.errors import ConfigurationError
from core.settings import WORKER, load_settings
from worker.generation.compile_prerequisites import (
    C_COMPILERS,
    CXX_COMPILERS,
    check_compile_prerequisites,
    find_compiler,
    probe_build,
)

ROOT = Path(__file__).resolve().parents[2]
HEADERS = Path(sysconfig.get_paths()["include"])
# The compiler this machine's code would need: C for Triton's launcher on a GPU, C++ for Inductor on the CPU.
VARIABLE, NAMES = C_COMPILERS if torch.cuda.is_available() else CXX_COMPILERS
LANGUAGE = "C" if torch.cuda.is_available() else "C++"


def fake_compiler(folder: Path, name: str, script: str) -> Path:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def bare_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """PATH holds one empty folder (no compiler), CC and CXX unset."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", str(folder))
    for name in ("CC", "CXX"):
        monkeypatch.delenv(name, raising=False)
    return folder


def test_the_compiler_is_found_the_way_triton_and_inductor_look_for_it(bare_path: Path) -> None:
    gcc, clang = fake_compiler(bare_path, "gcc", "exit 0"), fake_compiler(bare_path, "clang", "exit 0")
    assert find_compiler("CC", ("gcc", "clang"), {}) == str(gcc)  # gcc before clang, as Triton
    gcc.unlink()
    assert find_compiler("CC", ("gcc", "clang"), {}) == str(clang)
    assert find_compiler("CC", ("gcc", "clang"), {"CC": "clang"}) == str(clang)
    assert find_compiler("CC", ("gcc", "clang"), {"CC": str(clang)}) == str(clang)  # a path, as given
    assert find_compiler("CC", ("gcc", "clang"), {"CC": "tcc"}) is None  # $CC wins even when it is missing


def test_compile_without_a_compiler_is_a_start_up_error(bare_path: Path) -> None:
    settings = load_settings({"COMPILE": "regional"}, command=WORKER)
    with pytest.raises(ConfigurationError, match=rf"COMPILE=regional .*cannot work here: a {re.escape(LANGUAGE)} comp"):
        check_compile_prerequisites(settings)
    with pytest.raises(ConfigurationError, match=r"COMPILE_VAE=1 cannot work here.*set COMPILE=off COMPILE_VAE=0"):
        check_compile_prerequisites(load_settings({"COMPILE_VAE": "1"}, command=WORKER))
    assert check_compile_prerequisites(load_settings({"COMPILE": "off"}, command=WORKER)).startswith("CHANNELS_LAST=")


def test_a_compiler_that_cannot_build_an_extension_is_refused(bare_path: Path) -> None:
    """gcc without libc6-dev: found on PATH, but every build fails; the message carries the compiler's line."""
    complaint = "probe.c:1:10: fatal error: stdio.h: No such file or directory"
    fake_compiler(bare_path, NAMES[0], f"echo '{complaint}' >&2; exit 1")
    settings = load_settings({"COMPILE": "unet"}, command=WORKER)
    with pytest.raises(ConfigurationError, match=r"cannot build an extension: probe.c:1:10: fatal error: stdio.h"):
        check_compile_prerequisites(settings)
    fake_compiler(bare_path, NAMES[0], "exit 0")
    assert f"compiler {bare_path / NAMES[0]}" in check_compile_prerequisites(settings)


@pytest.mark.skipif(not (HEADERS / "Python.h").is_file(), reason="this Python has no headers")
def test_the_probe_builds_a_real_extension_with_this_machines_compiler() -> None:
    compiler = find_compiler(VARIABLE, NAMES)
    if compiler is None:
        pytest.skip(f"no {LANGUAGE} compiler on this machine")
    assert probe_build(compiler, HEADERS, LANGUAGE) is None
    assert probe_build(compiler, HEADERS / "absent", LANGUAGE) is not None  # no Python.h: the build must fail


def test_the_worker_exits_2_before_loading_anything(tmp_path: Path) -> None:
    """``python -m worker`` (and the root handler.py, the image's CMD) with COMPILE and no compiler."""
    bare = tmp_path / "bin"
    bare.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("CC", "CXX")}
    env |= {"PATH": str(bare), "COMPILE": "unet", "MODEL_DIR": str(tmp_path / "no-model"), "HF_HUB_OFFLINE": "1"}
    for entry in (["-m", "worker"], [str(ROOT / "handler.py")]):
        done = subprocess.run(
            [sys.executable, *entry, "--test_input", '{"input": {"prompt": "x"}}'],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 2, done.stderr[-1500:]
        assert "COMPILE=unet (default) cannot work here" in done.stderr
        assert "no-model" not in done.stdout + done.stderr  # refused before the model folder was looked at
    assert shutil.which(NAMES[0], path=str(bare)) is None
