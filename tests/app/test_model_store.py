from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.model_store import (
    ModelInvalidError,
    ModelNotFoundError,
    find_version,
    list_models,
    list_versions,
    load_version,
    natural_key,
    read_manifest,
)
from support.bundled import BUNDLED_STORE
from support.fake_store import NAME, angle_histogram, build_model, write_version


def test_natural_sort_and_latest(tmp_path: Path) -> None:
    for v in ["1", "2", "10", "v1.9", "v1.10"]:
        write_version(tmp_path, v)
    assert list_versions(tmp_path, NAME) == ["1", "2", "10", "v1.9", "v1.10"]
    assert sorted(["1.10.0", "1.9.3", "1.2"], key=natural_key) == ["1.2", "1.9.3", "1.10.0"]
    assert list_models(tmp_path) == [NAME]
    assert find_version(tmp_path, NAME) == "v1.10"
    m = load_version(tmp_path, NAME)
    assert m.version == "v1.10" and m.providers == ("CPUExecutionProvider",)


def test_latest_skips_version_without_manifest(tmp_path: Path) -> None:
    write_version(tmp_path, "1")
    (tmp_path / NAME / "2").mkdir()
    (tmp_path / NAME / "2" / "model.onnx").write_bytes(b"partial")
    assert find_version(tmp_path, NAME) == "1"


def test_tampered_byte(tmp_path: Path) -> None:
    d = write_version(tmp_path, "1")
    data = bytearray((d / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (d / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelInvalidError, match=r"model\.onnx: sha256 [0-9a-f]{64} does not match manifest\.json"):
        load_version(tmp_path, NAME, "1")


def test_missing_manifest_field(tmp_path: Path) -> None:
    d = write_version(tmp_path, "1")
    man = json.loads((d / "manifest.json").read_text())
    del man["rho"]
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ModelInvalidError) as ei:
        load_version(tmp_path, NAME, "1")
    assert str(ei.value) == f"{d / 'manifest.json'}: invalid manifest: rho: Field required"


def test_wrong_output_names(tmp_path: Path) -> None:
    d = write_version(tmp_path, "1", model_bytes=build_model(output_names=("scores", "cosines")))
    with pytest.raises(ModelInvalidError) as ei:
        load_version(tmp_path, NAME, "1")
    assert str(ei.value) == (
        f"{d / 'model.onnx'}: outputs must be exactly ['logits', 'cosines'], found ['scores', 'cosines']"
    )


def test_input_shape_mismatch(tmp_path: Path) -> None:
    d = write_version(tmp_path, "1", model_bytes=build_model(input_hw=(32, 32)))
    with pytest.raises(ModelInvalidError) as ei:
        load_version(tmp_path, NAME, "1")
    assert str(ei.value) == (
        f"{d / 'model.onnx'}: input shape ['N', 1, 32, 32] does not match manifest [N, 1, 28, 28] with dynamic N"
    )


def test_unknown_schema_version(tmp_path: Path) -> None:
    d = write_version(tmp_path, "1", manifest_overrides={"schema_version": 2})
    with pytest.raises(ModelInvalidError) as ei:
        load_version(tmp_path, NAME, "1")
    assert str(ei.value) == f"{d / 'manifest.json'}: unsupported schema_version 2 (this service reads 1)"


def test_angle_histogram_is_optional_and_checked_against_the_classes(tmp_path: Path) -> None:
    write_version(tmp_path / "a", "1")
    assert load_version(tmp_path / "a", NAME).manifest.angle_histogram is None  # an older manifest
    write_version(tmp_path / "b", "1", manifest_overrides={"angle_histogram": angle_histogram()})
    hist = load_version(tmp_path / "b", NAME).manifest.angle_histogram
    assert hist is not None and len(hist.counts) == 10 and len(hist.bin_edges_deg) == 91
    bad = angle_histogram()
    bad["counts"] = bad["counts"][:9]
    d = write_version(tmp_path / "c", "1", manifest_overrides={"angle_histogram": bad})
    with pytest.raises(ModelInvalidError) as ei:
        load_version(tmp_path / "c", NAME)
    assert str(ei.value) == (f"{d / 'manifest.json'}: invalid manifest: (root): Value error, "
                             "angle_histogram.counts must have one row per class (10), got 9")


@pytest.mark.parametrize(
    "manifest", sorted(BUNDLED_STORE.glob("*/*/manifest.json")), ids=lambda p: str(p.parent.relative_to(BUNDLED_STORE))
)
def test_every_bundled_manifest_loads(manifest: Path) -> None:
    """The store's versions, some exported before angle_histogram existed, all still load."""
    assert read_manifest(manifest).version == manifest.parent.name


def test_missing_model_file(tmp_path: Path) -> None:
    d = write_version(tmp_path, "1")
    (d / "model.onnx").unlink()
    with pytest.raises(ModelInvalidError) as ei:
        load_version(tmp_path, NAME, "1")
    assert str(ei.value) == f"{d / 'model.onnx'}: missing"


def test_manifest_names_other_version(tmp_path: Path) -> None:
    write_version(tmp_path, "1", manifest_overrides={"version": "7"})
    with pytest.raises(ModelInvalidError, match=f"names {NAME}/7 but lives in {NAME}/1"):
        load_version(tmp_path, NAME, "1")


def test_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_version(tmp_path / "nope", NAME)
    write_version(tmp_path, "1")
    with pytest.raises(ModelNotFoundError) as ei:
        load_version(tmp_path, NAME, "9")
    assert str(ei.value) == f"version '9' of model '{NAME}' not found in {tmp_path / NAME}"
    with pytest.raises(ModelNotFoundError, match="model 'other' not found"):
        load_version(tmp_path, "other")


def test_garbage_onnx(tmp_path: Path) -> None:
    d = write_version(tmp_path, "1", model_bytes=b"not onnx at all")
    with pytest.raises(ModelInvalidError, match=f"{d / 'model.onnx'}: ONNX Runtime cannot load it"):
        load_version(tmp_path, NAME, "1")
