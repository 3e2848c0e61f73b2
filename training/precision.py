"""`python -m training precision VERSION_DIR --evaluation REPORT_DIR`: measure a faster path of a
version (OpenVINO bf16 by default) against the fp32 ONNX Runtime reference and write its
precision record, `VERSION_DIR/precision/<backend>-<precision>.json` (schema: app/manifest.py),
without which the service does not serve that path (docs/SERVING.md, "The parity contract and
precision records").

Measured, every verdict taken with the manifest's statistics and ρ (app.verdict):
- agreement (label, verdict, both) on the 10,000 clean test images;
- agreement on every adversarial input the version's evaluation kept (the REPORT_DIR/.cache files
  its report.json lists in `cached_inputs`, and no other: each attack's inputs, restarts included),
  the borderline cases of the rule;
- the worst case per example over the evaluation's attacks, judged by the reference and by the
  path, with Square on the rule run against the path itself beside them (its inputs judged by
  both too); the record fails the contract when the defended rate moves by more than 1 point;
- a borderline set, per example the input nearest the reference's threshold (float16, committed
  beside the record), and the floor the record states for it (`--borderline-floor`): the test
  suite re-measures the path's agreement on it and on the clean test set and fails below the
  recorded figures.

The report must be of the version's very model.onnx (its sha256), of the test split and at the
manifest's ρ; the record names the conditions it was measured in (CPU features, OpenVINO's
version, ρ), and the service serves the path only under the same.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from torch import Tensor

from app.manifest import (
    MIN_BORDERLINE_FLOOR,
    MODEL_FILE,
    PRECISION_DIR,
    Agreement,
    Manifest,
    PrecisionRecord,
    RobustnessShift,
    precision_file,
)
from app.model_store import read_manifest
from app.runtimes import RuntimeUnavailable, cpu_features, cpu_name, openvino_runner
from app.verdict import Verdicts
from training.cli_app import app, command_line
from training.data import load_dataset
from training.evaluation.cache import AttackCache
from training.evaluation.rule_attacks import RuleScores, RuleSquare
from training.evaluation.scoring import Verdicted, worst_case
from training.judging import BatchedRunner, OnnxModel
from training.rule import Rule

log = logging.getLogger("dsphere.precision")


class PrecisionError(ValueError):
    """The record cannot be measured; one line for the user."""


@dataclass(frozen=True)
class Judges:
    """The reference and the path, and the manifest's rule. Each input tensor is run once by both:
    the agreement, the worst case and the borderline set read the same verdicts."""

    reference: BatchedRunner
    path: BatchedRunner
    manifest: Manifest
    _judged: dict[int, tuple[Tensor, Verdicts, Verdicts, float]] = field(default_factory=dict, repr=False)

    def verdicts(self, x: Tensor) -> tuple[Verdicts, Verdicts, float]:
        """(reference's, path's, max |Δ logit|) on x."""
        hit = self._judged.get(id(x))
        if hit is not None and hit[0] is x:  # x itself is kept, so its id is not reused
            return hit[1:]
        rule = Rule.of(self.manifest)
        (rl, rc), (pl, pc) = self.reference(x), self.path(x)
        ref, out = rule.verdicts(rl, rc), rule.verdicts(pl, pc)
        self._judged[id(x)] = (x, ref, out, float(np.abs(rl - pl).max()))
        return self._judged[id(x)][1:]

    def agreement(self, inputs: str, xs: list[Tensor]) -> Agreement:
        judged = [self.verdicts(x) for x in xs]
        label = np.concatenate([ref.labels == out.labels for ref, out, _ in judged])
        verdict = np.concatenate([ref.accepted == out.accepted for ref, out, _ in judged])
        return Agreement(inputs=inputs, n=len(label), label=float(label.mean()), verdict=float(verdict.mean()),
                         outcome=float((label & verdict).mean()), max_abs_logit_diff=max(d for *_, d in judged))


def check_report(report: dict[str, Any], report_dir: Path, manifest: Manifest, version_dir: Path) -> None:
    """PrecisionError unless the report evaluated this very model.onnx on the test split at the manifest's rho."""
    sha256 = report.get("model", {}).get("sha256")
    if sha256 is None:
        raise PrecisionError(f"{report_dir}/report.json names no model sha256: it cannot be tied to {version_dir}")
    if sha256 != manifest.sha256:
        raise PrecisionError(f"{report_dir}/report.json judged another model.onnx than {version_dir}")
    if report.get("split") != "test":
        raise PrecisionError(f"{report_dir}/report.json attacked the {report.get('split')} split, not the test split")
    if not math.isclose(float(report["rho"]), manifest.rho, rel_tol=1e-12):
        raise PrecisionError(f"{report_dir}/report.json judged at rho {report['rho']}, "
                             f"not the manifest's {manifest.rho}")


