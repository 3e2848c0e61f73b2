"""The model-store manifest: the ONE contract between training/ and app/.

`training/` writes it at export, `app/` validates it before serving. Both sides
import this module (it needs pydantic only, never torch), so the schema lives
here and nowhere else. See model_store/README.md for the operator's view.

Bump SCHEMA_VERSION on any incompatible change; the loader refuses versions it
does not know.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION: Final = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
OUTPUT_NAMES = ("logits", "cosines")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """The single ONNX input: float32 [N, C, H, W], N dynamic, pixels in value_range."""

    name: str = "input"
    shape: tuple[int, int, int] = Field(description="(C, H, W) of one image")
    dtype: Literal["float32"] = "float32"
    value_range: tuple[float, float] = (0.0, 1.0)


class AttackSpec(_Strict):
    """The L-inf PGD attack behind the manifest's pgd_* figures (at export, or the strong
    evaluation's PGD with its converged number of restarts)."""

    name: Literal["pgd"] = "pgd"
    norm: Literal["linf"] = "linf"
    eps: float = Field(gt=0)
    steps: int = Field(ge=1)
    step_size: float = Field(gt=0)
    restarts: int = Field(ge=1)
    n_examples: int = Field(ge=1)


class OperatingPoint(_Strict):
    """Verdict figures at one value of rho, measured on the test set."""

    rho: float = Field(gt=0)
    clean_reject_rate: float = Field(ge=0, le=1)
    accepted_accuracy: float = Field(ge=0, le=1)
    pgd_reject_rate: float = Field(ge=0, le=1)
    pgd_defended_rate: float = Field(ge=0, le=1)


class ManifestMetrics(_Strict):
    """Measured at export on the test set; recomputable from model.onnx + this file.

    clean_reject_rate, accepted_accuracy and the pgd_* rates use `rho` of the manifest.
    pgd_defended_rate: fraction of attacked inputs rejected OR correctly classified.
    """

    n_test: int = Field(ge=1)
    clean_accuracy: float = Field(ge=0, le=1)
    clean_reject_rate: float = Field(ge=0, le=1)
    accepted_accuracy: float = Field(ge=0, le=1)
    pgd_robust_accuracy: float = Field(ge=0, le=1)
    pgd_reject_rate: float = Field(ge=0, le=1)
    pgd_defended_rate: float = Field(ge=0, le=1)
    pgd_attack: AttackSpec
    paper_rho1: OperatingPoint = Field(description="the same figures at the paper's rho = 1")
    # From the strong evaluation (`python -m training evaluate`, passed to export with
    # --evaluation); absent in manifests exported without one. Per example, the worst
    # outcome over every attack listed: robust = correct under all of them, defended =
    # rejected or correct under all of them.
    worst_case_robust_accuracy: float | None = Field(None, ge=0, le=1)
    worst_case_defended_rate: float | None = Field(None, ge=0, le=1)
    adaptive_defended_rate: float | None = Field(
        None, ge=0, le=1, description="the lowest defended rate of the attacks that know rho and the angle statistics")
    worst_case_attacks: list[str] | None = Field(None, description="the attacks behind the worst case")
    worst_case_n_examples: int | None = Field(None, ge=1, description="test examples of the worst case")


class Calibration(_Strict):
    """How rho was chosen: on a validation split held out from training, never the test set."""

    target_false_reject_rate: float = Field(gt=0, lt=1)
    n_validation: int = Field(ge=1)
    validation_reject_rate: float = Field(ge=0, le=1)
    paper_rho1_validation_reject_rate: float = Field(ge=0, le=1)


