"""``verify``: sizes by default, every sha256 with ``--full``; it names the file and says what to run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from model_build.__main__ import main
from model_build.manifest import ModelFolderError, manifest_hash, verify

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def model_copy(dev_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(dev_model_dir, tmp_path / "sdxl-dev"))


def test_an_intact_folder_verifies_fast_and_full(model_copy: Path) -> None:
    assert verify(model_copy).dtype == "fp16"
    assert verify(model_copy, full=True).files[UNET_WEIGHTS].size == (model_copy / UNET_WEIGHTS).stat().st_size
    assert len(manifest_hash(model_copy)) == 16


def test_a_flipped_byte_is_caught_by_full_only(model_copy: Path, capsys: pytest.CaptureFixture) -> None:
    path = model_copy / UNET_WEIGHTS
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    verify(model_copy)  # same size: the fast check cannot see it
    with pytest.raises(ModelFolderError, match=rf"{UNET_WEIGHTS} sha256 differs from the manifest"):
        verify(model_copy, full=True)
    assert main(["verify", str(model_copy), "--full"]) == 1
    assert f"convert sdxl-dev.safetensors --output {model_copy} --force" in capsys.readouterr().err


def test_a_missing_file_is_caught_without_full(model_copy: Path) -> None:
    (model_copy / "text_encoder_2" / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=r"text_encoder_2/model\.safetensors is missing"):
        verify(model_copy)


def test_a_truncated_file_is_caught_without_full(model_copy: Path) -> None:
    path = model_copy / "vae" / "diffusion_pytorch_model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size - 10)
    with pytest.raises(ModelFolderError, match=rf"vae/diffusion_pytorch_model\.safetensors has {size - 10} bytes"):
        verify(model_copy)


def test_an_added_weight_file_is_caught(model_copy: Path) -> None:
    (model_copy / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelFolderError, match=r"unet/diffusion_pytorch_model\.bin is not in the manifest"):
        verify(model_copy)


def test_a_folder_without_manifest_says_how_to_make_one(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(ModelFolderError, match=r"has no manifest\.json .*python -m model_build convert"):
        verify(tmp_path / "plain")
    with pytest.raises(ModelFolderError, match="does not exist"):
        verify(tmp_path / "absent")
