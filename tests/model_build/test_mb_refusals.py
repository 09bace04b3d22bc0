"""Every refusal: pickles (never unpickled), damaged files, non-SDXL checkpoints, NaN/Inf, fp16 overflow."""

from __future__ import annotations

import errno
import json
import os
import pickle
import resource
import subprocess
from pathlib import Path

import pytest
import torch

from core.errors import ConfigurationError, first_line
from model_build.__main__ import EXIT_CONFIGURATION, main
from model_build.checkpoint import inspect_checkpoint
from model_build.checkpoint_file import read_header
from model_build.convert import ConversionError, convert
from model_build.errors import CheckpointError
from model_build.layout import COMPONENT_PREFIXES


class _Boom:
    """Unpickling this creates a marker file: proof that a refused pickle was never unpickled."""

    marker: Path

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def booby_trapped(tmp_path: Path) -> tuple[bytes, Path]:
    marker = tmp_path / "UNPICKLED"
    boom = _Boom()
    boom.marker = marker
    return pickle.dumps(boom, protocol=2), marker


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("model.ckpt", "pickle", r"model\.ckpt is a raw pickle, a pickle checkpoint"),
        ("model.bin", "other", r"model\.bin is a \.bin file, a pickle checkpoint"),  # by its name alone
        ("model.pt", "zip", r"model\.pt is a PyTorch zip archive of pickles"),
        ("renamed.safetensors", "zip", r"renamed\.safetensors is a PyTorch zip archive of pickles"),
        ("renamed.safetensors", "pickle", r"renamed\.safetensors is a raw pickle"),
    ],
)
def test_pickles_are_refused_and_never_unpickled(booby_trapped, tmp_path: Path, name, kind, message) -> None:
    payload, marker = booby_trapped
    path = tmp_path / name
    if kind == "zip":
        torch.save({"state_dict": payload}, str(path))  # a real PyTorch checkpoint archive
        assert path.read_bytes()[:2] == b"PK"
    elif kind == "pickle":
        path.write_bytes(payload)
    else:
        path.write_bytes(b"\x00" * 64 + payload)
    with pytest.raises(CheckpointError, match=message) as error:
        convert(path, tmp_path / "out")
    assert "can run arbitrary code" in str(error.value) and "safetensors" in str(error.value)
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"GGUF\x03\x00\x00\x00" + bytes(64), "GGUF file"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 6938078334\n", "Git LFS pointer"),
        (b"\n<!DOCTYPE html><html><body>Sign in</body></html>", "HTML page"),
        (b"hello, this is not a model at all" * 10, "not a safetensors file"),
        (b"", "not a safetensors file"),
    ],
)
def test_files_that_are_not_checkpoints_are_named(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        convert(path, tmp_path / "out")


def test_truncated_download_is_named(dev_checkpoint: Path, tmp_path: Path) -> None:
    data = dev_checkpoint.read_bytes()
    path = tmp_path / "half.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"half\.safetensors is truncated: .* \(50%\)\. The download"):
        convert(path, tmp_path / "out")
    path.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=r"truncated: its header alone needs"):
        convert(path, tmp_path / "out")


def test_appended_bytes_and_a_corrupt_header_are_named(dev_checkpoint: Path, tmp_path: Path) -> None:
    data = dev_checkpoint.read_bytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(data + b"junk")
    with pytest.raises(CheckpointError, match=r"corrupt: 4 bytes follow the last tensor"):
        convert(path, tmp_path / "out")
    header_length = int.from_bytes(data[:8], "little")
    broken = bytearray(data)
    broken[8 : 8 + 20] = b"[" * 20  # the JSON header no longer parses
    path.write_bytes(bytes(broken))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        convert(path, tmp_path / "out")
    assert header_length > 20


