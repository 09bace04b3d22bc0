"""The typed manifest: manifests already on disk read and written back byte for byte; anything else is refused.

``data/manifest-v2-*.json`` are manifests written by the converter before the manifest was typed
(converter version 2 at main 281cdf9: the dev base, the dev refiner, and the dev base in bf16 with --vae).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from model_build.architectures import FAMILIES, family_of_manifest
from model_build.layout import BASE_FAMILY
from model_build.manifest import (
    DEFAULT_PREDICTION,
    MANIFEST_NAME,
    Manifest,
    ModelFolderError,
    describe_files,
    parse_manifest,
    read_manifest,
    verify,
)

DATA = Path(__file__).parent / "data"
OLD_MANIFESTS = sorted(DATA.glob("manifest-v2-*.json"))


def _dumps(fields: dict) -> str:
    return json.dumps(fields, indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize("path", OLD_MANIFESTS, ids=lambda path: path.stem)
def test_manifests_on_disk_round_trip_byte_for_byte(path: Path) -> None:
    text = path.read_text()
    manifest = parse_manifest(text)
    assert manifest.to_json() == text
    assert manifest.source is not None and manifest.source.sha256 == json.loads(text)["source"]["sha256"]
    assert manifest.prediction is None and manifest.effective_prediction == DEFAULT_PREDICTION  # epsilon


def test_older_and_shorter_manifests_round_trip_too() -> None:
    """Before refiners there was no "family"; bench's full-size folders carry only a few keys; unknown keys stay."""
    base = json.loads(OLD_MANIFESTS[0].read_text())
    before_refiners = {key: value for key, value in base.items() if key != "family"}
    bench = {
        "format": 1,
        "converter_version": "2",
        "source": {"name": "random-full-size-sdxl", "sha256": "", "size": 0},
        "config": "random",
        "dev_model": True,
        "dtype": "fp16",
        "versions": {"torch": "2"},
        "files": {},
    }
    from_the_future = {**base, "added_later": {"anything": [1, 2]}}
    for fields in (before_refiners, bench, from_the_future):
        text = _dumps(fields)
        assert parse_manifest(text).to_json() == text
    assert family_of_manifest(parse_manifest(_dumps(before_refiners))) is FAMILIES[BASE_FAMILY]


def test_an_old_folder_still_verifies(dev_model_dir: Path, tmp_path: Path) -> None:
    """A folder converted before the manifest was typed (no "prediction", no "family") loads as a base, epsilon."""
    folder = Path(shutil.copytree(dev_model_dir, tmp_path / "old"))
    fields = json.loads((folder / MANIFEST_NAME).read_text())
    fields = {key: value for key, value in fields.items() if key not in ("prediction", "family")}
    (folder / MANIFEST_NAME).write_text(_dumps(fields))
    manifest = verify(folder, full=True)
    assert family_of_manifest(manifest) is FAMILIES[BASE_FAMILY]
    assert manifest.effective_prediction.prediction_type == "epsilon"
    assert manifest.to_json() == (folder / MANIFEST_NAME).read_text()


def test_the_converter_writes_what_the_typed_reader_reads(dev_model_dir: Path) -> None:
    text = (dev_model_dir / MANIFEST_NAME).read_text()
    manifest = read_manifest(dev_model_dir)
    assert manifest.to_json() == text
    assert manifest.files == describe_files(dev_model_dir)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"format": 2, "files": {}}, "format"),
        ({"format": 1}, "files: Field required"),
        ({"format": 1, "files": {"unet/x.safetensors": {"sha256": "ab", "size": "big"}}}, "unet/x.safetensors.size"),
        ({"format": 1, "files": {}, "source": {"name": "x"}}, "source.sha256: Field required"),
        ({"format": 1, "files": {}, "prediction": {"prediction_type": "sample"}}, "prediction.prediction_type"),
    ],
)
def test_a_manifest_of_the_wrong_shape_is_named(tmp_path: Path, fields: dict, problem: str) -> None:
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(fields))
    with pytest.raises(ModelFolderError, match="is not a model_build manifest of format 1") as error:
        read_manifest(tmp_path)
    assert problem in str(error.value) and "--force" in str(error.value)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_keys = st.sampled_from(["format", "files", "source", "vae", "family", "dev_model", "prediction", "tensors", "x"])


@given(st.dictionaries(_keys, _json, max_size=6) | _json)
def test_any_json_is_a_manifest_or_a_clear_refusal(tmp_path_factory: pytest.TempPathFactory, fields) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / MANIFEST_NAME).write_text(json.dumps(fields))
    try:
        manifest = read_manifest(folder)
    except ModelFolderError as error:
        assert "--force" in str(error)
    else:
        assert isinstance(manifest, Manifest) and manifest.format == 1
        assert parse_manifest(manifest.to_json()) == manifest
