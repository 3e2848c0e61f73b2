"""Every CLI default is the configuration's default: the typer options of `train` and
`evaluate` repeat the dataclasses' fields, and this test fails when one drifts."""

from __future__ import annotations

import inspect
from dataclasses import fields, is_dataclass
from typing import Any

import pytest

from training.cli import train
from training.config import TrainConfig
from training.evaluation.cli import evaluate
from training.evaluation.config import EvalConfig
from training.models import ModelConfig

# options that are not configuration fields, or whose field has another meaning; each with why
TRAIN_NOT_CONFIG = {
    "out": "run directory", "download": "an action", "download_url": "an action", "resume": "an action",
    "init_from": "the run's starting weights", "quiet": "display",
    "eps": "None = the dataset's default (training.data.DEFAULT_EPS), resolved before TrainConfig",
}
TRAIN_RENAMED = {"guard_every": ("guard", "every"), "wm_eta": ("objective", "wm_eta"),
                 "ortho_weight": ("objective", "ortho_weight"), "reject_scale": ("rejection", "scale"),
                 "reject_cos": ("rejection", "reject_cos"), "reject_margin": ("rejection", "margin"),
                 "outlier_fraction": ("rejection", "outlier_fraction"), "outlier_eps": ("rejection", "outlier_eps"),
                 "shrunk_share": ("rejection", "shrunk_share"), "reject_cones": ("rejection", "cones"),
                 "reject_attack_steps": ("rejection", "attack_steps"),
                 "cone_refresh_every": ("rejection", "cone_refresh_every")}
EVAL_NOT_CONFIG = {
    "version_dir": "an argument", "store": "where to find the version", "name": "where to find the version",
    "version": "where to find the version", "checkpoint": "an argument", "substitute": "list of paths",
    "out": "output folder", "threads": "torch's thread count, not a budget",
}


def _options(command: Any) -> dict[str, Any]:
    out = {}
    for name, p in inspect.signature(command).parameters.items():
        default = p.default
        out[name] = getattr(default, "default", default)  # typer.Option(...) objects or plain defaults
    return out


def _normal(v: Any) -> Any:
    if isinstance(v, str) and "," in v or isinstance(v, str) and v.replace(".", "", 1).isdigit():
        try:
            return tuple(float(x) for x in v.split(","))
        except ValueError:
            return tuple(x.strip() for x in v.split(","))
    if isinstance(v, tuple):
        return tuple(float(x) if isinstance(x, int | float) else x for x in v)
    return v


def _field(obj: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        obj = getattr(obj, part)
    return obj


def test_train_options_default_to_the_configuration() -> None:
    tc, mc = TrainConfig(), ModelConfig()
    checked = 0
    for name, default in _options(train).items():
        if name in TRAIN_NOT_CONFIG:
            continue
        if name in TRAIN_RENAMED:
            want = _field(tc, TRAIN_RENAMED[name])
        elif name in {f.name for f in fields(tc)} and not is_dataclass(getattr(tc, name)):
            want = getattr(tc, name)
        elif name in {f.name for f in fields(mc)}:
            want = getattr(mc, name)
        else:
            pytest.fail(f"train --{name.replace('_', '-')}: no configuration field; map it or list why not")
        assert _normal(default) == _normal(want), f"--{name.replace('_', '-')}: CLI {default!r}, config {want!r}"
        checked += 1
    assert checked >= 30


def test_evaluate_options_default_to_the_configuration() -> None:
    ec = EvalConfig()
    names = {f.name for f in fields(ec)}
    checked = 0
    for name, default in _options(evaluate).items():
        if name in EVAL_NOT_CONFIG:
            continue
        assert name in names, f"evaluate --{name.replace('_', '-')}: no EvalConfig field; map it or list why not"
        want = getattr(ec, name)
        if name == "attacks":
            want = ",".join(want)
        assert _normal(default) == _normal(want), f"--{name.replace('_', '-')}: CLI {default!r}, config {want!r}"
        checked += 1
    assert checked >= 30
