"""The version under attack (`Target`: model.onnx, the manifest's rule, the evaluation subset),
and `AttackRunner`, which runs one planned attack (training/evaluation/plan.py) on a prefix of
the subset: every crafted run read from or written to the `AttackCache`, checked inside the
ε-ball, judged by ONNX Runtime under the served rule and recorded with the settings that ran.

Restarts (settings.Restarts): one crafted run each, with its own seed, doubled until the doubling moves
the measured rate by at most the tolerance or the cap is reached; per example the restart best
for the attacker under the served rule is kept (accepted-and-wrong first, then misclassified).
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from app.manifest import MODEL_FILE, Manifest
from training.attacks import attack_dataset
from training.data import DEFAULT_EPS, Dataset, load_dataset, training_splits
from training.evaluation.attacks import check_ball
from training.evaluation.cache import AttackCache, cache_key
from training.evaluation.config import EvalConfig, EvaluationError
from training.evaluation.loading import load_manifest, version_path
from training.evaluation.schema import AttackResult
from training.evaluation.scoring import Judged, judge, rate_fields
from training.evaluation.settings import Planned, Restarts, settings
from training.judging import OnnxModel
from training.rule import Rule


@dataclass
class Target:
    """The version under attack and the evaluation subset."""

    vdir: Path
    manifest: Manifest
    onnx_model: OnnxModel
    x: Tensor
    y: Tensor
    eps: float
    rule: Rule

    def judge(self, x_adv: Tensor, name: str) -> Judged:
        return judge(self.onnx_model, x_adv, self.y[: len(x_adv)], self.rule, name)

    def examples(self, m: int) -> str:
        """The digest of the first m examples (images and labels): part of every cache key."""
        return hashlib.sha256(self.x[:m].numpy().tobytes() + self.y[:m].numpy().tobytes()).hexdigest()


def load_target(version_dir: str | Path, cfg: EvalConfig) -> Target:
    vdir = version_path(version_dir)
    manifest = load_manifest(vdir)
    dataset = manifest.training.dataset
    if cfg.split == "test":
        examples = load_dataset(dataset, "test", cfg.data_dir or manifest.training.training_config.get("data_dir"))
    else:
        examples = splits(manifest, cfg)[1]
    n = min(cfg.n_examples, len(examples))
    x, y = examples.images[:n], examples.labels[:n]
    if tuple(x.shape[1:]) != tuple(manifest.input.shape):
        raise EvaluationError(f"{dataset} images are {tuple(x.shape[1:])}, the model takes {manifest.input.shape}")
    eps = cfg.eps if cfg.eps is not None else DEFAULT_EPS[dataset]
    return Target(vdir, manifest, OnnxModel(vdir / MODEL_FILE), x, y, eps, Rule.of(manifest, rho=cfg.rho))


def splits(manifest: Manifest, cfg: EvalConfig) -> tuple[Dataset, Dataset]:
    """The version's training and validation splits, as its training run made them."""
    tc = manifest.training.training_config
    return _training_splits(manifest.training.dataset, cfg.data_dir or tc.get("data_dir"), int(tc.get("n_val", 5000)))


# A validation run reads the training split for its examples and again for the detectors: once.
_training_splits = functools.lru_cache(maxsize=1)(training_splits)


def run_key(t: Target, name: str, params: dict[str, Any], m: int, seed: int, eps: float) -> str:
    """A crafted run's cache key: the model, the attack's name and settings, the attacked examples, the seed, ε;
    and the rule when it is not the manifest's (`--rho`): attacks that ignore the rule still keep their best
    iterate by its verdicts, so their inputs depend on it too. (Without an override the key is what it always
    was, so earlier caches still resume.)"""
    parts: list[Any] = [t.manifest.sha256, name, params, t.examples(m), seed, eps]
    if t.rule != Rule.of(t.manifest):
        parts.append({"rule": t.rule.state()})
    return cache_key(*parts)


def maker(t: Target, name: str, model: nn.Module, attack: Any, m: int, seed: int, eps: float,
          batch_size: int) -> Callable[[], Tensor]:
    """What crafts a run: `attack` on the first m examples on the model's device, seeded, checked to stay
    within eps."""
    x, y = t.x[:m], t.y[:m]

    def make() -> Tensor:
        torch.manual_seed(seed)
        dev = next(model.parameters()).device
        x_adv = attack_dataset(model, attack, x.to(dev), y.to(dev), batch_size).cpu()
        check_ball(x_adv, x, eps, name)
        return x_adv

    return make


def made_on(cache: AttackCache, t: Target, name: str, model: nn.Module, attack: Any, m: int, seed: int,
            eps: float, batch_size: int) -> Tensor:
    """The run `maker` describes, or its inputs kept in `cache` from an earlier run of the same (`name`,
    the attack's settings, examples, seed, eps)."""
    key = run_key(t, name, settings(attack), m, seed, eps)
    return cache.made(name, key, maker(t, name, model, attack, m, seed, eps, batch_size))


