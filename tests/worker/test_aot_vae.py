"""COMPILE=aot with COMPILE_VAE=1: the VAE decoder as an AOTInductor package of its own, on the CPU dev model.

A real package is built once (the decoder is a small graph: seconds to tens of seconds on 2 cores) and served for
every batch of 1-16 latents; what must hold on any device: decodes agree with the eager decoder, a second start
loads instead of building, a VAE whose weights were replaced (a dtype cast) is never served by it, the engine's
speed-ups install it in place of Dynamo's compile, and a module whose batch cannot stay open at export gets an
exact-shape package (the decoder stands in for the UNet there: the path is shared and its build is the cheaper).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.support.dev_pipes import load_dev_pipe
from worker.generation.acceleration import SpeedupOptions, _aot_vae_options_digest, apply_speedups
from worker.generation.aot_unet import AotVaeDecoder, call_counts
from worker.generation.vae_tiling import vae_tiling

CONFIGS = {"conv_1x1_as_mm": True, "max_autotune": False}


def latents(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def decode(vae, batch: int, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(latents(batch, seed), return_dict=False)[0]


@pytest.fixture(scope="module")
def vae_package(dev_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    pipe = load_dev_pipe(dev_model_dir)
    cache = tmp_path_factory.mktemp("aot-vae") / "aot"
    eager = {batch: decode(pipe.vae, batch) for batch in (1, 3)}
    aot = AotVaeDecoder.install(pipe.vae.decoder, cache, _aot_vae_options_digest(pipe), CONFIGS)
    decode(pipe.vae, 1)  # the warm-up's decode: builds the package
    aot.freeze()
    return SimpleNamespace(pipe=pipe, aot=aot, cache=cache, eager=eager)


def test_one_package_decodes_every_batch_and_agrees_with_the_eager_decoder(vae_package: SimpleNamespace) -> None:
    aot, vae = vae_package.aot, vae_package.pipe.vae
    (record,) = aot.records
    assert not record.hit and record.agreement >= 0.999 and record.batch_rows == [1, 16]
    assert Path(record.file).name.startswith("sdxl-vae-decoder-") and Path(record.file).is_file()
    packaged, eager = aot.packaged_calls, aot.eager_calls
    unet_calls = call_counts("UNet")  # other files' UNet packages may live in this process (pytest-xdist)
    for batch, expected in vae_package.eager.items():  # batch 3 was never warmed: the same package serves it
        image = decode(vae, batch)
        assert image.shape == expected.shape and (image - expected).abs().max() < 1e-3
    assert (aot.packaged_calls, aot.eager_calls) == (packaged + 2, eager)
    # The smoke's per-line counts: the decoder's calls are counted as the decoder's, never as the UNet's.
    counted = call_counts("VAE decoder")
    assert counted is not None and counted["packaged"] >= aot.packaged_calls
    assert call_counts("UNet") == unet_calls


def test_a_second_start_loads_the_decoder_package(vae_package: SimpleNamespace, monkeypatch) -> None:
    def no_build(*args, **kwargs):
        raise AssertionError("a second start must not build")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_build)
    pipe = vae_package.pipe
    vae_package.aot.uninstall()
    try:
        again = AotVaeDecoder.install(pipe.vae.decoder, vae_package.cache, _aot_vae_options_digest(pipe), CONFIGS)
        image = decode(pipe.vae, 1)
        (record,) = again.records
        assert record.hit and record.key == vae_package.aot.records[0].key and again.packaged_calls == 1
        assert (image - vae_package.eager[1]).abs().max() < 1e-3
        again.uninstall()
    finally:
        pipe.vae.decoder.forward = vae_package.aot  # the module's own package again, for the tests after this one


def test_replaced_weights_are_never_served_and_the_tiling_block_puts_them_back(vae_package: SimpleNamespace) -> None:
    """diffusers' img2img casts the VAE (new weight tensors): those decode eagerly, and once the engine's block
    has put the very tensors back the package serves again."""
    aot, vae = vae_package.aot, vae_package.pipe.vae
    with vae_tiling(vae, 64, 64, 0):
        vae.to(torch.float64)
        vae.to(torch.float32)  # the same dtype as before, other tensors
        packaged, eager = aot.packaged_calls, aot.eager_calls
        image = decode(vae, 1)
        assert (aot.packaged_calls, aot.eager_calls) == (packaged, eager + 1)
        assert (image - vae_package.eager[1]).abs().max() < 1e-3
    decode(vae, 1)
    assert aot.packaged_calls == packaged + 1


def test_the_speedups_install_the_decoder_package_under_aot(dev_model_dir: Path, tmp_path: Path) -> None:
    pipe = load_dev_pipe(dev_model_dir)
    accelerator = apply_speedups(pipe, SpeedupOptions(compile="aot", compile_vae=True, cache_dir=str(tmp_path)))
    try:
        assert isinstance(accelerator.aot_vae, AotVaeDecoder) and pipe.vae.decoder.forward is accelerator.aot_vae
        assert "compile_vae_decoder_aot:default" in accelerator.applied
        assert accelerator.aot_vae.cache_dir == tmp_path / "aot"
        assert accelerator.aot_vae.options_digest != accelerator.aot.options_digest
    finally:
        accelerator.aot.uninstall()
        accelerator.aot_vae.uninstall()


def test_a_module_whose_batch_cannot_stay_open_gets_a_package_for_its_exact_shapes(
    dev_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Export refusing the open batch (code that fixes it somewhere; the UNet and the decoder share this path) is
    not the end of compiled serving: the call's exact shapes are packaged, and a marker beside the open package's
    name spares the next start the failed export."""
    from torch._dynamo.exc import UserError, UserErrorType

    export = torch.export.export
    exports: list[bool] = []

    def fixed_batch(module, inputs, dynamic_shapes=None, **kwargs):
        exports.append(dynamic_shapes is not None)
        if dynamic_shapes is not None:
            raise UserError(UserErrorType.CONSTRAINT_VIOLATION, "Constraints violated (rows)!")
        return export(module, inputs, **kwargs)

    monkeypatch.setattr(torch.export, "export", fixed_batch)
    pipe = load_dev_pipe(dev_model_dir)
    expected = decode(pipe.vae, 1)
    digest = _aot_vae_options_digest(pipe)
    exact = AotVaeDecoder.install(pipe.vae.decoder, tmp_path / "aot", digest, CONFIGS)
    image = decode(pipe.vae, 1)
    (record,) = exact.records
    assert not record.hit and record.batch_rows is None and exports == [True, False]  # open tried once, then exact
    (marker,) = (tmp_path / "aot").glob("*.batch-closed.txt")
    assert "Constraints violated (rows)" in marker.read_text()
    assert (image - expected).abs().max() < 1e-3 and exact.packaged_calls == 1
    exact.uninstall()

    again = AotVaeDecoder.install(pipe.vae.decoder, tmp_path / "aot", digest, CONFIGS)  # the marker: no export
    decode(pipe.vae, 1)
    (loaded,) = again.records
    assert exports == [True, False] and loaded.hit and loaded.key == record.key
    again.uninstall()