class AngleHistogram(_Strict):
    """How the training split's angles fall into bins, per class: what angle_mean_deg and
    angle_std_deg summarize (each class-j training image's feature against W_j, in degrees,
    as the model.onnx of this version computes it). Drawn by the service's page beside an
    input's angle and its class's threshold.

    counts[j][b] is the number of class-j images whose angle lies in
    [bin_edges_deg[b], bin_edges_deg[b + 1]) (the last bin also holds its upper edge).
    """

    split: Literal["train"] = "train"
    bin_edges_deg: list[float] = Field(min_length=2, description="increasing bin edges within [0, 180] degrees")
    counts: list[list[int]] = Field(description="per class, images per bin")

    @model_validator(mode="after")
    def _bins_match(self) -> AngleHistogram:
        edges = self.bin_edges_deg
        if any(b <= a for a, b in zip(edges, edges[1:], strict=False)) or edges[0] < 0 or edges[-1] > 180:
            raise ValueError("bin_edges_deg must increase strictly within [0, 180]")
        bins = len(edges) - 1
        if any(len(row) != bins for row in self.counts):
            raise ValueError(f"every row of counts must have one entry per bin ({bins})")
        if any(c < 0 for row in self.counts for c in row):
            raise ValueError("counts must not be negative")
        return self


class TrainingInfo(_Strict):
    model_config_: dict[str, Any] = Field(alias="model_config")
    training_config: dict[str, Any]
    command: str
    dataset: str
    git_commit: str | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    created_at: datetime
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of model.onnx")
    class_names: list[str] = Field(min_length=2)
    input: InputSpec
    outputs: tuple[str, str] = OUTPUT_NAMES
    angle_mean_deg: list[float] = Field(description="per class mean angle to W_j, training set")
    angle_std_deg: list[float] = Field(description="per class std of that angle, training set")
    rho: float = Field(gt=0, description="calibrated threshold multiplier")
    calibration: Calibration
    metrics: ManifestMetrics
    training: TrainingInfo
    # Written by exports since the page was added; None in older manifests (still valid).
    angle_histogram: AngleHistogram | None = None

    @model_validator(mode="after")
    def _per_class_lengths_match(self) -> Manifest:
        k = len(self.class_names)
        if len(self.angle_mean_deg) != k or len(self.angle_std_deg) != k:
            raise ValueError(
                f"angle_mean_deg/angle_std_deg must have one entry per class ({k}), got "
                f"{len(self.angle_mean_deg)}/{len(self.angle_std_deg)}"
            )
        if self.angle_histogram is not None and len(self.angle_histogram.counts) != k:
            raise ValueError(
                f"angle_histogram.counts must have one row per class ({k}), got {len(self.angle_histogram.counts)}"
            )
        if tuple(self.outputs) != OUTPUT_NAMES:
            raise ValueError(f"outputs must be {list(OUTPUT_NAMES)}, got {list(self.outputs)}")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --- precision records: `<version>/precision/<backend>-<precision>.json` ---------------------------
# A faster path (another runtime, a lower precision) of a version's model.onnx is served only with
# its agreement with the fp32 ONNX Runtime reference measured and recorded here
# (`python -m training precision`, docs/SERVING.md). The service refuses a path whose record is
# missing, made on other model bytes, below the contract's floors, or measured under other
# conditions than the running service's (CPU features, runtime version, rho), and serves the fp32
# reference.
PRECISION_DIR = "precision"
BACKENDS = ("onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16")
REFERENCE = ("onnxruntime", "fp32")
# The contract is on the answer a user gets, the (label, verdict) pair: the path gives the
# reference's pair on at least these shares of the inputs; the borderline set meets the floor its
# record states (never below MIN_BORDERLINE_FLOOR); the worst case (robust accuracy and defended
# rate) moves by at most MAX_WORST_CASE_SHIFT.
MIN_CLEAN_AGREEMENT: Final = 0.999
MIN_ADVERSARIAL_AGREEMENT: Final = 0.99
MIN_BORDERLINE_FLOOR: Final = 0.90
MAX_WORST_CASE_SHIFT: Final = 0.01


def precision_file(backend: str, precision: str) -> str:
    return f"{PRECISION_DIR}/{backend}-{precision}.json"


class Agreement(_Strict):
    """How often a path gives the reference's label and verdict on a set of inputs."""

    inputs: str = Field(description="which inputs: 'test' (clean test images), 'adversarial', ...")
    n: int = Field(ge=1)
    label: float = Field(ge=0, le=1, description="share with the reference's predicted class")
    verdict: float = Field(ge=0, le=1, description="share with the reference's accept/reject verdict")
    outcome: float = Field(ge=0, le=1, description="share with the same (label, verdict) pair")
    max_abs_logit_diff: float = Field(ge=0)


