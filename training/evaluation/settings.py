"""What the report says an attack ran with: `settings(attack)`, the fields of the attack object
that ran (a frozen dataclass), serialized, so a budget is never typed twice; and `Planned`, one
attack of an evaluation as training/evaluation/plan.py builds it and runner.py runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from torch import nn

from training.rule import Rule


@dataclass(frozen=True)
class Restarts:
    """Restarts from `first`, doubled until the doubling moves `measure` ("robust_accuracy" or
    "defended_rate") by at most `tolerance`, or until doubling would pass `cap`."""

    first: int
    cap: int
    tolerance: float
    measure: str


# What a white-box attack judges its iterates by (its `judge`, not a setting) in the evaluation
JUDGED = {"iterates_judged_by": "model.onnx (ONNX Runtime), the exact rule; the best kept"}


def settings(attack: Any) -> dict[str, Any]:
    """An attack's settings as they ran: its dataclass fields (a step size left to its default
    resolved to the step it took; a Rule as what the attack knows; a nested attack flattened;
    fields declared with repr=False, such as a substitute model, left out), then its class's
    `about` notes."""
    out: dict[str, Any] = {}
    for f in fields(attack):
        value = getattr(attack, f.name)
        if not f.repr:
            continue
        if f.name == "step_size" and value is None and hasattr(attack, "step"):
            value = attack.step
        if isinstance(value, Rule):
            out.update(knows="angle statistics and rho", rho=value.rho)
        elif is_dataclass(value):
            out.update(inner=type(value).__name__.lower(), **settings(value))
        else:
            out[f.name] = list(value) if isinstance(value, tuple) else getattr(value, "__name__", value)
    return {**out, **getattr(type(attack), "about", {})}


@dataclass(frozen=True)
class Planned:
    """One attack of the evaluation: run on `on` (None: skipped because `unavailable`), on the first
    `cap` examples (0: all), with restarts doubled as `restarts` says (None: one run)."""

    name: str
    kind: str
    attack: Any
    on: nn.Module | None
    cap: int = 0
    restarts: Restarts | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # what is not a setting (a substitute's origin)
    unavailable: str = ""

    @property
    def params(self) -> dict[str, Any]:
        return {**(settings(self.attack) if self.attack is not None else {}), **self.notes}
