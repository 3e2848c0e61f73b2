"""Choosing among kept checkpoints on the validation split, never on the test set.

The criterion (docs/METHOD.md, "Which model is served"): a kept checkpoint's best guard check,
i.e. the defended rate under the served rule against the guard's PGD on the validation images the
run held out (summary.json `best`, the figure training itself keeps a checkpoint by), ties broken by
PGD accuracy. A new version is published only when its checkpoint beats its predecessor's on it;
the served default is the published model whose checkpoint ranks first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GuardBest:
    checkpoint: Path
    defended_rate: float
    pgd_accuracy: float
    clean_accuracy: float
    iteration: int

    @property
    def key(self) -> tuple[float, float]:
        return self.defended_rate, self.pgd_accuracy


def guard_best(checkpoint: Path) -> GuardBest:
    """The best guard check recorded in a kept checkpoint's summary.json; ValueError where there is none."""
    path = Path(checkpoint) / "summary.json"
    try:
        best = json.loads(path.read_text())["best"]
        return GuardBest(Path(checkpoint), float(best["defended_rate"]), float(best["pgd_accuracy"]),
                         float(best["clean_accuracy"]), int(best["iteration"]))
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: not a kept checkpoint (python -m training keep)") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} records no best guard check ({e})") from None


def ranking(checkpoints: list[Path]) -> list[GuardBest]:
    """The checkpoints, best first by the criterion."""
    return sorted((guard_best(c) for c in checkpoints), key=lambda g: g.key, reverse=True)


def table(ranked: list[GuardBest]) -> str:
    lines = ["| checkpoint | validation guard: defended | PGD accuracy | clean accuracy | iteration |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {g.checkpoint} | {100 * g.defended_rate:.1f} % | {100 * g.pgd_accuracy:.1f} % | "
              f"{100 * g.clean_accuracy:.1f} % | {g.iteration} |" for g in ranked]
    return "\n".join(lines)