def cached_attacks(report_dir: Path, report: dict[str, Any]) -> dict[str, list[Tensor]]:
    """Each attack's kept inputs (one tensor per restart or run): the cache files the report lists, no other."""
    listed: dict[str, list[str]] | None = report.get("cached_inputs")
    if not listed:
        raise PrecisionError(f"{report_dir}/report.json lists no cache files (`cached_inputs`: reports made before "
                             "they were listed have none): run the evaluation there again, it resumes from its cache")
    cache, found = AttackCache(report_dir / ".cache"), dict[str, list[Tensor]]()
    for attack, names in listed.items():
        for name in dict.fromkeys(names):
            try:
                found.setdefault(attack, []).append(cache.read(name))
            except FileNotFoundError:
                raise PrecisionError(f"{report_dir / '.cache' / name}, listed in {report_dir}/report.json, "
                                     "is missing") from None
    return found


def evaluation_inputs(report_dir: Path, report: dict[str, Any]
                      ) -> tuple[dict[str, list[Tensor]], list[str], list[Tensor]]:
    """(the worst case's attacks -> their kept inputs, the worst case's attacks with none kept,
    every kept input including the attacks on other scores)."""
    kept = cached_attacks(report_dir, report)
    worst_case_attacks: list[str] = report["worst_case"]["attacks"]
    inputs = {a: kept[a] for a in worst_case_attacks if a in kept}
    not_judged = [a for a in worst_case_attacks if a != "clean" and a not in kept]
    return inputs, not_judged, [t for runs in kept.values() for t in runs]


def reference_and_path(judges: Judges, x: Tensor, y: Tensor, inputs: dict[str, list[Tensor]]) -> tuple[float, ...]:
    """(reference robust, reference defended, path robust, path defended) over the examples, each
    example's worst outcome over its clean input and every attack input (those covering it): the
    evaluation's worst case (scoring.worst_case), under each path's verdicts."""
    labels, ref, path = y.numpy(), list[Verdicted](), list[Verdicted]()
    for name, x_adv in [("clean", x), *((a, t) for a, runs in inputs.items() for t in runs)]:
        v_ref, v_path, _ = judges.verdicts(x_adv)
        ref.append(Verdicted.of(name, v_ref, labels))
        path.append(Verdicted.of(name, v_path, labels))
    r, p = worst_case(ref, n=len(x)), worst_case(path, n=len(x))
    return r.robust_accuracy, r.defended_rate, p.robust_accuracy, p.defended_rate


def borderline(judges: Judges, inputs: list[Tensor], n: int) -> Tensor:
    """Per example (of the first n), the input whose reference angle is nearest its class's threshold."""
    best = torch.zeros(n, *inputs[0].shape[1:])
    gap = np.full(n, np.inf)
    for x_adv in inputs:
        v = judges.verdicts(x_adv)[0]
        g = np.abs(v.angles_deg - v.thresholds_deg)
        rows = np.flatnonzero(g < gap[: len(x_adv)])
        gap[rows], best[rows] = g[rows], x_adv[rows]
    return best


