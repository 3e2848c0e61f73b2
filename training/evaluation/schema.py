"""report.json of `python -m training evaluate`: one pydantic schema, round-trip tested.

Rates (all fractions of the attacked examples, verdicts by ONNX Runtime + app.verdict):
- robust_accuracy: predicted label == true label, ignoring rejection;
- reject_rate: the verdict rejects the input (theta > rho (theta* + theta_sigma));
- defended_rate: rejected OR correctly classified;
- success_rate: accepted AND wrong (= 1 - defended_rate): the attacker's win.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

REPORT_SCHEMA_VERSION: Final = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRef(_Model):
    name: str
    version: str
    sha256: str = Field(description="sha256 of model.onnx (checked against the manifest)")
    path: str
    dataset: str
    checkpoint: str | None = None
    white_box_weights: Literal["checkpoint", "model.onnx"] | None = Field(
        None, description="where the white-box attacks' PyTorch weights came from (None: no white-box attacks)")
    checkpoint_parity_max_abs_diff: float | None = Field(
        None, description="max |ONNX - PyTorch| over logits and cosines on a few test images")


class AttackResult(_Model):
    name: str
    kind: Literal["white-box", "black-box", "transfer", "adaptive", "clean"]
    status: Literal["ok", "skipped"] = "ok"
    reason: str | None = Field(None, description="why the attack was skipped")
    n_examples: int = 0
    robust_accuracy: float | None = None
    reject_rate: float | None = None
    defended_rate: float | None = None
    success_rate: float | None = Field(None, description="accepted and wrong")
    accepted_accuracy: float | None = None
    rho1_reject_rate: float | None = Field(None, description="reject rate at the paper's rho = 1")
    rho1_defended_rate: float | None = None
    max_perturbation: float | None = Field(None, description="max |x_adv - x| (L-inf), checked <= eps")
    seconds: float = Field(0.0, description="crafting and judging; runs read back from the cache count at their "
                           "recorded crafting time (0 for files made before it was recorded)")
    params: dict[str, Any] = Field(default_factory=dict)


class WorstCase(_Model):
    """Per example, the worst over the attacks (and the clean input): broken if ANY attack
    made it accepted-and-wrong; not robust if ANY attack made it misclassified."""

    n_examples: int
    attacks: list[str]
    robust_accuracy: float
    defended_rate: float
    success_rate: float
    note: str = ""
    # per example, in order (the first n_examples of the split): "1" where broken (accepted and wrong
    # under some attack) / wrong (misclassified under some attack); "" in reports made before they were
    # recorded. What a paired comparison of two models on the same images needs (compare.py).
    broken: str = ""
    wrong: str = ""


class PgdBudgetCheck(_Model):
    n_examples: int
    base: dict[str, Any]
    doubled: dict[str, Any]
    base_robust_accuracy: float
    doubled_robust_accuracy: float
    base_defended_rate: float
    doubled_defended_rate: float
    ok: bool
    verdict: str


class EpsPoint(_Model):
    eps: float
    robust_accuracy: float
    reject_rate: float
    defended_rate: float
    rule_defended_rate: float | None = Field(
        None, description="defended rate under the rule attack (knows the rule) at this eps")


class EpsSweep(_Model):
    attack: dict[str, Any]
    n_examples: int
    points: list[EpsPoint]
    ok: bool
    verdict: str


class GradientFreeCheck(_Model):
    n_examples: int
    square_robust_accuracy: float | None
    best_white_box_robust_accuracy: float | None
    best_white_box: str | None
    ok: bool
    verdict: str


class NoiseCheck(_Model):
    """Inputs that are no garment at all must be rejected: uniform noise in [0, 1] and
    constant images (black, white, gray levels)."""

    n_uniform: int
    uniform_reject_rate: float
    n_constant: int
    constant_reject_rate: float
    target: float = 0.99
    ok: bool
    verdict: str


class RuleChecks(_Model):
    """Checks of the attacks aimed at the verdict: doubling the rule attack's restarts moves
    the defended rate by at most `tolerance`; doubling its steps AND restarts (`doubled`, on the
    first `n_doubled` examples) lowers it by at most `doubled_tolerance`; the gradient-free rule
    attack (Square on the rule's margin, model.onnx) is not stronger than the white-box one."""

    budget_schedule: list[dict[str, Any]] = Field(default_factory=list)
    budget_ok: bool | None = None
    doubled: dict[str, Any] | None = Field(None, description="the doubled rule attack's settings as it ran")
    n_doubled: int | None = None
    base_defended_rate: float | None = Field(None, description="the rule attack's, on the doubled run's examples")
    doubled_defended_rate: float | None = None
    doubled_tolerance: float | None = None
    doubled_ok: bool | None = None
    square_defended_rate: float | None = None
    white_box_defended_rate: float | None = None
    gradient_free_ok: bool | None = None
    tolerance: float = 0.01
    ok: bool
    verdict: str


class Sanity(_Model):
    noise: NoiseCheck | None = None
    pgd_budget: PgdBudgetCheck | None = None
    eps_sweep: EpsSweep | None = None
    gradient_free: GradientFreeCheck | None = None
    rule: RuleChecks | None = None


class DistalResult(_Model):
    """Inputs that are not clothing (noise, constant images), perturbed within eps to get ANY
    class accepted: the share accepted (lower is better)."""

    start: str
    eps: float
    n_examples: int
    accepted_rate: float
    start_accepted_rate: float = Field(description="accepted before the perturbation")
    params: dict[str, Any] = Field(default_factory=dict)


class OodResult(_Model):
    """One kind of synthetic out-of-distribution input, at the served rho."""

    kind: str
    trained: bool = Field(description="a kind rejection training saw (False: held out)")
    n_examples: int
    reject_rate: float


class DetectorScore(_Model):
    """One rejection score (oriented: higher = more suspicious; the max softmax probability
    enters negated) with its threshold set on the validation split like rho."""

    score: str
    auroc: float
    threshold: float
    validation_reject: float = Field(description="clean validation inputs rejected at the threshold")
    clean_reject: float = Field(description="clean test inputs rejected at the threshold")
    adversarial_catch: float = Field(description="misclassified attacked inputs rejected at the threshold")


class Detector(_Model):
    """The angle ratio theta / (theta* + theta_sigma) as a detector of adversarial inputs,
    and beside it (`scores`) the max softmax probability and the Mahalanobis distance."""

    attack: str
    n_clean: int
    n_adversarial: int
    auc: float
    clean_reject_at_rho: float
    adversarial_catch_at_rho: float
    clean_reject_at_rho1: float
    adversarial_catch_at_rho1: float
    scores: list[DetectorScore] = Field(default_factory=list)
    adaptive_against: str | None = Field(None, description="the score this row's attack was aimed at")
    score_defended_rate: float | None = Field(
        None, description="defended rate of the rule 'reject above that score's threshold' under this attack")
    protocol: str = Field("all clean vs misclassified attacked", description=(
        "negatives/positives: 'correct clean vs fooled attacked' (the standard protocol: clean inputs classified "
        "correctly vs the attacked versions of those same inputs the attack got misclassified), 'clean right vs "
        "clean wrong' (misclassification detection), or, in reports before this field, all clean inputs vs "
        "every misclassified attacked input"))


class Report(_Model):
    schema_version: Literal[1] = REPORT_SCHEMA_VERSION
    created_at: datetime
    command: str = ""
    model: ModelRef
    norm: Literal["linf"] = "linf"
    eps: float = Field(ge=0)
    split: Literal["test", "validation"] = "test"  # where the attacked examples come from
    n_examples: int = Field(ge=1)
    rho: float = Field(gt=0)
    rho_source: str = "manifest"
    angle_mean_deg: list[float]
    angle_std_deg: list[float]
    clean_accuracy: float
    clean_reject_rate: float
    clean_accepted_accuracy: float
    clean_defended_rate: float
    clean_rho1_reject_rate: float
    attacks: list[AttackResult]
    worst_case: WorstCase
    worst_case_all_examples: WorstCase | None = None
    detectors: list[Detector] = Field(default_factory=list)
    distal: list[DistalResult] = Field(default_factory=list)
    distal_skipped: str | None = Field(None, description="why the distal attack did not run (it is white-box)")
    ood: list[OodResult] = Field(default_factory=list)
    sanity: Sanity = Field(default_factory=Sanity)
    warnings: list[str] = Field(default_factory=list)
    figures: list[str] = Field(default_factory=list)
    seconds: float = 0.0
    cached_inputs: dict[str, list[str]] | None = Field(
        None, description="per attack, its inputs' files in the output's .cache/ (what `python -m training "
        "precision` reads); None in reports made before they were listed")

    def attack(self, name: str) -> AttackResult:
        for a in self.attacks:
            if a.name == name:
                return a
        raise KeyError(name)
