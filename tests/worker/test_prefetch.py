"""Weight prefetch: reads every weight file of the folders it is given, skips what is missing, never raises."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.settings import load_settings
from worker.__main__ import model_folders
from worker.model.prefetch import start_prefetch

ROOT = Path(__file__).resolve().parents[2]


def test_reads_every_weight_file_of_the_model_and_skips_missing_folders(dev_model_dir: Path, tmp_path: Path) -> None:
    weights = sorted(dev_model_dir.rglob("*.safetensors"))
    assert len(weights) >= 4  # text encoders, UNet, VAE
    prefetch = start_prefetch([dev_model_dir, None, tmp_path / "not-converted-yet"])
    report = prefetch.join(timeout=60)
    assert prefetch.files == weights
    assert report.finished and report.error is None
    assert (report.files, report.bytes) == (len(weights), sum(path.stat().st_size for path in weights))


def test_a_file_it_cannot_read_stops_it_without_raising(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").symlink_to(tmp_path / "gone")
    report = start_prefetch([tmp_path]).join(timeout=60)
    assert not report.finished and report.error and "FileNotFoundError" in report.error


def test_stop_ends_the_reading_early(dev_model_dir: Path) -> None:
    prefetch = start_prefetch([dev_model_dir])
    report = prefetch.stop(timeout=60)
    assert not prefetch._thread.is_alive()
    assert report.bytes <= sum(path.stat().st_size for path in prefetch.files)


def test_the_entry_point_finds_the_folders_without_converting_or_importing_torch(tmp_path: Path) -> None:
    settings = load_settings({"MODEL_DIR": str(tmp_path / "m"), "REFINER_DIR": str(tmp_path / "r")})
    assert model_folders(settings) == [tmp_path / "m", tmp_path / "r"]
    assert model_folders(load_settings({"CHECKPOINT": "https://example.com/a.safetensors"})) == []  # no sha256
    code = (
        "import sys\n"
        "import worker.__main__\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'heavy import before the prefetch'\n"
    )
    run_python(code)


def test_where_sendfile_is_refused_it_reads_the_files_instead(
    dev_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(*args: object) -> int:
        raise OSError(errno.EINVAL, "sendfile not supported here")

    monkeypatch.setattr(os, "sendfile", refused)
    prefetch = start_prefetch([dev_model_dir])
    report = prefetch.join(timeout=60)
    assert report.finished and report.error is None
    assert report.bytes == sum(path.stat().st_size for path in prefetch.files)


def test_compile_aot_does_not_import_torch_before_the_prefetch_starts() -> None:
    """COMPILE=aot has nothing to refuse at the entry point (packages load without a compiler), so torch's import
    happens beside the weight prefetch, as without compile (measured on the H200: it was imported before)."""
    code = (
        "import sys\n"
        "from core.settings import WORKER, load_settings\n"
        "from worker.__main__ import refuse_impossible_compile\n"
        "refuse_impossible_compile(load_settings({'COMPILE': 'aot'}, command=WORKER))\n"
        "assert 'torch' not in sys.modules, 'torch imported before the prefetch'\n"
    )
    run_python(code)


def test_the_start_up_log_counts_from_the_process_start_not_from_its_own_import() -> None:
    # The line bench/cold_start.py reads as the import phase: a process that slept 0.6 s before importing the entry
    # point must report at least that, and not seconds more (psutil's boot time is rounded to the second).
    code = (
        "import time; started = time.perf_counter(); time.sleep(0.6)\n"
        "from worker.__main__ import seconds_since_process_start\n"
        "print(seconds_since_process_start(), time.perf_counter() - started)"
    )
    reported, since_first_line = map(float, run_python(code).split())
    assert since_first_line - 0.02 <= reported < since_first_line + 0.5  # /proc/uptime counts in 10 ms steps


def run_python(code: str) -> str:
    """``code`` in a fresh interpreter from the checkout's root; its standard output (it must exit 0)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
