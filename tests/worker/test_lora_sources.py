"""LoRA names -> files: roots, subfolders, every refusal (escape, pickle, missing, Hub rules). No model needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import ConfigurationError, InvalidRequest, LoraFailed, error_kind_of
from core.settings import BAKED_LORAS, VOLUME, load_settings
from worker.adapters.lora.sources import (
    MAX_NAME_PART_BYTES,
    MAX_PATH_BYTES,
    LoraError,
    LoraResolver,
    LoraSettings,
    default_download_dir,
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
        ("ftp://example.com/x.safetensors", "only file names under the LoRA folders, hf://.* and http\\(s\\) URLs"),
        ("https://example.com/x.safetensors", "downloading LoRAs is off on this worker; set ALLOW_LORA_DOWNLOAD=1"),
        ("styles", "is a folder under"),
        ("pipe", r"is a named pipe \(FIFO\) under"),
    ],
)
def test_refusals_name_the_field_and_say_why(roots, name: str, expected: str) -> None:
    volume, baked = roots
    touch(volume / "styles.safetensors" / "inner")  # a folder with a LoRA's name
    os.mkfifo(volume / "pipe.safetensors")  # reading it would block the worker forever
    with pytest.raises(LoraError, match=rf"loras\[2\].name: .*{expected}") as raised:
        resolver(volume, baked).resolve(name, field="loras[2].name")
    # A LoRA error is the job's error, not an internal one: the handler and the batch runner report it as it is.
    assert isinstance(raised.value, LoraFailed) and isinstance(raised.value, InvalidRequest)
    assert not raised.value.retriable and error_kind_of(str(raised.value)) is LoraFailed


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("x" * 244, None),  # 244 + len(".safetensors") = 256 bytes
        ("é" * 122, None),  # 244 bytes in UTF-8: the limit is in bytes, not characters
        ("styles/" + "y" * 245, None),
        (f"{'d' * 200}/" * 20 + "ink", "path"),
    ],
)
def test_names_longer_than_the_file_system_allows_are_refused_before_any_lookup(roots, name, expected) -> None:
    volume, _ = roots
    limit = rf"is too long: under the LoRA folder its path is \d+ bytes, more than the {MAX_PATH_BYTES} bytes"
    if expected is None:
        limit = rf"is too long: one part of its file name is 25\d bytes .* at most {MAX_NAME_PART_BYTES} bytes per"
    with pytest.raises(LoraError, match=rf"^lora: loras\[0\].name: '.{{40}}…' {limit}"):
        resolver(volume).resolve(name, field="loras[0].name")


def test_a_name_just_under_the_limit_is_looked_up(roots) -> None:
    volume, _ = roots
    longest = "z" * (MAX_NAME_PART_BYTES - len(".safetensors"))
    with pytest.raises(LoraError, match=r"no LoRA named"):  # a plain lookup, not a length refusal
        resolver(volume).resolve(longest)
    touch(volume / f"{longest}.safetensors")
    assert resolver(volume).resolve(longest).path.name == f"{longest}.safetensors"


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
    message = raised.value.message
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


def test_settings_come_from_the_workers_settings(tmp_path: Path) -> None:
    default = LoraSettings.from_settings(load_settings({}))
    assert default.roots == (VOLUME / "loras", BAKED_LORAS)
    assert not default.allow_download and default.cache_size == 8 and default.cache_mb == 2048.0
    assert default.download_dir == default_download_dir()
    custom = LoraSettings.from_settings(
        load_settings(
            {
                "LORA_DIR": f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}",
                "ALLOW_LORA_DOWNLOAD": "1",
                "LORA_DOWNLOAD_DIR": str(tmp_path / "dl"),
                "LORA_CACHE_SIZE": "3",
                "LORA_CACHE_MB": "512",
            }
        )
    )
    assert custom.roots == (tmp_path / "a", tmp_path / "b", BAKED_LORAS)
    assert custom.allow_download and custom.download_dir == tmp_path / "dl"
    assert (custom.cache_size, custom.cache_mb) == (3, 512.0)
    with pytest.raises(ConfigurationError, match=r"LORA_CACHE_SIZE='many' is invalid"):
        load_settings({"LORA_CACHE_SIZE": "many"})


def test_resolving_names_needs_neither_torch_nor_the_engine() -> None:
    modules = "('torch', 'worker.generation.engine')"
    code = f"import sys, worker.adapters.lora.sources; print(sorted(m for m in {modules} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


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
        ("hf://someone/repo/ink.safetensors", "names no revision; pin the exact file with a commit hash"),
        ("hf://someone/repo/ink.safetensors@main", "revision 'main' is not a 40-hex commit hash"),
        (f"hf://someone/repo/ink.safetensors@{COMMIT[:12]}", "is not a 40-hex commit hash"),
        (f"hf://someone/ink.safetensors@{COMMIT}", "does not name a repository and a file"),
        (f"hf://-someone/repo/ink.safetensors@{COMMIT}", "invalid repository name"),
        (f"hf://someone/repo/../x.safetensors@{COMMIT}", "invalid file path"),
        (f"hf://someone/repo/a\\b.safetensors@{COMMIT}", "invalid file path"),
        (f"hf://someone/repo/model.ckpt@{COMMIT}", "pickle file"),
        (f"hf://someone/repo/weights.onnx@{COMMIT}", "must name a .safetensors file"),
        (f"hf://someone/repo/{'n' * 300}.safetensors@{COMMIT}", "one part of its file name is 312 bytes"),
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
