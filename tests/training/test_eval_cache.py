"""The evaluation's attack cache (training/evaluation/cache.py) and the served rule's one
construction from a manifest (training/rule.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from training.evaluation.cache import AttackCache, cache_key
from training.rule import Rule


def test_the_cache_names_its_files_after_the_attack_and_finds_them_again(tmp_path: Path) -> None:
    cache = AttackCache(tmp_path / ".cache")
    key = cache_key("sha", "transfer:baseline", {"steps": 10}, "examples", 0, 0.1)
    assert len(key) == 20 and key == cache_key("sha", "transfer:baseline", {"steps": 10}, "examples", 0, 0.1)
    assert key != cache_key("sha", "transfer:baseline", {"steps": 20}, "examples", 0, 0.1)
    assert cache.load("transfer:baseline", key) is None
    x = torch.rand(3, 1, 4, 4)
    cache.save("transfer:baseline", key, x)
    path = cache.path("transfer:baseline", key)
    assert path is not None and path.name == f"transfer_baseline-{key}.safetensors"
    assert [p.name for p in (tmp_path / ".cache").iterdir()] == [path.name]  # no temporary file left
    torch.testing.assert_close(cache.load("transfer:baseline", key), x)
    torch.testing.assert_close(cache.read(path.name), x)
    cache.save("pgd-100", cache_key("r", 1), x + 1)
    assert set(cache.files()) == {"transfer:baseline", "pgd-100"}  # the attack's own name, from the file
    assert len(cache.find("transfer:baseline")) == 1 and len(cache.inputs()["pgd-100"]) == 1
    with pytest.raises(FileNotFoundError):
        cache.read("missing-0123456789abcdef0123.safetensors")


def test_older_cache_files_without_the_name_inside_are_found_by_their_stem(tmp_path: Path) -> None:
    folder = tmp_path / ".cache"
    folder.mkdir()
    save_file({"x_adv": torch.zeros(2, 1, 4, 4)}, str(folder / "transfer_old-0123456789abcdef0123.safetensors"))
    cache = AttackCache(folder)
    assert list(cache.files()) == ["transfer_old"] and len(cache.find("transfer:old")) == 1


def test_no_cache_folder_keeps_nothing() -> None:
    cache = AttackCache(None)
    cache.save("fgsm", "0" * 20, torch.zeros(1))
    assert cache.path("fgsm", "0" * 20) is None and cache.load("fgsm", "0" * 20) is None and cache.files() == {}


def test_the_rule_of_a_manifest_is_its_statistics_and_rho() -> None:
    from app.model_store import read_manifest
    from support.bundled import BUNDLED_STORE

    manifest = read_manifest(next(Path(BUNDLED_STORE).glob("*/*/manifest.json")))
    rule = Rule.of(manifest)
    assert rule.angle_mean_deg == tuple(manifest.angle_mean_deg) and rule.rho == manifest.rho
    assert Rule.of(manifest, rho=1.0).rho == 1.0 and Rule.of(rule.state()) == rule
