"""`evaluate()`: attack a model-store version and judge every input like the service does.

- Verdicts: ONNX Runtime on the version's model.onnx, the manifest's angle statistics and
  rho, the one rule app.verdict.geodesic_verdict. So the report's numbers are what the
  service would answer for those inputs.
- Gradients (white-box attacks): the PyTorch checkpoint that produced the version, or, by
  default when none is given, the model rebuilt from model.onnx's own weights and the
  manifest's model config (training.onnx_weights). Either must match the ONNX model
  (outputs within 1e-4 on real test images; a checkpoint also its angle statistics), or
  evaluation refuses.
- Square (gradient free) queries the ONNX model itself; transfer attacks never query it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from app.manifest import MANIFEST_FILE, MODEL_FILE, Manifest
from app.verdict import Verdicts, angle_ratio, geodesic_verdict
from training.attacks import FGSM, PGD, attack_dataset
from training.checkpoint import load_checkpoint
from training.data import load_dataset
from training.evaluation.attacks import AdaptiveAttack, ArtAPGD, ArtSquare, TransferAttack, check_ball
from training.evaluation.schema import (
    AttackResult,
    Detector,
    EpsPoint,
    EpsSweep,
    GradientFreeCheck,
    ModelRef,
    PgdBudgetCheck,
    Report,
    Sanity,
    WorstCase,
)
from training.export import OnnxModel, sha256_file
from training.models import ConvNet
from training.onnx_weights import OnnxWeightsError, model_from_onnx

log = logging.getLogger("dsphere.evaluation")

PARITY_ATOL = 1e-4
ALL_ATTACKS = ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "square", "transfer", "adaptive")
DEFAULT_SWEEP = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)


class EvaluationError(ValueError):
    """A user error (missing version, foreign checkpoint, bad option): one line."""


@dataclass(frozen=True)
class EvalConfig:
    """Budgets. n_* are caps on the number of test examples an attack runs on (the first
    n of the evaluation subset, so every attack sees the same images)."""

    eps: float | None = None  # default: 0.1 (Fashion-MNIST/MNIST), 8/255 (CIFAR-10)
    n_examples: int = 1000
    attacks: tuple[str, ...] = ALL_ATTACKS
    seed: int = 0
    batch_size: int = 250
    rho: float | None = None  # override the manifest's rho (tests, what-if)
    data_dir: str | None = None
    # PGD, the paper's attack (step 0.01, 100 iterations), with restarts
    pgd_steps: int = 100
    pgd_step_size: float = 0.01
    pgd_restarts: int = 2
    n_pgd: int = 0  # 0 = n_examples
    # APGD (ART)
    apgd_iter: int = 100
    apgd_restarts: int = 1
    n_apgd: int = 500
    # Square (ART, queries the ONNX model)
    square_queries: int = 1000
    square_restarts: int = 1
    n_square: int = 200
    # transfer from substitutes (PGD on the substitute)
    substitutes: tuple[str, ...] = ()
    transfer_steps: int = 100
    transfer_restarts: int = 1
    n_transfer: int = 500
    # adaptive attack on the pipeline
    adaptive_k: int = 3
    adaptive_steps: int = 100
    adaptive_restarts: int = 1
    adaptive_c: float = 10.0
    adaptive_margin: float = 0.5
    n_adaptive: int = 500
    # sanity checks
    sanity: bool = True
    n_budget_check: int = 100
    sweep_eps: tuple[float, ...] = DEFAULT_SWEEP
    sweep_steps: int = 20
    n_sweep: int = 200
    figures: bool = True
    weights_from_onnx: bool = True  # no checkpoint: rebuild the PyTorch model from model.onnx
    device: str = "cpu"  # where PyTorch attacks run (verdicts always by ONNX Runtime on CPU)

    def __post_init__(self) -> None:
        if self.eps is not None and not (0 < self.eps <= 1 and math.isfinite(self.eps)):
            raise EvaluationError(f"eps must be in (0, 1] (L-inf on [0, 1] images), got {self.eps}")
        if self.n_examples < 1:
            raise EvaluationError("n_examples must be >= 1")
        unknown = set(self.attacks) - set(ALL_ATTACKS)
        if unknown:
            raise EvaluationError(f"unknown attack(s) {', '.join(sorted(unknown))}; expected {', '.join(ALL_ATTACKS)}")
        if self.rho is not None and not self.rho > 0:
            raise EvaluationError("rho must be > 0")
        if any(not 0 <= e <= 1 for e in self.sweep_eps):
            raise EvaluationError("sweep eps values must be in [0, 1]")
        if self.pgd_steps < 1 or self.pgd_restarts < 1 or self.adaptive_steps < 1:
            raise EvaluationError("attack steps and restarts must be >= 1")


# ----------------------------------------------------------------------------- loading

def resolve_version(path: str | Path | None, store: str | Path = "model_store", name: str | None = None,
                    version: str | None = None) -> Path:
    """A version directory from a path, or from store/name/version."""
    if path is not None:
        d = Path(path)
    else:
        if not name or not version:
            raise EvaluationError("give the version directory, or --name and --version (with --store)")
        d = Path(store) / name / version
    if not d.is_dir():
        hint = ""
        parent = d.parent
        if parent.is_dir():
            have = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
            hint = f" (available: {', '.join(have) or 'none'})"
        raise FileNotFoundError(f"model-store version {d} does not exist{hint}")
    for f in (MODEL_FILE, MANIFEST_FILE):
        if not (d / f).is_file():
            raise FileNotFoundError(f"{d} is not a model-store version: {f} missing")
    return d


def load_manifest(version_dir: Path) -> Manifest:
    try:
        m = Manifest.model_validate_json((version_dir / MANIFEST_FILE).read_text())
    except ValueError as e:
        first = str(e).splitlines()[0]
        raise EvaluationError(f"{version_dir / MANIFEST_FILE} is not a valid manifest: {first}") from None
    digest = sha256_file(version_dir / MODEL_FILE)
    if digest != m.sha256:
        raise EvaluationError(f"{version_dir / MODEL_FILE} has sha256 {digest[:12]}..., the manifest says "
                              f"{m.sha256[:12]}...; refusing a tampered or mismatched version")
    return m


def check_checkpoint(model: ConvNet, ckpt: Any, manifest: Manifest, onnx_model: OnnxModel, x: Tensor,
                     checkpoint: str | Path) -> float:
    """Refuse a checkpoint that did not produce this version."""
    if tuple(model.config.input_shape) != tuple(manifest.input.shape):
        raise EvaluationError(f"checkpoint {checkpoint} takes inputs {model.config.input_shape}, the version "
                              f"{tuple(manifest.input.shape)}: it does not belong to this version")
    if ckpt is not None and ckpt.angle_stats is not None:
        d = max(np.abs(np.subtract(ckpt.angle_stats.mean_deg, manifest.angle_mean_deg)).max(),
                np.abs(np.subtract(ckpt.angle_stats.std_deg, manifest.angle_std_deg)).max())
        if d > 1e-6:
            raise EvaluationError(f"checkpoint {checkpoint} has other angle statistics than version "
                                  f"{manifest.name}/{manifest.version}: it does not belong to this version")
    model.eval()
    with torch.no_grad():
        logits, cosines = model(x)
    o_logits, o_cos = onnx_model(x)
    diff = max(float(np.abs(o_logits - logits.double().numpy()).max()),
               float(np.abs(o_cos - cosines.double().numpy()).max()))
    if not diff <= PARITY_ATOL:
        raise EvaluationError(f"checkpoint {checkpoint} does not belong to version {manifest.name}/"
                              f"{manifest.version}: its outputs differ from model.onnx by {diff:.2e} (> {PARITY_ATOL})")
    return diff


class OnnxLogits(nn.Module):
    """ONNX Runtime as a forward-only torch module (logits): lets ART's score-based Square
    attack query the deployed model itself. No gradients flow through it."""

    def __init__(self, onnx_model: OnnxModel, num_classes: int) -> None:
        super().__init__()
        self.onnx_model = onnx_model
        self.num_classes = num_classes
        self._dummy = nn.Parameter(torch.zeros(()), requires_grad=False)  # ART wants parameters

    def forward(self, x: Tensor) -> Tensor:
        logits, _ = self.onnx_model(x.detach().cpu())
        return torch.from_numpy(logits.astype(np.float32))


# ----------------------------------------------------------------------------- rates

@dataclass
class Judged:
    """Per-example outcome of an attack (ONNX Runtime verdicts)."""

    name: str
    correct: np.ndarray  # (n,) bool: predicted label == true label
    accepted: np.ndarray  # (n,) bool at rho
    accepted_rho1: np.ndarray  # (n,) bool at rho = 1
    ratio: np.ndarray  # (n,) angle ratio theta / (theta* + theta_sigma)

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def broken(self) -> np.ndarray:
        return self.accepted & ~self.correct


def judge(onnx_model: OnnxModel, x: Tensor, y: Tensor, mean: list[float], std: list[float], rho: float,
          name: str) -> Judged:
    logits, cosines = onnx_model(x)
    v: Verdicts = geodesic_verdict(logits, cosines, mean, std, rho)
    v1 = geodesic_verdict(logits, cosines, mean, std, 1.0)
    return Judged(name, v.labels == y.cpu().numpy(), v.accepted, v1.accepted, angle_ratio(logits, cosines, mean, std))


def rate_fields(j: Judged) -> dict[str, Any]:
    c, a = j.correct, j.accepted
    return dict(
        n_examples=j.n,
        robust_accuracy=float(c.mean()),
        reject_rate=float((~a).mean()),
        defended_rate=float((~a | c).mean()),
        success_rate=float((a & ~c).mean()),
        accepted_accuracy=float(c[a].mean()) if a.any() else None,
        rho1_reject_rate=float((~j.accepted_rho1).mean()),
        rho1_defended_rate=float((~j.accepted_rho1 | c).mean()),
    )


def worst_case(judged: list[Judged], n: int | None = None, note: str = "") -> WorstCase:
    """Over the first n examples (default: those every attack covered)."""
    m = min(j.n for j in judged) if n is None else n
    broken = np.zeros(m, bool)
    wrong = np.zeros(m, bool)
    for j in judged:
        k = min(m, j.n)
        broken[:k] |= j.broken[:k]
        wrong[:k] |= ~j.correct[:k]
    return WorstCase(n_examples=m, attacks=[j.name for j in judged], robust_accuracy=float((~wrong).mean()),
                     defended_rate=float((~broken).mean()), success_rate=float(broken.mean()), note=note)


def roc_auc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie): area under the ROC of 'score > threshold'."""
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    allv = np.concatenate([neg, pos])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks for ties
    i = 0
    while i < len(sorted_v):
        j = i
        while j + 1 < len(sorted_v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = ranks[len(neg):].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


# ----------------------------------------------------------------------------- evaluate

@dataclass
class Outcome:
    report: Report
    judged: dict[str, Judged] = field(default_factory=dict)
    clean: Judged | None = None
    sweep: list[tuple[float, Judged]] = field(default_factory=list)


def evaluate(version_dir: str | Path, checkpoint: str | Path | None, cfg: EvalConfig, out: str | Path | None = None,
             command: str = "", progress: Callable[[str], None] | None = None) -> Outcome:
    """Run the configured attacks; write report.json, report.md and figures into `out`."""
    t_start = time.time()
    logging.getLogger("art").setLevel(logging.WARNING)
    say = progress or (lambda s: log.info("%s", s))
    vdir = resolve_version(version_dir)
    manifest = load_manifest(vdir)
    dataset = manifest.training.dataset
    eps = cfg.eps if cfg.eps is not None else (8 / 255 if dataset == "cifar10" else 0.1)
    rho = cfg.rho if cfg.rho is not None else manifest.rho
    mean, std = list(manifest.angle_mean_deg), list(manifest.angle_std_deg)
    onnx_model = OnnxModel(vdir / MODEL_FILE)

    data_dir = cfg.data_dir or manifest.training.training_config.get("data_dir")
    test = load_dataset(dataset, "test", data_dir)
    n = min(cfg.n_examples, len(test))
    x, y = test.images[:n], test.labels[:n]
    if tuple(x.shape[1:]) != tuple(manifest.input.shape):
        raise EvaluationError(f"{dataset} images are {tuple(x.shape[1:])}, the model takes {manifest.input.shape}")

    from training.train import resolve_device

    dev = resolve_device(cfg.device)
    model: ConvNet | None = None
    parity: float | None = None
    weights_source: str | None = None
    no_ckpt = "no --checkpoint given (white-box attacks need the PyTorch model's gradients)"
    warnings: list[str] = []
    if checkpoint is not None:
        model, ckpt = load_checkpoint(checkpoint)
        parity = check_checkpoint(model, ckpt, manifest, onnx_model, x[:16], checkpoint)
        say(f"checkpoint {checkpoint} matches model.onnx (max abs diff {parity:.1e})")
        weights_source = "checkpoint"
    elif cfg.weights_from_onnx:
        try:
            model = model_from_onnx(vdir / MODEL_FILE, manifest.training.model_config_)
        except OnnxWeightsError as e:
            no_ckpt = f"no --checkpoint given and {e}"
            warnings.append(no_ckpt)
        else:
            parity = check_checkpoint(model, None, manifest, onnx_model, x[:16], vdir / MODEL_FILE)
            say(f"white-box attacks on the PyTorch model rebuilt from model.onnx (max abs diff {parity:.1e})")
            weights_source = "model.onnx"
    if model is not None:
        model.to(dev)
    attacks: list[AttackResult] = []
    judged: dict[str, Judged] = {}

    clean = judge(onnx_model, x, y, mean, std, rho, "clean")
    cr = rate_fields(clean)
    say(f"clean: accuracy {cr['robust_accuracy']:.4f}, reject {cr['reject_rate']:.4f} at rho {rho:.3f}")

    def run(name: str, kind: str, attack: Callable[[nn.Module, Tensor, Tensor], Tensor], target: nn.Module | None,
            n_att: int, params: dict[str, Any]) -> Tensor | None:
        m = min(n_att or n, n)
        torch.manual_seed(cfg.seed)
        t0 = time.time()
        on = next(target.parameters()).device if target is not None else torch.device("cpu")
        x_adv = attack_dataset(target, attack, x[:m].to(on), y[:m].to(on),  # type: ignore[arg-type]
                               batch_size=cfg.batch_size).cpu()
        dmax = check_ball(x_adv, x[:m], eps, name)
        j = judge(onnx_model, x_adv, y[:m], mean, std, rho, name)
        judged[name] = j
        res = AttackResult(name=name, kind=kind, max_perturbation=dmax, seconds=round(time.time() - t0, 1),
                           params={"eps": eps, **params}, **rate_fields(j))  # type: ignore[arg-type]
        attacks.append(res)
        say(f"{name}: robust accuracy {res.robust_accuracy:.4f}, reject {res.reject_rate:.4f}, "
            f"defended {res.defended_rate:.4f} on {m} ({res.seconds:.0f}s)")
        return x_adv

    def skip(name: str, kind: str, reason: str, params: dict[str, Any] | None = None) -> None:
        attacks.append(AttackResult(name=name, kind=kind, status="skipped", reason=reason, params=params or {}))
        say(f"{name}: skipped ({reason})")

    want = set(cfg.attacks)
    if "fgsm" in want:
        if model is not None:
            run("fgsm", "white-box", FGSM(eps), model, n, {"step_size": eps, "random_start": False})
        else:
            skip("fgsm", "white-box", no_ckpt)
    pgd_params = {"steps": cfg.pgd_steps, "step_size": cfg.pgd_step_size, "restarts": cfg.pgd_restarts,
                  "random_start": True, "loss": "cross_entropy"}
    pgd_name = f"pgd-{cfg.pgd_steps}"
    if "pgd" in want:
        if model is not None:
            run(pgd_name, "white-box", PGD(eps, steps=cfg.pgd_steps, step_size=cfg.pgd_step_size,
                                           restarts=cfg.pgd_restarts), model, cfg.n_pgd, pgd_params)
        else:
            skip(pgd_name, "white-box", no_ckpt, pgd_params)
    for loss, short in (("cross_entropy", "apgd-ce"), ("difference_logits_ratio", "apgd-dlr")):
        if short in want:
            params = {"max_iter": cfg.apgd_iter, "restarts": cfg.apgd_restarts, "loss": loss, "library": "ART"}
            if model is not None:
                run(short, "white-box", ArtAPGD(eps, loss, cfg.apgd_iter, cfg.apgd_restarts, cfg.batch_size),
                    model, cfg.n_apgd, params)
            else:
                skip(short, "white-box", no_ckpt, params)
    if "square" in want:
        params = {"max_queries": cfg.square_queries, "restarts": cfg.square_restarts, "p_init": 0.8,
                  "library": "ART", "queries": "model.onnx (ONNX Runtime)"}
        sq_model = OnnxLogits(onnx_model, len(manifest.class_names))
        run("square", "black-box", ArtSquare(eps, cfg.square_queries, cfg.square_restarts,
                                             batch_size=cfg.batch_size), sq_model, cfg.n_square, params)
    if "transfer" in want:
        if not cfg.substitutes:
            skip("transfer", "transfer", "no --substitute checkpoints given (train independent substitutes, "
                 "e.g. a baseline CNN and a D-SphereNet with another seed, and pass them)")
        for sub_path in cfg.substitutes:
            sub, sub_ckpt = load_checkpoint(sub_path)
            sub.to(dev)
            if tuple(sub.config.input_shape) != tuple(manifest.input.shape):
                raise EvaluationError(f"substitute {sub_path} takes inputs {sub.config.input_shape}, "
                                      f"not {tuple(manifest.input.shape)}")
            label = _run_label(sub_path)
            while f"transfer:{label}" in judged:
                label += "'"
            if model is not None and _same_weights(sub, model):
                warnings.append(f"substitute {sub_path} has the target's weights: that is a white-box attack")
            step = 2.5 * eps / cfg.transfer_steps
            params = {"substitute": str(sub_path), "substitute_arch": sub.config.arch,
                      "substitute_mode": sub_ckpt.training_config.get("mode"),
                      "substitute_seed": sub_ckpt.training_config.get("seed"),
                      "inner": "pgd", "steps": cfg.transfer_steps, "step_size": step,
                      "restarts": cfg.transfer_restarts}
            inner = PGD(eps, steps=cfg.transfer_steps, step_size=step, restarts=cfg.transfer_restarts)
            run(f"transfer:{label}", "transfer", TransferAttack(sub.eval(), inner), sub, cfg.n_transfer, params)
    adv_params = {"k": cfg.adaptive_k, "steps": cfg.adaptive_steps, "restarts": cfg.adaptive_restarts,
                  "step_size": 2.5 * eps / cfg.adaptive_steps, "c": cfg.adaptive_c, "margin": cfg.adaptive_margin,
                  "knows": "angle statistics and rho", "rho": rho,
                  "loss": "-cos(x, W_t) + c relu(max_{j!=t} z_j - z_t + margin), best over k targets"}
    if "adaptive" in want:
        if model is not None:
            run("adaptive", "adaptive", AdaptiveAttack(eps, tuple(mean), tuple(std), rho, cfg.adaptive_k,
                                                       cfg.adaptive_steps, cfg.adaptive_restarts, None,
                                                       cfg.adaptive_c, cfg.adaptive_margin),
                model, cfg.n_adaptive, adv_params)
        else:
            skip("adaptive", "adaptive", no_ckpt, adv_params)

    done = [clean] + list(judged.values())
    wc = worst_case(done, note="over the examples every attack ran on (a prefix of the evaluation subset)")
    wc_all = worst_case(done, n=n, note="over all evaluated examples; each counted against the attacks that ran on "
                                        "it (an upper bound on robustness)")

    sanity = Sanity()
    sweep_points: list[tuple[float, Judged]] = []
    if cfg.sanity and model is not None:
        sanity.pgd_budget = _budget_check(model, onnx_model, x, y, eps, mean, std, rho, cfg, judged.get(pgd_name), say)
        sanity.eps_sweep, sweep_points = _eps_sweep(model, onnx_model, x, y, mean, std, rho, cfg, say)
    if "square" in judged:
        sanity.gradient_free = _gradient_free_check(judged)
    for chk in (sanity.pgd_budget, sanity.eps_sweep, sanity.gradient_free):
        if chk is not None and not chk.ok:
            warnings.append(chk.verdict)

    detectors = []
    for name in (pgd_name, "adaptive"):
        if name in judged:
            detectors.append(_detector(clean, judged[name], rho))

    report = Report(
        created_at=datetime.now(UTC), command=command,
        model=ModelRef(name=manifest.name, version=manifest.version, sha256=manifest.sha256, path=str(vdir),
                       dataset=dataset, checkpoint=str(checkpoint) if checkpoint else None,
                       white_box_weights=weights_source, checkpoint_parity_max_abs_diff=parity),
        eps=eps, n_examples=n, rho=rho, rho_source="manifest" if cfg.rho is None else "override",
        angle_mean_deg=mean, angle_std_deg=std,
        clean_accuracy=cr["robust_accuracy"], clean_reject_rate=cr["reject_rate"],
        clean_accepted_accuracy=cr["accepted_accuracy"] or 0.0, clean_defended_rate=cr["defended_rate"],
        clean_rho1_reject_rate=cr["rho1_reject_rate"],
        attacks=attacks, worst_case=wc, worst_case_all_examples=wc_all, detectors=detectors, sanity=sanity,
        warnings=warnings,
    )
    outcome = Outcome(report, judged, clean, sweep_points)
    outcome.report.seconds = round(time.time() - t_start, 1)
    if out is not None:
        write_outputs(outcome, Path(out), cfg.figures)
    return outcome


def write_outputs(outcome: Outcome, out: Path, figures: bool = True) -> None:
    from training.evaluation.markdown import render_markdown

    out.mkdir(parents=True, exist_ok=True)
    if figures:
        from training.evaluation.figures import write_figures

        outcome.report.figures = write_figures(outcome, out)
    (out / "report.json").write_text(outcome.report.model_dump_json(indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(outcome.report))


def _attack_on(model: nn.Module, attack: Callable[[nn.Module, Tensor, Tensor], Tensor], x: Tensor, y: Tensor,
               batch_size: int) -> Tensor:
    """attack_dataset on the model's device; the result back on the CPU."""
    dev = next(model.parameters()).device
    return attack_dataset(model, attack, x.to(dev), y.to(dev), batch_size).cpu()


def _run_label(path: str | Path) -> str:
    """A checkpoint's name for the report: the nearest folder above it that is not a generic
    one (runs/reproduce/cells/baseline-fgsm/run/final -> baseline-fgsm)."""
    generic = {"final", "last", "run", "runs", "checkpoints", ""}
    p = Path(path)
    for part in (p, *p.parents):
        if part.name not in generic:
            return part.name
    return p.name or "substitute"


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def _budget_check(model: ConvNet, onnx_model: OnnxModel, x: Tensor, y: Tensor, eps: float, mean: list[float],
                  std: list[float], rho: float, cfg: EvalConfig, base: Judged | None,
                  say: Callable[[str], None]) -> PgdBudgetCheck:
    """Doubling PGD's steps and restarts must not lower robust accuracy much (else the
    base attack had not converged and its numbers overstate robustness)."""
    m = min(cfg.n_budget_check, len(x), base.n if base is not None else len(x))
    base_p = {"steps": cfg.pgd_steps, "step_size": cfg.pgd_step_size, "restarts": cfg.pgd_restarts}
    dbl_p = {"steps": 2 * cfg.pgd_steps, "step_size": cfg.pgd_step_size, "restarts": 2 * cfg.pgd_restarts}
    t0 = time.time()
    if base is None:
        torch.manual_seed(cfg.seed)
        xb = _attack_on(model, PGD(eps, **base_p), x[:m], y[:m], cfg.batch_size)  # type: ignore[arg-type]
        check_ball(xb, x[:m], eps, "pgd (budget check)")
        base = judge(onnx_model, xb, y[:m], mean, std, rho, "pgd-base")
    torch.manual_seed(cfg.seed + 1)
    xd = _attack_on(model, PGD(eps, **dbl_p), x[:m], y[:m], cfg.batch_size)  # type: ignore[arg-type]
    check_ball(xd, x[:m], eps, "pgd (doubled)")
    dbl = judge(onnx_model, xd, y[:m], mean, std, rho, "pgd-doubled")
    b_acc, d_acc = float(base.correct[:m].mean()), float(dbl.correct.mean())
    b_def = float((~base.accepted[:m] | base.correct[:m]).mean())
    d_def = float((~dbl.accepted | dbl.correct).mean())
    tol = max(0.02, 2.0 / m)
    ok = d_acc >= b_acc - tol
    verdict = (f"ok: doubling PGD's steps and restarts changed robust accuracy {b_acc:.3f} -> {d_acc:.3f} "
               f"(tolerance {tol:.3f})" if ok else
               f"PGD had not converged: doubling its steps and restarts lowered robust accuracy {b_acc:.3f} -> "
               f"{d_acc:.3f}; the PGD numbers overstate robustness")
    say(f"budget check: {verdict} ({time.time() - t0:.0f}s)")
    return PgdBudgetCheck(n_examples=m, base=base_p, doubled=dbl_p, base_robust_accuracy=b_acc,
                          doubled_robust_accuracy=d_acc, base_defended_rate=b_def, doubled_defended_rate=d_def,
                          ok=ok, verdict=verdict)


def _eps_sweep(model: ConvNet, onnx_model: OnnxModel, x: Tensor, y: Tensor, mean: list[float], std: list[float],
               rho: float, cfg: EvalConfig, say: Callable[[str], None]) -> tuple[EpsSweep, list[tuple[float, Judged]]]:
    """Accuracy under PGD must fall to ~0 as eps grows (at eps = 0.5 any image can be
    turned into uniform gray); if it does not, gradients are masked."""
    m = min(cfg.n_sweep, len(x))
    points, judged = [], []
    t0 = time.time()
    for e in sorted(set(cfg.sweep_eps)):
        if e == 0:
            xa = x[:m]
        else:
            torch.manual_seed(cfg.seed)
            xa = _attack_on(model, PGD(e, steps=cfg.sweep_steps, step_size=2.5 * e / cfg.sweep_steps),
                            x[:m], y[:m], cfg.batch_size)
            check_ball(xa, x[:m], e, f"pgd sweep eps={e}")
        j = judge(onnx_model, xa, y[:m], mean, std, rho, f"eps={e}")
        judged.append((e, j))
        r = rate_fields(j)
        points.append(EpsPoint(eps=e, robust_accuracy=r["robust_accuracy"], reject_rate=r["reject_rate"],
                               defended_rate=r["defended_rate"]))
    accs = [p.robust_accuracy for p in points]
    top = points[-1]
    monotone = all(b <= a + max(0.02, 2.0 / m) for a, b in zip(accs, accs[1:], strict=False))
    ok = (top.eps < 0.3 or top.robust_accuracy <= 0.05) and monotone
    if ok:
        verdict = f"ok: PGD accuracy falls from {accs[0]:.3f} to {top.robust_accuracy:.3f} at eps {top.eps}"
    elif not monotone:
        verdict = ("gradient masking suspected: accuracy does not decrease monotonically with eps "
                   f"({', '.join(f'{a:.3f}' for a in accs)})")
    else:
        verdict = (f"gradient masking suspected: PGD accuracy is still {top.robust_accuracy:.3f} at eps {top.eps} "
                   "(an honest attack reaches ~0)")
    say(f"eps sweep: {verdict} ({time.time() - t0:.0f}s)")
    attack = {"name": "pgd", "steps": cfg.sweep_steps, "step_size": "2.5 eps / steps", "restarts": 1}
    return EpsSweep(attack=attack, n_examples=m, points=points, ok=ok, verdict=verdict), judged


def _gradient_free_check(judged: dict[str, Judged]) -> GradientFreeCheck:
    sq = judged["square"]
    wb = {k: v for k, v in judged.items() if k == "fgsm" or k.startswith("pgd") or k.startswith("apgd")}
    if not wb:
        return GradientFreeCheck(n_examples=sq.n, square_robust_accuracy=float(sq.correct.mean()),
                                 best_white_box_robust_accuracy=None, best_white_box=None, ok=True,
                                 verdict="no white-box attack to compare Square with")
    m = min([sq.n] + [v.n for v in wb.values()])
    sq_acc = float(sq.correct[:m].mean())
    best_name, best = min(((k, float(v.correct[:m].mean())) for k, v in wb.items()), key=lambda t: t[1])
    tol = max(0.02, 2.0 / m)
    ok = sq_acc >= best - tol
    verdict = (f"ok: gradient-free Square ({sq_acc:.3f}) is not stronger than {best_name} ({best:.3f})" if ok else
               f"gradient masking: gradient-free Square reaches robust accuracy {sq_acc:.3f}, below the best "
               f"white-box attack {best_name} ({best:.3f}); the white-box numbers overstate robustness")
    return GradientFreeCheck(n_examples=m, square_robust_accuracy=sq_acc, best_white_box_robust_accuracy=best,
                             best_white_box=best_name, ok=ok, verdict=verdict)


def _detector(clean: Judged, adv: Judged, rho: float) -> Detector:
    """Negatives: all clean inputs. Positives: the attacked inputs the attack misclassified
    (those the detector must catch); all attacked inputs if none was misclassified."""
    pos = adv.ratio[~adv.correct] if (~adv.correct).any() else adv.ratio
    neg = clean.ratio
    return Detector(attack=adv.name, n_clean=len(neg), n_adversarial=len(pos), auc=roc_auc(neg, pos),
                    clean_reject_at_rho=float((neg > rho).mean()), adversarial_catch_at_rho=float((pos > rho).mean()),
                    clean_reject_at_rho1=float((neg > 1).mean()), adversarial_catch_at_rho1=float((pos > 1).mean()))