class AttackRunner:
    """Runs planned attacks on prefixes of the evaluation subset and records their results, the
    inputs they kept and their outcomes (for the worst case, the detectors and the checks)."""

    def __init__(self, target: Target, cfg: EvalConfig, cache: AttackCache, say: Callable[[str], None]) -> None:
        self.t, self.cfg, self.cache, self.say = target, cfg, cache, say
        self.results: list[AttackResult] = []
        self.judged: dict[str, Judged] = {}
        self.inputs: dict[str, Tensor] = {}
        self.schedules: dict[str, list[dict[str, Any]]] = {}
        self.ran: dict[str, Any] = {}  # name -> the attack object that made its inputs
        self.cached: dict[str, list[str]] = {}  # attack -> its files in the cache (the report's `cached_inputs`)
        self.also_judged: list[Judged] = []  # other runs at the threat model's eps: in the worst case too
        self.resumed: dict[str, float] = {}  # attack -> crafting seconds of its runs read back from the cache

    def n(self, cap: int) -> int:
        return min(cap or len(self.t.x), len(self.t.x))

    def craft(self, name: str, attack: Any, on: nn.Module, m: int, params: dict[str, Any], seed: int) -> Tensor:
        """Adversarial inputs for the first m examples, from the cache when this exact run was made."""
        key = run_key(self.t, name, params, m, seed, self.t.eps)
        path = self.cache.path(name, key)
        if path is not None:
            self.cached.setdefault(name, []).append(path.name)
        make = maker(self.t, name, on, attack, m, seed, self.t.eps, self.cfg.batch_size)
        x_adv, read_back = self.cache.made_timed(name, key, make)
        self.resumed[name] = self.resumed.get(name, 0.0) + read_back
        return x_adv

    def execute(self, plan: Planned) -> None:
        """Run (or skip, when what it runs on is unavailable) one planned attack."""
        if plan.on is None:
            self.skip(plan.name, plan.kind, plan.unavailable, plan.params)
        elif plan.restarts is not None:
            self.run_restarts(plan, plan.restarts)
        else:
            m, t0 = self.n(plan.cap), time.time()
            x_adv = self.craft(plan.name, plan.attack, plan.on, m, plan.params, self.cfg.seed)
            self.record(plan, x_adv, self.t.judge(x_adv, plan.name), plan.params, time.time() - t0)

    def record(self, plan: Planned, x_adv: Tensor, j: Judged, params: dict[str, Any], seconds: float) -> None:
        """`seconds`: this run's; the recorded crafting time of runs read back from the cache is added."""
        self.judged[plan.name], self.inputs[plan.name], self.ran[plan.name] = j, x_adv, plan.attack
        seconds += self.resumed.pop(plan.name, 0.0)
        res = AttackResult(name=plan.name, kind=plan.kind,  # type: ignore[arg-type]
                           max_perturbation=float((x_adv - self.t.x[: len(x_adv)]).abs().max()),
                           seconds=round(seconds, 1), params=params, **rate_fields(j))
        self.results.append(res)
        self.say(f"{plan.name}: robust accuracy {res.robust_accuracy:.4f}, reject {res.reject_rate:.4f}, "
                 f"defended {res.defended_rate:.4f} on {j.n} ({res.seconds:.0f}s)")

    def skip(self, name: str, kind: str, reason: str, params: dict[str, Any] | None = None) -> None:
        self.results.append(AttackResult(name=name, kind=kind, status="skipped", reason=reason,  # type: ignore[arg-type]
                                         params=params or {}))
        self.say(f"{name}: skipped ({reason})")

    def run_restarts(self, plan: Planned, spec: Restarts) -> list[dict[str, Any]]:
        """The plan's attack with restarts (see the top); returns the schedule."""
        assert plan.on is not None
        t0, m, base = time.time(), self.n(plan.cap), plan.params
        x_adv: Tensor | None = None
        worst: Judged | None = None
        total, batch, schedule = 0, spec.first, list[dict[str, Any]]()
        while True:
            for r in range(total, total + batch):
                xb = self.craft(plan.name, plan.attack, plan.on, m, {**base, "restart": r}, self.cfg.seed + r)
                x_adv, worst = self.keep_worst(x_adv, worst, xb, self.t.judge(xb, plan.name))
            total += batch
            assert worst is not None  # batch >= 1
            schedule.append({"restarts": total, "robust_accuracy": float(worst.correct.mean()),
                             "defended_rate": float((~worst.broken).mean())})
            converged = len(schedule) > 1 and schedule[-2][spec.measure] - schedule[-1][spec.measure] <= spec.tolerance
            if converged or 2 * total > spec.cap:
                break
            batch = total
        assert x_adv is not None and worst is not None
        params = {**base, "restarts": total, "restart_schedule": schedule, "converged": converged,
                  "restart_tolerance": spec.tolerance, "restarts_kept_by": "served rule (accepted-and-wrong first)"}
        curve = ", ".join(f"{s['restarts']}: {s[spec.measure]:.4f}" for s in schedule)
        self.say(f"{plan.name}: {spec.measure.replace('_', ' ')} by restarts {curve} "
                 f"({'converged' if converged else 'restart cap'})")
        self.record(plan, x_adv, worst, params, time.time() - t0)
        self.schedules[plan.name] = schedule
        return schedule

    @staticmethod
    def keep_worst(x_adv: Tensor | None, worst: Judged | None, xb: Tensor, jb: Judged) -> tuple[Tensor, Judged]:
        """Per example, the input (and its outcome) best for the attacker under the served rule."""
        if x_adv is None or worst is None:
            return xb, jb
        take = worst.attacker_best(jb)
        # the merged inputs' verdicts, without running them again
        return torch.where(torch.from_numpy(take).view(-1, 1, 1, 1), xb, x_adv), worst.where(take, jb)
