"""Which attacks an evaluation runs, with which settings: one `Planned` per attack, the attack
object itself (a frozen dataclass) built from EvalConfig here and nowhere else, and what it runs
on. The report's parameters of an attack are settings.settings(attack), the fields of the
object that ran, serialized: a budget is never typed twice.

Order: FGSM, PGD, APGD-CE, APGD-DLR (white-box); Square on model.onnx, transfer from each
substitute, the adaptive attack; then the attacks on the verdict (rule_attacks.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from training.attacks import FGSM, PGD
from training.checkpoint import load_checkpoint
from training.evaluation.attacks import AdaptiveAttack, ArtAPGD, ArtSquare, TransferAttack
from training.evaluation.config import EvalConfig, EvaluationError
from training.evaluation.loading import OnnxLogits, WhiteBox
from training.evaluation.rule_attacks import (
    OrthogonalPGD,
    RuleAttack,
    RuleScores,
    RuleSquare,
)
from training.evaluation.runner import Target
from training.evaluation.served import ServedOutputs, ServedScore
from training.evaluation.settings import JUDGED, Planned, Restarts

ONNX_QUERIES = {"queries": "model.onnx (ONNX Runtime)"}


def white_box(cfg: EvalConfig, t: Target, wb: WhiteBox) -> list[Planned]:
    want, eps, on = set(cfg.attacks), t.eps, wb.model
    out = [Planned("fgsm", "white-box", FGSM(eps), on, 0, unavailable=wb.unavailable)] if "fgsm" in want else []
    if "pgd" in want:
        pgd = PGD(eps, steps=cfg.pgd_steps, step_size=cfg.pgd_step_size, restarts=1,
                  score_fn=ServedScore(ServedOutputs(t.onnx_model), t.rule))
        out.append(Planned(f"pgd-{cfg.pgd_steps}", "white-box", pgd, on, cfg.n_pgd, Restarts(
            cfg.pgd_restarts, cfg.pgd_max_restarts, cfg.pgd_restart_tolerance, "robust_accuracy"), JUDGED,
            wb.unavailable))
    for loss, short in (("cross_entropy", "apgd-ce"), ("difference_logits_ratio", "apgd-dlr")):
        if short in want:
            apgd = ArtAPGD(eps, loss, cfg.apgd_iter, cfg.apgd_restarts, cfg.batch_size)
            out.append(Planned(short, "white-box", apgd, on, cfg.n_apgd, unavailable=wb.unavailable))
    return out


def black_box(cfg: EvalConfig, t: Target, wb: WhiteBox, warnings: list[str]) -> list[Planned]:
    """Square on model.onnx, transfer from each substitute, and the adaptive attack."""
    want, out = set(cfg.attacks), list[Planned]()
    if "square" in want:
        square = ArtSquare(t.eps, cfg.square_queries, cfg.square_restarts, batch_size=cfg.batch_size)
        out.append(Planned("square", "black-box", square, OnnxLogits(t.onnx_model, t.manifest.num_classes),
                           cfg.n_square, notes=ONNX_QUERIES))
    if "transfer" in want:
        if not cfg.substitutes:
            out.append(Planned("transfer", "transfer", None, None, unavailable=(
                "no --substitute checkpoints given (train independent substitutes, e.g. a baseline CNN and a "
                "D-SphereNet with another seed, and pass them)")))
        for sub_path in cfg.substitutes:
            out.append(_transfer(cfg, t, wb, sub_path, [p.name for p in out], warnings))
    if "adaptive" in want:
        adaptive = AdaptiveAttack(t.eps, t.rule, cfg.adaptive_k, cfg.adaptive_steps, cfg.adaptive_restarts, None,
                                  cfg.adaptive_c, cfg.adaptive_margin, judge=ServedOutputs(t.onnx_model))
        out.append(Planned("adaptive", "adaptive", adaptive, wb.model, cfg.n_adaptive, notes=JUDGED,
                           unavailable=wb.unavailable))
    return out


def on_the_verdict(cfg: EvalConfig, t: Target, wb: WhiteBox) -> list[Planned]:
    """The attacks aimed at the verdict (rule_attacks.py): they know the angle statistics and ρ."""
    want, rule, out = set(cfg.attacks), t.rule, list[Planned]()
    served = ServedOutputs(t.onnx_model)
    if "rule" in want:
        attack = RuleAttack(t.eps, rule, cfg.rule_steps, 1, cfg.rule_kappa, cosine_targets=cfg.rule_cosine_targets,
                            judge=served)
        out.append(Planned("rule", "adaptive", attack, wb.model, cfg.n_rule, Restarts(
            cfg.rule_restarts, cfg.rule_max_restarts, cfg.rule_restart_tolerance, "defended_rate"), JUDGED,
            wb.unavailable))
    if "orthogonal" in want:
        out.append(Planned("orthogonal", "adaptive", OrthogonalPGD(t.eps, rule, cfg.orthogonal_steps, judge=served),
                           wb.model, cfg.n_orthogonal, notes=JUDGED, unavailable=wb.unavailable))
    if "rule-square" in want:
        square = RuleSquare(t.eps, rule, cfg.rule_square_queries, kappa=cfg.rule_kappa)
        scores = RuleScores(t.onnx_model, rule, t.manifest.num_classes, cfg.rule_kappa)
        out.append(Planned("rule-square", "black-box", square, scores, cfg.n_rule_square, notes=ONNX_QUERIES))
    return out


def _transfer(cfg: EvalConfig, t: Target, wb: WhiteBox, sub_path: str, taken: list[str],
              warnings: list[str]) -> Planned:
    from training.distributed import resolve_device

    sub, sub_ckpt = load_checkpoint(sub_path)
    sub.to(resolve_device(cfg.device))
    if tuple(sub.config.input_shape) != tuple(t.manifest.input.shape):
        raise EvaluationError(f"substitute {sub_path} takes inputs {sub.config.input_shape}, "
                              f"not {tuple(t.manifest.input.shape)}")
    label = run_label(sub_path)
    while f"transfer:{label}" in taken:
        label += "'"
    if wb.model is not None and _same_weights(sub, wb.model):
        warnings.append(f"substitute {sub_path} has the target's weights: that is a white-box attack")
    notes = {"substitute": str(sub_path), "substitute_arch": sub.config.arch,
             "substitute_mode": sub_ckpt.training_config.get("mode"),
             "substitute_seed": sub_ckpt.training_config.get("seed")}
    inner = PGD(t.eps, steps=cfg.transfer_steps, restarts=cfg.transfer_restarts)
    return Planned(f"transfer:{label}", "transfer", TransferAttack(sub.eval(), inner), sub, cfg.n_transfer,
                   notes=notes)


def run_label(path: str | Path) -> str:
    """A checkpoint's name for the report: the nearest folder above it that is not a generic
    one (runs/reproduce/cells/baseline-fgsm/run/final -> baseline-fgsm)."""
    generic = {"final", "last", "best", "run", "runs", "checkpoints", ""}
    p = Path(path)
    for part in (p, *p.parents):
        if part.name not in generic:
            return part.name
    return p.name or "substitute"


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)