def measure(version_dir: Path, report_dir: Path, backend: str, precision: str, threads: int,
            square_queries: int, n_square: int, *, say: Callable[[str], None] = typer.echo,
            borderline_floor: float = MIN_BORDERLINE_FLOOR) -> PrecisionRecord:
    manifest = read_manifest(version_dir / "manifest.json")
    report = json.loads((report_dir / "report.json").read_text())
    check_report(report, report_dir, manifest, version_dir)
    if borderline_floor < MIN_BORDERLINE_FLOOR:
        raise PrecisionError(f"a borderline floor below the contract's {MIN_BORDERLINE_FLOOR} cannot be stated")
    if backend != "openvino":
        raise PrecisionError(f"no faster path on {backend}: the reference is onnxruntime-fp32")
    try:
        runner = openvino_runner((version_dir / MODEL_FILE).read_bytes(), precision, threads)
    except RuntimeUnavailable as exc:
        raise PrecisionError(f"{backend}-{precision} cannot run here: {exc}") from None
    judges = Judges(OnnxModel(version_dir / MODEL_FILE), BatchedRunner(runner), manifest)
    test = load_dataset(manifest.training.dataset, "test",
                        manifest.training.training_config.get("data_dir"))
    clean = judges.agreement("test", [test.images])
    say(f"clean test images: {clean.model_dump()}")

    n = int(report["worst_case"]["n_examples"])
    x, y = test.images[:n], test.labels[:n]
    inputs, not_judged, every = evaluation_inputs(report_dir, report)
    adversarial = judges.agreement("adversarial", every)
    say(f"{adversarial.n} adversarial inputs: {adversarial.model_dump()}")

    rule = Rule.of(manifest)
    m = min(n_square or n, n)
    say(f"Square on the rule against {backend}-{precision}: {m} examples, {square_queries} queries ...")
    torch.manual_seed(0)
    scores = RuleScores(judges.path, rule, manifest.num_classes)
    on_path = RuleSquare(float(report["eps"]), rule, square_queries)(scores, x[:m], y[:m])
    inputs[f"rule-square on {backend}-{precision}"] = [on_path]
    ref_robust, ref_defended, robust, defended = reference_and_path(judges, x, y, inputs)
    say(f"worst case: reference {ref_robust:.4f} / {ref_defended:.4f}, path {robust:.4f} / {defended:.4f}")

    border = borderline(judges, [*every, on_path], n).half()
    border_file = f"{PRECISION_DIR}/{backend}-{precision}-borderline.npz"
    (version_dir / PRECISION_DIR).mkdir(exist_ok=True)
    np.savez_compressed(version_dir / border_file, x=border.numpy(), y=y.numpy().astype(np.uint8))
    border_agreement = judges.agreement("borderline", [border.float()])

    return PrecisionRecord(
        name=manifest.name, version=manifest.version, sha256=manifest.sha256, backend=backend,  # type: ignore[arg-type]
        precision=precision, runtime_version=runner.info.runtime_version, cpu=cpu_name(),  # type: ignore[arg-type]
        cpu_features=list(cpu_features()), rho=manifest.rho, clean=clean, adversarial=adversarial,
        borderline=border_agreement, borderline_floor=borderline_floor, borderline_file=border_file,
        robustness=RobustnessShift(n_examples=n, attacks=list(inputs), attacks_on_path=[f"rule-square on {backend}-"
                                   f"{precision}"], not_judged=not_judged, reference_robust_accuracy=ref_robust,
                                   reference_defended_rate=ref_defended, robust_accuracy=robust,
                                   defended_rate=defended),
        created_at=datetime.now(UTC), command=command_line())


@app.command()
def precision(
    version_dir: Annotated[Path, typer.Argument(help="model-store version dir")],
    evaluation: Annotated[Path, typer.Option(help="the version's evaluation output dir (report.json, .cache/)")],
    backend: Annotated[str, typer.Option(help="the path's backend")] = "openvino",
    precision: Annotated[str, typer.Option(help="the path's precision: bf16 or fp32")] = "bf16",
    threads: Annotated[int, typer.Option(help="inference threads (0: the backend's default)")] = 2,
    square_queries: Annotated[int, typer.Option(help="Square on the rule against the path: queries")] = 300,
    n_square: Annotated[int, typer.Option(help="examples for that Square (0: the worst case's)")] = 0,
    borderline_floor: Annotated[float, typer.Option(
        help="the (label, verdict) agreement the borderline set must keep (the record states it)")
    ] = MIN_BORDERLINE_FLOOR,
) -> None:
    """Measure a faster path against the fp32 reference; write its precision record."""
    try:
        record = measure(version_dir, evaluation, backend, precision, threads, square_queries, n_square,
                         borderline_floor=borderline_floor)
    except (PrecisionError, OSError, KeyError) as exc:
        raise SystemExit(f"error: {exc}") from None
    path = version_dir / precision_file(backend, precision)
    path.write_text(record.model_dump_json(indent=1) + "\n")
    failures = record.failures()
    typer.echo(f"wrote {path}" + (f"; it misses the contract, the service will not serve it: {'; '.join(failures)}"
                                  if failures else "; it meets the contract"))
