"""Which model folder the worker serves, and network-volume mode: download, convert once, failures leave nothing.

The "volume" is a temporary folder passed as ``volume=``; the checkpoint is the dev model, served over
HTTP by a real server on the loopback interface (the converter allows plain http only there).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from core.errors import ConfigurationError, ModelMissing
from core.settings import load_settings
from model_build.manifest import read_manifest, verify
from worker.model import location as model_location
from worker.model.location import (
    apply_volume_caches,
    plan_model,
    prepare_model_dir,
    resolve_model_dir,
    source_model_name,
)

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Server(ThreadingHTTPServer):
    data: bytes
    cut_first_response_at: int | None  # send only this many bytes of the first response, then hang up
    ranges: list[str | None]  # the Range header of each GET


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        data, server = self.server.data, self.server
        asked = self.headers.get("Range")
        server.ranges.append(asked)
        start = int(asked.removeprefix("bytes=").split("-")[0]) if asked else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if server.cut_first_response_at is not None:
            body, server.cut_first_response_at = body[: server.cut_first_response_at], None
        self.wfile.write(body)


@pytest.fixture
def server(dev_checkpoint: Path) -> Iterator[_Server]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.data, httpd.cut_first_response_at, httpd.ranges = dev_checkpoint.read_bytes(), None, []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    folder = tmp_path / "runpod-volume"
    folder.mkdir()
    return folder


def checkpoint_url(server: _Server) -> str:
    # The query string stands for a download token: it must reach neither the manifest nor a message.
    return f"http://127.0.0.1:{server.server_address[1]}/files/sdxl-dev.safetensors?token=SECRET"


def settings(**env: str):
    return load_settings(env)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- which folder ---


def test_model_dir_wins_then_the_volume_then_the_baked_folder(tmp_path: Path, volume: Path) -> None:
    baked = tmp_path / "models"
    assert resolve_model_dir(settings(MODEL_DIR=str(tmp_path / "m")), volume, baked) == tmp_path / "m"
    assert resolve_model_dir(settings(), volume, baked) == baked / "sdxl"
    assert resolve_model_dir(settings(MODEL_NAME="base"), volume, baked) == baked / "base"
    (volume / "models" / "base").mkdir(parents=True)
    assert resolve_model_dir(settings(MODEL_NAME="base"), volume, baked) == volume / "models" / "base"


def test_a_checkpoint_names_its_folder_on_the_volume(volume: Path) -> None:
    plan = plan_model(settings(CHECKPOINT_PATH=str(volume / "ckpt" / "my-model.safetensors")), volume)
    assert plan.model_dir == volume / "models" / "my-model"
    hf = f"hf://owner/repo/unet/sd_xl_base_1.0.safetensors@{COMMIT}"
    assert plan_model(settings(CHECKPOINT=hf), volume).model_dir == volume / "models" / "sd_xl_base_1.0"
    assert plan_model(settings(CHECKPOINT=hf, MODEL_NAME="base"), volume).model_dir == volume / "models" / "base"
    url = "https://x.org/a/My%20Model.safetensors?sig=1"
    plan = plan_model(settings(CHECKPOINT=url, CHECKPOINT_SHA256="0" * 64), volume)
    assert source_model_name(plan.source or "") == "My_Model"
    assert plan.cache_dir is not None and plan.sha256 == "0" * 64


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CHECKPOINT": "https://x.org/m.safetensors?token=SECRET"}, r"without CHECKPOINT_SHA256.*sha256sum"),
        ({"CHECKPOINT_SHA256": "0" * 64}, r"CHECKPOINT is not"),
        ({"CHECKPOINT": "/runpod-volume/a.safetensors", "CHECKPOINT_PATH": "/b.safetensors"}, r"different"),
        ({"CHECKPOINT_PREDICTION_TYPE": "v_prediction"}, r"CHECKPOINT, which is not set"),
        (
            {
                "CHECKPOINT": "/v/a.safetensors",
                "CHECKPOINT_PREDICTION_TYPE": "epsilon",
                "CHECKPOINT_ZERO_TERMINAL_SNR": "1",
            },
            r"needs a v-prediction model.*CHECKPOINT_PREDICTION_TYPE=v_prediction",
        ),
    ],
)
def test_settings_that_cannot_work_are_configuration_errors(env: dict, message: str, volume: Path) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        plan_model(settings(**env), volume)
    assert "SECRET" not in str(caught.value)


def test_without_a_volume_a_url_is_converted_on_the_containers_disk_and_the_download_dropped(
    server: _Server, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    baked, downloads = tmp_path / "models", tmp_path / "tmp" / "model_build"
    monkeypatch.setattr(model_location, "TEMP_DOWNLOADS", downloads)  # the container's /tmp, here a test folder
    env = settings(CHECKPOINT=checkpoint_url(server), CHECKPOINT_SHA256=sha256(server.data))
    plan = plan_model(env, tmp_path / "no-volume", baked)
    assert plan.model_dir == baked / "sdxl-dev" and plan.cache_dir == downloads and not plan.keep_download
    with caplog.at_level("WARNING", logger="worker.model.location"):
        assert prepare_model_dir(env, tmp_path / "no-volume", baked) == plan.model_dir
    assert "no network volume" in caplog.text and "every new worker downloads and converts it again" in caplog.text
    verify(plan.model_dir, full=True)
    assert not downloads.exists(), "the download is deleted once converted"


def test_the_caches_go_to_the_volume_unless_set(tmp_path: Path, volume: Path) -> None:
    environ = {"HF_HOME": "/mine"}
    applied = apply_volume_caches(environ, volume)
    assert environ["HF_HOME"] == "/mine" and "HF_HOME" not in applied
    assert environ["TORCHINDUCTOR_CACHE_DIR"] == str(volume / "cache" / "torchinductor")
    assert environ["TRITON_CACHE_DIR"] == str(volume / "cache" / "triton")
    untouched: dict[str, str] = {}
    assert apply_volume_caches(untouched, tmp_path / "no-volume") == {} and untouched == {}


# --- a checkpoint on the volume, converted on the first start ---


def test_checkpoint_on_the_volume_is_converted_on_first_start_once(dev_checkpoint: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / "dev"
    env = settings(CHECKPOINT_PATH=str(dev_checkpoint), MODEL_DIR=str(model_dir))
    assert prepare_model_dir(env, tmp_path / "no-volume") == model_dir
    assert verify(model_dir, full=True).dev_model
    before = (model_dir / "manifest.json").stat().st_mtime_ns
    assert prepare_model_dir(env, tmp_path / "no-volume") == model_dir  # the second start finds it done
    assert (model_dir / "manifest.json").stat().st_mtime_ns == before


def test_checkpoint_prediction_settings_convert_it_as_v_prediction_and_a_change_converts_again(
    dev_checkpoint: Path, tmp_path: Path
) -> None:
    """A v-prediction checkpoint without marker keys, served by CHECKPOINT: the settings are the converter's
    --prediction-type / --zero-terminal-snr, recorded in the manifest and the scheduler config."""
    model_dir = tmp_path / "models" / "dev"
    vpred = settings(
        CHECKPOINT_PATH=str(dev_checkpoint),
        MODEL_DIR=str(model_dir),
        CHECKPOINT_PREDICTION_TYPE="v_prediction",
        CHECKPOINT_ZERO_TERMINAL_SNR="1",
    )
    prepare_model_dir(vpred, tmp_path / "no-volume")
    scheduler = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    prediction = read_manifest(model_dir).effective_prediction
    assert (prediction.prediction_type, prediction.zero_terminal_snr, prediction.decided_by) == (
        "v_prediction",
        True,
        "option",
    )
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"] is True
    before = (model_dir / "manifest.json").stat().st_mtime_ns
    prepare_model_dir(vpred, tmp_path / "no-volume")  # the same settings: nothing to do
    assert (model_dir / "manifest.json").stat().st_mtime_ns == before
    # Unset, what the folder records stands (the file carries no markers; nothing says epsilon now).
    prepare_model_dir(settings(CHECKPOINT_PATH=str(dev_checkpoint), MODEL_DIR=str(model_dir)), tmp_path / "v")
    assert (model_dir / "manifest.json").stat().st_mtime_ns == before
    epsilon = settings(
        CHECKPOINT_PATH=str(dev_checkpoint), MODEL_DIR=str(model_dir), CHECKPOINT_PREDICTION_TYPE="epsilon"
    )
    prepare_model_dir(epsilon, tmp_path / "no-volume")  # asked otherwise: converted again
    assert read_manifest(model_dir).effective_prediction.prediction_type == "epsilon"
    scheduler = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler.get("prediction_type", "epsilon") == "epsilon"


def test_a_missing_volume_checkpoint_is_named(volume: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"absent.safetensors: no such file. Copy the checkpoint there"):
        prepare_model_dir(settings(CHECKPOINT=str(volume / "absent.safetensors")), volume)
    assert not (volume / "models" / "absent").exists()


# --- a URL: downloaded to the volume, converted once, served offline afterwards ---


def test_a_url_is_downloaded_to_the_volume_converted_and_then_served_offline(server: _Server, volume: Path) -> None:
    env = settings(CHECKPOINT=checkpoint_url(server), CHECKPOINT_SHA256=sha256(server.data))
    model_dir = prepare_model_dir(env, volume)
    assert model_dir == volume / "models" / "sdxl-dev"
    manifest = verify(model_dir, full=True)
    assert manifest.source.name == f"http://127.0.0.1:{server.server_address[1]}/files/sdxl-dev.safetensors"
    assert manifest.source.sha256 == sha256(server.data)
    assert "SECRET" not in manifest.to_json()
    downloads = list((volume / "cache" / "model_build" / "downloads").rglob("*.safetensors"))
    assert [path.read_bytes() == server.data for path in downloads] == [True]
    server.shutdown()  # a restarted worker needs neither the network nor the download
    for path in downloads:
        path.unlink()
    assert prepare_model_dir(env, volume) == model_dir
    assert read_manifest(model_dir) == manifest


def test_a_wrong_sha256_leaves_no_folder_and_no_download(server: _Server, volume: Path) -> None:
    env = settings(CHECKPOINT=checkpoint_url(server), CHECKPOINT_SHA256="ab" * 32)
    with pytest.raises(ConfigurationError, match=rf"sha256 is {sha256(server.data)}, but CHECKPOINT_SHA256 is (ab)+"):
        prepare_model_dir(env, volume)
    assert sorted(path.name for path in (volume / "models").iterdir()) == ["sdxl-dev.prepare.lock"]
    assert not list((volume / "cache").rglob("*.safetensors")), "the wrong bytes are deleted"


def test_a_cut_off_download_leaves_no_folder_and_the_next_start_resumes_it(server: _Server, volume: Path) -> None:
    env = settings(CHECKPOINT=checkpoint_url(server), CHECKPOINT_SHA256=sha256(server.data))
    server.cut_first_response_at = len(server.data) // 3
    with pytest.raises(ModelMissing, match=r"resumed by the next worker start") as caught:
        prepare_model_dir(env, volume)
    assert caught.value.retriable and "SECRET" not in str(caught.value)
    assert not (volume / "models" / "sdxl-dev").exists()
    assert prepare_model_dir(env, volume) == volume / "models" / "sdxl-dev"
    assert server.ranges == [None, f"bytes={len(server.data) // 3}-"]


FULL_VOLUME_SCRIPT = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    from core.settings import load_settings
    from worker.model.location import prepare_model_dir
    # Every file may grow to LIMIT bytes and no further: writes fail with EFBIG, as on a full disk (ENOSPC).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), int(sys.argv[3])))
    try:
        env = {"CHECKPOINT": sys.argv[1], "CHECKPOINT_SHA256": sys.argv[4]}
        prepare_model_dir(load_settings(env), Path(sys.argv[2]))
    except Exception as error:
        print(type(error).__name__, "|", error)
    """
)