def _with_header(data: bytes, edit) -> bytes:
    """A safetensors file with its JSON header edited by ``edit`` and re-padded; the tensor bytes stay as they were."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + length :]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h["b"].update(data_offsets=[8, 16]), r"tensor b starts at byte 8: it overlaps the previous tensor"),
        (lambda h: h["b"].update(data_offsets=[20, 28]), r"tensor b starts at byte 20: it leaves a gap before it"),
        (lambda h: h["a"].update(shape=[3, 2]), r"tensor a \(F32 \[3, 2\]\) needs 24 bytes but its offsets span 16"),
        (lambda h: h["a"].update(dtype="F7"), r"tensor a has the unknown dtype 'F7'"),
        (lambda h: h["a"].update(shape=[-2, 2]), r"tensor a has the shape \[-2, 2\]"),
        (lambda h: h.update(__metadata__=[1]), r"__metadata__ is not a JSON object"),
    ],
)
def test_inconsistent_headers_are_named_before_any_tensor_is_read(tmp_path: Path, edit, message: str) -> None:
    from safetensors.torch import save

    path = tmp_path / "damaged.safetensors"
    path.write_bytes(_with_header(save({"a": torch.ones(2, 2), "b": torch.ones(2)}), edit))
    with pytest.raises(CheckpointError, match=rf"damaged\.safetensors has a corrupt safetensors header \({message}"):
        read_header(path)


def _tiny(*keys: str) -> dict[str, torch.Tensor]:
    return {key: torch.zeros(2, 2) for key in keys}


@pytest.mark.parametrize(
    ("tensors", "looks_like"),
    [
        (
            _tiny(
                "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
                "model.diffusion_model.input_blocks.0.0.weight",
                "first_stage_model.encoder.conv_in.weight",
            ),
            "a Stable Diffusion 1.x",
        ),
        (
            _tiny("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", "model.diffusion_model.x"),
            "a Stable Diffusion 2.x",
        ),
        (
            _tiny(
                "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight",
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
                "model.diffusion_model",
            ),
            "a mix of an SDXL base and an SDXL refiner",
        ),
        (
            _tiny("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "text_encoders.clip_g.x"),
            "a Stable Diffusion 3",
        ),
        (_tiny("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"), "a Flux"),
        (_tiny("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"), "a LoRA"),
        (_tiny("unet.down_blocks.0.attentions.0.to_q.lora_A.weight"), "a LoRA"),
        (_tiny("encoder.conv_in.weight", "decoder.conv_out.weight"), "a VAE on its own"),
        (_tiny("down_blocks.0.resnets.0.conv1.weight", "conv_in.weight"), "one component of a Diffusers folder"),
        (_tiny("model.diffusion_model.input_blocks.0.0.weight"), "a bare UNet"),
        (_tiny("encoder.layer.0.weight", "classifier.bias"), r"not a Stable Diffusion checkpoint.*classifier\.bias"),
    ],
)
def test_non_sdxl_checkpoints_say_what_they_look_like(write_checkpoint, tmp_path, tensors, looks_like) -> None:
    with pytest.raises(CheckpointError, match=f"looks like {looks_like}"):
        convert(write_checkpoint(tensors), tmp_path / "out")


def test_sdxl_of_unknown_sizes_names_the_differing_tensors(dev_tensors, write_checkpoint, tmp_path) -> None:
    tensors = dict(dev_tensors)
    key = "model.diffusion_model.time_embed.0.weight"
    tensors[key] = torch.zeros(256, 32)
    expected = rf"sizes match no shipped config \(closest: dev_tiny.*{key} is \[256, 32\]"
    with pytest.raises(CheckpointError, match=expected):
        convert(write_checkpoint(tensors), tmp_path / "out")


@pytest.mark.parametrize(
    ("key", "value", "counts"),
    [
        ("model.diffusion_model.middle_block.1.proj_in.weight", float("nan"), "holds 1 NaN and 0 Inf values"),
        ("conditioner.embedders.1.model.ln_final.weight", float("inf"), "holds 0 NaN and 1 Inf values"),
    ],
)
def test_nan_and_inf_weights_are_named(dev_tensors, write_checkpoint, tmp_path, key, value, counts) -> None:
    tensors = dict(dev_tensors)
    damaged = tensors[key].clone()
    damaged.view(-1)[0] = value
    tensors[key] = damaged
    component = next(c for c, prefix in COMPONENT_PREFIXES.items() if key.startswith(prefix))
    output = tmp_path / "models" / "out"
    with pytest.raises(CheckpointError, match=rf"tensor {key} \({component}\) {counts}"):
        convert(write_checkpoint(tensors), output)
    assert [p.name for p in output.parent.iterdir() if p.suffix != ".lock"] == []  # no output, no temp folder


def test_fp16_overflow_is_named_with_the_fix(dev_tensors, write_checkpoint, tmp_path) -> None:
    tensors = dict(dev_tensors)
    key = "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"
    big = tensors[key].clone()
    big[3] = 1.0e6  # fine in fp32 and bf16, Inf in fp16
    tensors[key] = big
    with pytest.raises(CheckpointError, match=rf"tensor {key} \(text_encoder\) has values up to 1e\+06.*--dtype bf16"):
        convert(write_checkpoint(tensors), tmp_path / "out")


def test_known_harmless_extras_are_ignored_and_listed(dev_tensors, write_checkpoint) -> None:
    tensors = dict(dev_tensors)
    extras = {
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        "conditioner.embedders.1.model.logit_scale": torch.tensor(4.6),
        "alphas_cumprod": torch.linspace(1, 0, 1000),
        "model_ema.decay": torch.tensor(0.999),
        "denoiser.sigmas": torch.linspace(0, 14, 1000),
    }
    info = inspect_checkpoint(write_checkpoint({**tensors, **extras}))
    assert sorted(info.ignored) == sorted(extras)
    assert sum(len(keys) for keys in info.component_keys.values()) == len(tensors)


def test_dtype_is_checked_first(dev_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"--dtype 'fp8' is not one of fp16, bf16, fp32"):
        convert(dev_checkpoint, tmp_path / "out", dtype="fp8")


def test_a_safetensors_file_whose_first_byte_is_0x80_is_a_checkpoint(dev_tensors, write_checkpoint, capsys) -> None:
    # The first byte is the low byte of the header length (headers are padded to 8 bytes): 0x80 in about one
    # safetensors file in 32. It is a pickle's first byte too, but the header decides, not that byte. `inspect`
    # runs every check a conversion runs before it reads tensor data (the only place the first byte mattered).
    # The header is JSON padded with spaces to a multiple of 8: from its unpadded length with an empty "padding"
    # value, the one padding that makes the low byte 0x80 is computed, and the file written once more.
    path = write_checkpoint(dev_tensors, metadata={"padding": ""})
    with path.open("rb") as file:
        header = file.read(int.from_bytes(file.read(8), "little"))
    unpadded = len(header.rstrip(b" "))
    pad = next(pad for pad in range(256) if -(-(unpadded + pad) // 8) * 8 % 256 == 0x80)
    path = write_checkpoint(dev_tensors, metadata={"padding": "x" * pad})
    assert path.read_bytes()[:1] == b"\x80"
    assert main(["inspect", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"{path.name}: SDXL base checkpoint, config dev_tiny")


def test_integer_weights_are_refused_by_name(dev_tensors, write_checkpoint, tmp_path) -> None:
    quantised = {key: (tensor * 100).to(torch.int8) for key, tensor in dev_tensors.items()}
    with pytest.raises(CheckpointError, match=rf"holds {len(dev_tensors)} weight tensors that are not floating point"):
        convert(write_checkpoint(quantised), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    one = "model.diffusion_model.out.2.weight"
    tensors = {**dev_tensors, one: dev_tensors[one].to(torch.int32)}
    tensors["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    # position_ids is an integer buffer real checkpoints carry: ignored, not refused; the int32 weight is named.
    with pytest.raises(CheckpointError, match=rf"holds 1 weight tensors that are not floating point \(I32: {one}\)"):
        inspect_checkpoint(write_checkpoint(tensors))


# --- where the output goes: one line, exit code 2 (configuration), never a traceback, nothing left behind ---


@pytest.fixture
def tmpfs(tmp_path: Path):
    """Mounts a small tmpfs (root only); skips the test where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(size: str, read_only: bool = False) -> Path:
        target = tmp_path / f"tmpfs{len(mounted)}"
        target.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        try:
            result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
        except FileNotFoundError:
            pytest.skip("no mount command here")
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {first_line(result.stderr.decode(errors='replace'))}")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], check=False)


