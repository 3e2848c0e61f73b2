"""What `python -m training evaluate` runs: the attacks, their budgets, the sanity checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

ALL_ATTACKS = ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "square", "transfer", "adaptive", "rule", "rule-square",
               "orthogonal")
DEFAULT_SWEEP = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
SPLITS = ("test", "validation")


class EvaluationError(ValueError):
    """A user error (missing version, foreign checkpoint, bad option): one line."""


@dataclass(frozen=True)
class EvalConfig:
    """Budgets. n_* are caps on the number of test examples an attack runs on (the first
    n of the evaluation subset, so every attack sees the same images); 0 = all n_examples,
    the default, so that the worst case per example covers the whole subset."""

    eps: float | None = None  # default: the dataset's (training.data.DEFAULT_EPS)
    # the examples attacked: the test set (reports), or the validation split the training run held
    # out (choosing a variant or a checkpoint without looking at the test set)
    split: str = "test"
    n_examples: int = 1000
    attacks: tuple[str, ...] = ALL_ATTACKS
    seed: int = 0
    batch_size: int = 250
    rho: float | None = None  # override the manifest's rho (tests, what-if)
    data_dir: str | None = None
    # PGD, the paper's attack (step 0.01, 100 iterations), with restarts
    pgd_steps: int = 100
    pgd_step_size: float = 0.01
    pgd_restarts: int = 2  # the first round; doubled until it stops lowering accuracy
    pgd_restart_tolerance: float = 0.01  # "stops lowering": by at most this much
    pgd_max_restarts: int = 32
    n_pgd: int = 0  # 0 = n_examples
    # APGD (ART)
    apgd_iter: int = 100
    apgd_restarts: int = 1
    n_apgd: int = 0
    # Square (ART, queries the ONNX model)
    square_queries: int = 1000
    square_restarts: int = 1
    n_square: int = 0
    # transfer from substitutes (PGD on the substitute)
    substitutes: tuple[str, ...] = ()
    transfer_steps: int = 100
    transfer_restarts: int = 1
    n_transfer: int = 0
    # adaptive attack on the pipeline
    adaptive_k: int = 3
    adaptive_steps: int = 100
    adaptive_restarts: int = 1
    adaptive_c: float = 10.0
    adaptive_margin: float = 0.5
    n_adaptive: int = 0
    # attacks aimed at the verdict (rule_attacks.py): every wrong class, restarts doubled until
    # doubling moves the defended rate by at most rule_restart_tolerance
    rule_steps: int = 30
    rule_restarts: int = 1
    rule_max_restarts: int = 4
    rule_restart_tolerance: float = 0.01
    rule_kappa: float = 10.0
    rule_cosine_targets: int = 9  # wrong classes the second (cosine) loss tries, likeliest first
    n_rule: int = 0
    rule_square_queries: int = 1000
    n_rule_square: int = 0
    orthogonal_steps: int = 100
    n_orthogonal: int = 0
    # inputs that are not clothing: the out-of-distribution table and the distal attack
    ood: bool = True
    n_ood: int = 1000  # images per kind
    distal_eps: tuple[float, ...] = (0.1, 0.3)
    distal_steps: int = 50
    n_distal: int = 200  # images per start kind
    # sanity checks
    sanity: bool = True
    n_budget_check: int = 100
    sweep_eps: tuple[float, ...] = DEFAULT_SWEEP
    sweep_steps: int = 20
    n_sweep: int = 200
    detectors: bool = True  # the angle ratio beside max-softmax and Mahalanobis scores
    n_feature_fit: int = 0  # training images the Mahalanobis Gaussians are fit on (0 = all)
    figures: bool = True
    weights_from_onnx: bool = True  # no checkpoint: rebuild the PyTorch model from model.onnx
    device: str = "cpu"  # where PyTorch attacks run (verdicts always by ONNX Runtime on CPU)

    def __post_init__(self) -> None:
        if self.eps is not None and not (0 < self.eps <= 1 and math.isfinite(self.eps)):
            raise EvaluationError(f"eps must be in (0, 1] (L-inf on [0, 1] images), got {self.eps}")
        if self.split not in SPLITS:
            raise EvaluationError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.n_examples < 1:
            raise EvaluationError("n_examples must be >= 1")
        unknown = set(self.attacks) - set(ALL_ATTACKS)
        if unknown:
            raise EvaluationError(f"unknown attack(s) {', '.join(sorted(unknown))}; expected {', '.join(ALL_ATTACKS)}")
        if self.rho is not None and not self.rho > 0:
            raise EvaluationError("rho must be > 0")
        if any(not 0 <= e <= 1 for e in self.sweep_eps):
            raise EvaluationError("sweep eps values must be in [0, 1]")
        if self.pgd_max_restarts < self.pgd_restarts:
            raise EvaluationError("pgd_max_restarts must be >= pgd_restarts")
        if self.pgd_steps < 1 or self.pgd_restarts < 1 or self.adaptive_steps < 1:
            raise EvaluationError("attack steps and restarts must be >= 1")
