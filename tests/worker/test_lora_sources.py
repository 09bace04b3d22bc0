"""LoRA names -> files: roots, subfolders, every refusal (escape, pickle, missing, Hub rules). No model needed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.engine import EngineError
from worker.lora_sources import (
    BAKED_LORA_DIR,
    DEFAULT_LORA_DIR,
    LoraError,
    LoraResolver,
    LoraSettings,
    parse_hf_name,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    volume, baked = tmp_path / "volume", tmp_path / "baked"
    touch(volume / "ink.safetensors")
    touch(volume / "styles" / "watercolor.safetensors")
    touch(volume / "styles" / "deep" / "v1.2.safetensors")
    touch(baked / "baked-only.safetensors")
    touch(baked / "ink.safetensors", b"shadowed")
    touch(volume / "old.ckpt")
    touch(volume / ".hidden" / "secret.safetensors")
    touch(tmp_path / "outside.safetensors")
    return volume, baked


def resolver(*roots: Path, **settings) -> LoraResolver:
    return LoraResolver(LoraSettings(roots=tuple(roots), **settings))


def test_names_resolve_with_or_without_extension_in_subfolders(roots) -> None:
    volume, baked = roots
    lookup = resolver(volume, baked)
    assert lookup.resolve("ink").path == (volume / "ink.safetensors").resolve()
    assert lookup.resolve("ink.safetensors").path == (volume / "ink.safetensors").resolve()  # first root wins
    assert lookup.resolve("styles/watercolor").label == "styles/watercolor"
    assert lookup.resolve("styles/deep/v1.2").path.name == "v1.2.safetensors"  # a dot in the name is not an extension
    assert lookup.resolve("baked-only").path == (baked / "baked-only.safetensors").resolve()


def test_identity_changes_when_the_file_is_rewritten(roots) -> None:
    volume, _ = roots
    lookup = resolver(volume)
    before = lookup.resolve("ink").identity
    assert lookup.resolve("ink").identity == before
    stat = (volume / "ink.safetensors").stat()
    (volume / "ink.safetensors").write_bytes(b"y")  # same size ...
    os.utime(volume / "ink.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and mtime (cp -p)
    assert lookup.resolve("ink").identity != before


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../outside", "contains '..'"),
        ("styles/../../outside", "contains '..'"),
        ("/etc/passwd", "absolute path"),
        ("~/x", "absolute path"),
        ("a\\b", "backslash"),
        ("old.ckpt", "pickle file"),
        ("old.bin", "pickle file"),
        ("old", "only .*/old.ckpt exists, a pickle file"),
        ("https://example.com/x.safetensors", "only file names under the LoRA folders"),
        ("styles", "is a folder"),
    ],
)
def test_refusals_name_the_field_and_say_why(roots, name: str, expected: str) -> None:
    volume, baked = roots
    touch(volume / "styles.safetensors" / "inner")  # a folder with a LoRA's name
    with pytest.raises(LoraError, match=rf"loras\[2\].name: .*{expected}") as raised:
        resolver(volume, baked).resolve(name, field="loras[2].name")
    assert isinstance(raised.value, EngineError)  # so the handler returns it as the job's error


def test_links_out_of_the_folder_are_refused_links_inside_work(roots, tmp_path: Path) -> None:
    volume, _ = roots
    (volume / "escape.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (volume / "linkdir").symlink_to(tmp_path, target_is_directory=True)
    (volume / "alias.safetensors").symlink_to(volume / "styles" / "watercolor.safetensors")
    (volume / "dangling.safetensors").symlink_to(volume / "nothing.safetensors")
    lookup = resolver(volume)
    with pytest.raises(LoraError, match=r"points outside the LoRA folder"):
        lookup.resolve("escape")
    with pytest.raises(LoraError, match=r"points outside the LoRA folder"):
        lookup.resolve("linkdir/outside")
    assert lookup.resolve("alias").path == (volume / "styles" / "watercolor.safetensors").resolve()
    with pytest.raises(LoraError, match=r"no LoRA named 'dangling'"):
        lookup.resolve("dangling")
    names, _ = lookup.available_names()
    assert "escape" not in names and "alias" in names


def test_missing_name_lists_available_names_capped(roots) -> None:
    volume, baked = roots
    with pytest.raises(LoraError) as raised:
        resolver(volume, baked).resolve("nope", field="loras[0].name")
    message = str(raised.value)
    assert message.startswith("loras[0].name: no LoRA named 'nope'")
    assert "available: baked-only, ink, styles/deep/v1.2, styles/watercolor" in message
    assert "secret" not in message and "old" not in message  # hidden folders and pickles are not offered

    for index in range(25):
        touch(volume / "many" / f"lora{index:02d}.safetensors")
    with pytest.raises(LoraError, match=r"many/lora17 \(and 9 more\)$"):
        resolver(volume, baked).resolve("nope")


def test_no_lora_folder_at_all_says_so(tmp_path: Path) -> None:
    with pytest.raises(LoraError, match=r"none of the LoRA folders exists .*set LORA_DIR"):
        resolver(tmp_path / "absent").resolve("ink")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraError, match=r"there are no .safetensors files there"):
        resolver(tmp_path / "empty").resolve("ink")


@given(st.lists(st.sampled_from(["ink", "styles", "..", ".", "deep", "v1.2", "outside", "linkdir", ""]), max_size=5))
def test_whatever_the_name_a_resolved_file_is_inside_a_root(tmp_path_factory, parts: list[str]) -> None:
    base = tmp_path_factory.getbasetemp() / "property"
    volume = base / "volume"
    if not volume.exists():
        touch(volume / "ink.safetensors")
        touch(volume / "styles" / "deep" / "v1.2.safetensors")
        touch(base / "outside.safetensors")
        (volume / "linkdir").symlink_to(base, target_is_directory=True)
    name = "/".join(parts) or "x"
    try:
        source = resolver(volume).resolve(name)
    except LoraError:
        return
    assert source.path.is_relative_to(volume.resolve()) and source.path.suffix == ".safetensors"


def test_settings_from_environment(tmp_path: Path) -> None:
    default = LoraSettings.from_env({})
    assert default.roots == (Path(DEFAULT_LORA_DIR), Path(BAKED_LORA_DIR))
    assert not default.allow_download and default.cache_size == 8
    custom = LoraSettings.from_env(
        {
            "LORA_DIR": f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}",
            "ALLOW_LORA_DOWNLOAD": "1",
            "LORA_DOWNLOAD_DIR": str(tmp_path / "dl"),
            "LORA_CACHE_SIZE": "3",
            "LORA_CACHE_MB": "512",
        }
    )
    assert custom.roots == (tmp_path / "a", tmp_path / "b", Path(BAKED_LORA_DIR))
    assert custom.allow_download and custom.download_dir == tmp_path / "dl"
    assert (custom.cache_size, custom.cache_mb) == (3, 512.0)
    with pytest.raises(ValueError, match=r"LORA_CACHE_SIZE='many' is not a number"):
        LoraSettings.from_env({"LORA_CACHE_SIZE": "many"})


# -- hf:// ------------------------------------------------------------------------------------------------------------


def test_hub_names_parse() -> None:
    parsed = parse_hf_name(f"hf://someone/sdxl-loras/styles/ink.safetensors@{COMMIT}")
    assert (parsed.repo_id, parsed.filename, parsed.revision) == (
        "someone/sdxl-loras",
        "styles/ink.safetensors",
        COMMIT,
    )
    assert str(parsed) == f"hf://someone/sdxl-loras/styles/ink.safetensors@{COMMIT}"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("hf://someone/repo/ink.safetensors", "not a valid Hub LoRA address"),
        ("hf://someone/repo/ink.safetensors@main", "must pin a full 40-character commit sha"),
        (f"hf://someone/repo/ink.safetensors@{COMMIT[:12]}", "must pin a full 40-character commit sha"),
        (f"hf://someone/ink.safetensors@{COMMIT}", "not a valid Hub LoRA address"),
        (f"hf://someone/repo/../x.safetensors@{COMMIT}", "invalid file path"),
        (f"hf://someone/repo/model.ckpt@{COMMIT}", "pickle file"),
        (f"hf://someone/repo/weights.onnx@{COMMIT}", "must name a .safetensors file"),
    ],
)
def test_bad_hub_names_are_refused(name: str, expected: str) -> None:
    with pytest.raises(LoraError, match=expected):
        parse_hf_name(name)


def test_hub_download_only_when_allowed_and_never_in_tests(tmp_path: Path) -> None:
    name = f"hf://someone/repo/ink.safetensors@{COMMIT}"
    with pytest.raises(LoraError, match=r"loras\[0\].name: .*downloading LoRAs is off on this worker; set ALLOW_LORA"):
        resolver(tmp_path).resolve(name, field="loras[0].name")
    # Allowed, but tests run with HF_HUB_OFFLINE=1: a clear error, no network, no traceback.
    allowed = resolver(tmp_path, allow_download=True, download_dir=tmp_path / "downloads")
    with pytest.raises(LoraError, match=rf"could not download hf://someone/repo/ink.safetensors@{COMMIT}: "):
        allowed.resolve(name)