def convert_cli(checkpoint: Path, output: Path, capsys) -> tuple[int, str]:
    code = main(["-q", "convert", str(checkpoint), "--output", str(output)])
    return code, capsys.readouterr().err


def assert_one_clear_line(err: str, *expected: str) -> None:
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: configuration: --output "), line
    for text in expected:
        assert text in line, line


def test_output_under_a_file_or_at_a_file_is_a_configuration_error(dev_checkpoint, tmp_path, capsys) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    code, err = convert_cli(dev_checkpoint, tmp_path / "a-file" / "models" / "out", capsys)
    assert code == EXIT_CONFIGURATION
    assert_one_clear_line(err, f"is under {tmp_path / 'a-file'}, which is a file, not a folder")
    code, err = convert_cli(dev_checkpoint, tmp_path / "a-file", capsys)
    assert code == EXIT_CONFIGURATION
    assert_one_clear_line(err, f"--output {tmp_path / 'a-file'} is a file, not a folder; choose another --output")
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_read_only_output_folder_is_a_configuration_error(dev_checkpoint, tmp_path, tmpfs, capsys) -> None:
    if os.geteuid() == 0:  # root writes through permission bits: only a read-only file system stops it
        folder, why = tmpfs("1m", read_only=True), "is on a read-only file system"
    else:
        folder, why = tmp_path / "locked", "is not writable by this user"
        folder.mkdir()
        folder.chmod(0o555)
    code, err = convert_cli(dev_checkpoint, folder / "out", capsys)
    assert code == EXIT_CONFIGURATION
    assert_one_clear_line(err, f"{folder} {why}; choose a writable --output")


def test_full_disk_is_a_configuration_error(dev_checkpoint, tmpfs, capsys) -> None:
    # A 12 MiB tmpfs holds the configs and the first components; the UNet's safetensors write fails (ENOSPC).
    folder = tmpfs("12m")
    code, err = convert_cli(dev_checkpoint, folder / "out", capsys)
    assert code == EXIT_CONFIGURATION
    assert_one_clear_line(err, "cannot write the converted model: No space left on device. It needs about")
    assert sorted(path.name for path in folder.iterdir()) == ["out.lock"]  # no output, no temporary folder


def test_file_size_limit_is_a_configuration_error(dev_checkpoint, tmp_path) -> None:
    # Without root (no tmpfs), RLIMIT_FSIZE makes writes past 1 MiB fail with EFBIG, as a full quota does.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        with pytest.raises(ConfigurationError) as caught:
            convert(dev_checkpoint, tmp_path / "models" / "out")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(caught.value).startswith("configuration: --output ")
    assert "cannot write the converted model: File too large. It needs about" in str(caught.value)
    # Still a ConversionError for callers that catch those, with the OSError (its errno) in the chain.
    assert isinstance(caught.value, ConversionError) and caught.value.__cause__.errno == errno.EFBIG
    assert sorted(path.name for path in (tmp_path / "models").iterdir()) == ["out.lock"]
