"""Whether ``COMPILE``/``COMPILE_VAE`` can work on this machine: checked once at start-up, before any model loads.

torch.compile writes C code at run time. On a GPU, Triton builds its CUDA launcher as a Python extension with the
compiler it finds the way :func:`find_compiler` does (``$CC``, else gcc, else clang) against Python's headers; on
the CPU, Inductor builds C++ (``$CXX``, else g++, c++, clang++). Without them every compile fails, and the
warm-up would fall back to eager code behind one log line: a 2x engine shipped as a 1x engine. So the worker
refuses to start instead (a configuration error, exit status 2), and says which image or setting fixes it.

Finding a compiler is not enough (gcc without libc6-dev finds no ``stdio.h``): the check also builds one tiny
extension against ``Python.h`` with it, as Triton will (well under a second; nothing is imported).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigurationError

log = logging.getLogger(__name__)

# What Triton (``$CC``, gcc, clang) and Inductor's C++ builder (``$CXX``, g++, c++, clang++) look for, in order.
C_COMPILERS = ("CC", ("gcc", "clang"))
CXX_COMPILERS = ("CXX", ("g++", "c++", "clang++"))
_PROBE = (
    "#include <Python.h>\n"
    'static struct PyModuleDef probe = {PyModuleDef_HEAD_INIT, "probe", NULL, -1, NULL};\n'
    "PyMODINIT_FUNC PyInit_probe(void) { return PyModule_Create(&probe); }\n"
)


@dataclass(frozen=True)
class CompilePrerequisites:
    """The tools a compile needs on this device, and what is missing (empty: it can compile)."""

    device: str  # "cuda" or "cpu"
    compiler: str | None
    headers: Path
    missing: tuple[str, ...]


def speedups_asked(settings: Any) -> list[str]:
    """The settings that compile, as the user wrote them (empty: nothing compiles)."""
    wanted = [f"COMPILE={settings.compile} ({settings.compile_mode})"] if settings.compile != "off" else []
    return wanted + (["COMPILE_VAE=1"] if settings.compile_vae else [])


def find_compiler(variable: str, names: tuple[str, ...], environ: dict[str, str] | None = None) -> str | None:
    """``$variable`` if set (as given: a name on PATH or a path), else the first of ``names`` on PATH."""
    chosen = (os.environ if environ is None else environ).get(variable)
    if chosen:
        return shutil.which(chosen)
    return next(filter(None, map(shutil.which, names)), None)


def probe_build(compiler: str, headers: Path, language: str) -> str | None:
    """Compile and link a one-function Python extension; None when it worked, else the compiler's complaint."""
    with tempfile.TemporaryDirectory(prefix="compile-probe-") as folder:
        source = Path(folder) / ("probe.c" if language == "C" else "probe.cpp")
        source.write_text(_PROBE)
        command = [compiler, str(source), "-shared", "-fPIC", f"-I{headers}", "-o", str(Path(folder) / "probe.so")]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"{type(error).__name__}: {error}"
    if done.returncode == 0:
        return None
    lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
    return lines[0][:200] if lines else f"exit status {done.returncode}"


def find_prerequisites(cuda: bool, cxx: bool = False) -> CompilePrerequisites:
    """What torch.compile needs here; ``cxx``: a C++ compiler whatever the device (AOTInductor's wrapper is C++)."""
    variable, names = C_COMPILERS if cuda and not cxx else CXX_COMPILERS
    language = "C" if cuda and not cxx else "C++"
    compiler = find_compiler(variable, names)
    headers = Path(sysconfig.get_paths()["include"])
    missing = [] if compiler else [f"a {language} compiler (${variable}, or {', '.join(names)} on PATH)"]
    missing += [] if (headers / "Python.h").is_file() else [f"Python's headers ({headers / 'Python.h'})"]
    missing += [] if not cuda or importlib.util.find_spec("triton") else ["the triton package"]
    if not missing and compiler is not None:
        failure = probe_build(compiler, headers, language)
        if failure:
            missing.append(f"a working {language} toolchain ({compiler} cannot build an extension: {failure})")
    return CompilePrerequisites("cuda" if cuda else "cpu", compiler, headers, tuple(missing))


def aot_build_missing(cuda: bool) -> list[str]:
    """What building an AOTInductor package needs and this machine lacks: g++ for its C++ wrapper, and on a GPU
    what Triton needs too (gcc for its launcher, the triton package). Loading a built package needs none of it."""
    checks = [find_prerequisites(cuda, cxx=True), *([find_prerequisites(cuda)] if cuda else [])]
    return list(dict.fromkeys(item for check in checks for item in check.missing))


def check_compile_prerequisites(settings: Any) -> str:
    """Raise a ConfigurationError when ``COMPILE``/``COMPILE_VAE`` cannot work here; log and return what is asked.

    Called by the worker's entry point before the model loads, so a refusal costs seconds, not a 7 GB load.
    """
    wanted = speedups_asked(settings)
    asked = ", ".join(
        [*wanted, f"CHANNELS_LAST={int(settings.channels_last)}", f"VAE_DTYPE={settings.vae_dtype or 'auto'}"]
    )
    if not wanted:
        log.info("speed-ups asked for: %s; nothing is compiled", asked)
        return asked
    import torch  # only when compiling: the check must know which compiler the device's code needs

    if settings.compile == "aot":
        missing = aot_build_missing(torch.cuda.is_available())
        if missing:
            # Loading an AOT package needs no compiler: packages built elsewhere (same torch and GPU) still serve;
            # a missing one stops the warm-up with a configuration error (worker.generation.aot_unet).
            log.warning(
                "COMPILE=aot: %s missing here, so only AOT packages already in the cache folder can be used",
                "; ".join(missing),
            )
        # COMPILE_VAE=1 under aot packages the VAE decoder the same way: no Dynamo, nothing else to check.
        log.info("speed-ups asked for: %s", asked)
        return asked
    found = find_prerequisites(torch.cuda.is_available())
    if found.missing:
        needs = "Triton needs to build its CUDA launcher" if found.device == "cuda" else "Inductor needs for CPU code"
        raise ConfigurationError(
            f"{' and '.join(wanted)} cannot work here: {'; '.join(found.missing)} missing, which {needs} at run "
            "time. Use an image built with the compiler (the default; not --no-compiler), or set COMPILE=off "
            "COMPILE_VAE=0"
        )
    described = f"{asked}; compiler {found.compiler}, Python headers {found.headers}"
    log.info("speed-ups asked for: %s", described)
    return described
