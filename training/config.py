"""A training run's configuration (saved whole in every checkpoint) and the schedules it
defines: the learning rate (Adam, lr 1e-3 divided by 10 at fractions of the run, the paper's
MNIST schedule scaled to the run's length) and ε (0 during the natural phase, then a linear
ramp to the target over `eps_warmup_epochs`). docs/METHOD.md §5.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from training.adversarial import MODES
from training.guard import GuardConfig
from training.objectives import ObjectiveConfig
from training.rejection import RejectionConfig

# The modes that run `attack_steps` (PGD steps); fgsm and nfgsm take one step, rejection runs its own
# (`rejection.attack_steps`), natural none: for them a run records attack_steps as None.
STEPPED_MODES = ("pgd", "trades")


def as_ran(d: dict[str, Any]) -> dict[str, Any]:
    """A training config's dict with `attack_steps` None where its mode does not run it (checkpoints
    written before recorded the unused default, 7)."""
    return {**d, "attack_steps": None} if d.get("mode") not in STEPPED_MODES else dict(d)


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    mode: str = "natural"
    eps: float = 0.1
    attack_steps: int = 7
    attack_step_size: float | None = None  # default 2.5 ε / steps (PGD), 1.25 ε (FGSM-RS)
    adv_weight: float = 1.0  # fgsm/pgd: loss = (1-w) CE(clean) + w CE(adv); 1.0 = pure adversarial
    trades_beta: float = 6.0  # trades: loss = CE(clean) + β KL(clean ‖ adv)
    natural_epochs: float = 0.0  # natural training before the adversarial phase
    eps_warmup_epochs: float = 0.0  # linear ramp of ε after the natural phase
    epochs: float = 0.0  # if > 0, overrides iterations
    iterations: int = 30000  # the paper's MNIST schedule
    batch_size: int = 128
    lr: float = 1e-3
    lr_milestones: tuple[float, ...] = (1 / 3, 2 / 3)
    n_val: int = 5000
    limit_train: int = 0  # train on the first N examples of the training split (smoke runs)
    seed: int = 0
    checkpoint_every: int = 500
    checkpoint_minutes: float = 5.0
    device: str = "auto"
    min_accuracy_over_chance: float = 0.15
    objective: ObjectiveConfig = ObjectiveConfig()
    guard: GuardConfig = GuardConfig()
    rejection: RejectionConfig = RejectionConfig()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown training mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if not 0 <= self.adv_weight <= 1:
            raise ValueError("adv_weight must be in [0, 1]")
        if self.eps < 0:
            raise ValueError("eps must be >= 0")
        if self.mode == "nfgsm" and self.adv_weight != 1.0:
            raise ValueError("--mode nfgsm puts all of the loss on the adversarial input; leave --adv-weight at 1")
        if self.trades_beta < 0:
            raise ValueError("trades_beta must be >= 0")
        if not 0 < self.guard.every:
            raise ValueError("the guard's check interval must be a positive number of iterations")

    @property
    def adversarial(self) -> bool:
        return self.mode != "natural" and self.eps > 0

    def to_dict(self) -> dict[str, Any]:
        """The options as the run uses them (recorded in checkpoints and manifests; see `as_ran`)."""
        return as_ran(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = {k: v for k, v in d.items() if not (k == "attack_steps" and v is None)}
        d["objective"] = ObjectiveConfig(**d.get("objective", {}))
        d["guard"] = GuardConfig(**d.get("guard", {}))
        # Runs written before served cones existed trained in one fixed cone.
        d["rejection"] = RejectionConfig(**{"cones": "fixed", **d["rejection"]} if "rejection" in d else {})
        d["lr_milestones"] = tuple(d.get("lr_milestones", (1 / 3, 2 / 3)))
        return cls(**d)


def lr_at(iteration: int, total: int, cfg: TrainConfig) -> float:
    drops = sum(iteration >= m * total for m in cfg.lr_milestones)
    return cfg.lr * (0.1**drops)


def eps_at(iteration: int, iters_per_epoch: int, cfg: TrainConfig) -> float:
    """0 during the natural phase, then a linear ramp to ε over the warm-up."""
    start = cfg.natural_epochs * iters_per_epoch
    if iteration < start:
        return 0.0
    warm = cfg.eps_warmup_epochs * iters_per_epoch
    if warm <= 0:
        return cfg.eps
    return cfg.eps * min(1.0, (iteration - start + 1) / warm)
