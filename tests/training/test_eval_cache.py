"""The evaluation's attack cache (training/evaluation/cache.py) and the served rule's one
construction from a manifest (training/rule.py)."""

from __future__ import annotations

import time
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


def test_a_run_read_back_from_the_cache_keeps_what_crafting_it_took(tmp_path: Path) -> None:
    cache = AttackCache(tmp_path / ".cache")
    key, made = cache_key("sha", "square", {"queries": 1000}), []

    def craft() -> torch.Tensor:
        made.append(1)
        time.sleep(0.05)
        return torch.ones(2, 1, 4, 4)

    assert cache.crafting_seconds("square", key) == 0.0  # nothing kept yet
    first = cache.made("square", key, craft)
    again = cache.made("square", key, craft)
    assert made == [1]  # crafted once, then read back
    torch.testing.assert_close(again, first)
    assert 0.05 <= cache.crafting_seconds("square", key) < 5.0
    cache.save("fgsm", key, first)  # saved without a time (as older files were): counts 0
    assert cache.crafting_seconds("fgsm", key) == 0.0


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