class RobustnessShift(_Strict):
    """The evaluation's worst case per example, judged by the reference and by this path: the
    evaluation's adversarial inputs (crafted on the fp32 model) and a gradient-free attack on
    the rule run against this path itself, every input judged by both."""

    n_examples: int = Field(ge=1)
    attacks: list[str] = Field(description="whose adversarial inputs are judged")
    attacks_on_path: list[str] = Field(description="of those, the attacks run against this path itself")
    not_judged: list[str] = Field(description="attacks of the evaluation's worst case whose inputs were not kept")
    reference_robust_accuracy: float
    reference_defended_rate: float
    robust_accuracy: float
    defended_rate: float


class PrecisionRecord(_Strict):
    """One (backend, precision) path of one model.onnx and its agreement with the reference."""

    schema_version: Literal[1] = 1
    name: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="of the model.onnx it was measured on")
    backend: Literal["onnxruntime", "openvino"]
    precision: Literal["fp32", "bf16"]
    runtime_version: str = Field(description="the backend package's version the figures were measured with")
    cpu: str
    cpu_features: list[str]
    rho: float = Field(gt=0, description="the manifest's rho the verdicts were taken with")
    clean: Agreement
    adversarial: Agreement
    borderline: Agreement = Field(description="on borderline_file, the inputs tests re-check (the inputs nearest "
                                  "the threshold, where a flip is likeliest)")
    borderline_floor: float | None = Field(
        None, ge=0, le=1, description=f"the (label, verdict) agreement the borderline set must keep (at least "
        f"{MIN_BORDERLINE_FLOOR}); records made before the contract stated one have none and are not served")
    borderline_file: str = Field(description="per example, the adversarial input nearest the reference's threshold")
    robustness: RobustnessShift
    created_at: datetime
    command: str

    def failures(self) -> list[str]:
        """The contract's floors this record misses (empty: the path may be served)."""
        out = []
        for agreement, floor in ((self.clean, MIN_CLEAN_AGREEMENT), (self.adversarial, MIN_ADVERSARIAL_AGREEMENT)):
            if agreement.outcome < floor:
                out.append(f"{agreement.inputs} (label, verdict) agreement {agreement.outcome:.4f} < {floor}")
        if self.borderline_floor is None:
            out.append("the record states no floor for its borderline set")
        elif self.borderline_floor < MIN_BORDERLINE_FLOOR:
            out.append(f"its borderline floor {self.borderline_floor} < {MIN_BORDERLINE_FLOOR}")
        elif self.borderline.outcome < self.borderline_floor:
            out.append(f"borderline (label, verdict) agreement {self.borderline.outcome:.4f} < its floor "
                       f"{self.borderline_floor}")
        r = self.robustness
        for what, ref, path in (("defended rate", r.reference_defended_rate, r.defended_rate),
                                ("robust accuracy", r.reference_robust_accuracy, r.robust_accuracy)):
            if abs(path - ref) > MAX_WORST_CASE_SHIFT + 1e-12:
                out.append(f"worst-case {what} moves {abs(path - ref):.4f} > {MAX_WORST_CASE_SHIFT}")
        return out

    def other_conditions(self, cpu_features: list[str] | tuple[str, ...], runtime_version: str,
                         rho: float) -> list[str]:
        """How the running service differs from where the figures were measured (empty: the same
        conditions; another CPU with the same features counts as the same)."""
        out = []
        if set(cpu_features) != set(self.cpu_features):
            out.append(f"this CPU's features {sorted(cpu_features)} are not the record's {sorted(self.cpu_features)}")
        if runtime_version != self.runtime_version:
            out.append(f"{self.backend} {runtime_version} is not the record's {self.runtime_version}")
        if not math.isclose(rho, self.rho, rel_tol=1e-12):
            out.append(f"rho {rho} is not the record's {self.rho} (a DSPHERE_RHO override was never measured)")
        return out