def test_a_full_volume_leaves_no_folder_and_says_how_much_room_is_needed(server: _Server, volume: Path) -> None:
    limit = len(server.data) // 2
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [checkpoint_url(server), str(volume), str(limit), sha256(server.data)]
    done = subprocess.run(
        [sys.executable, "-c", FULL_VOLUME_SCRIPT, *args], env=env, capture_output=True, text=True, timeout=300
    )
    kind, _, message = done.stdout.strip().rpartition("\n")[2].partition(" | ")
    assert kind == "ModelMissing", done.stdout + done.stderr
    assert (
        "no space left" in message
        and "about 7 GB for the download" in message
        and "enlarge the network volume" in message
    )
    assert "SECRET" not in message
    assert not (volume / "models" / "sdxl-dev").exists()


def test_a_second_worker_waits_for_the_first_and_then_finds_the_model_converted(
    server: _Server, volume: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from filelock import FileLock

    monkeypatch.setattr(model_location, "LOCK_LOG_EVERY_S", 0.2)
    env = settings(CHECKPOINT=checkpoint_url(server), CHECKPOINT_SHA256=sha256(server.data))
    model_dir = volume / "models" / "sdxl-dev"
    model_dir.parent.mkdir(parents=True)
    first = FileLock(str(volume / "models" / "sdxl-dev.prepare.lock"))  # the first worker, mid-download
    first.acquire()
    results: list[Path | BaseException] = []

    def second_worker() -> None:
        try:
            results.append(prepare_model_dir(env, volume))
        except BaseException as error:  # reported by the assertion below
            results.append(error)

    with caplog.at_level("INFO", logger="worker.model.location"):
        thread = threading.Thread(target=second_worker)
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive() and not model_dir.exists() and server.ranges == []  # waiting, not downloading
        first.release()
        thread.join(timeout=240)
    assert results == [model_dir] and verify(model_dir).source.sha256 == sha256(server.data)
    assert "another worker is downloading or converting" in caplog.text
