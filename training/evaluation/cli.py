"""`python -m training evaluate` and `python -m training figure2` (registered on training.cli.app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from training.cli_app import app, command_line
from training.cli_values import comma_list
from training.evaluation.config import ALL_ATTACKS
from training.portable import portable_path


def _eps_list(text: str, option: str) -> tuple[float, ...]:
    return comma_list(text, float, option, "numbers")


@app.command()
def evaluate(  # a flat list: one parameter per option, then one call

    version_dir: Annotated[Path | None, typer.Argument(help="model-store version dir (or --name/--version)")] = None,
    store: Annotated[Path, typer.Option(help="model store root")] = Path("model_store"),
    name: Annotated[str | None, typer.Option(help="model name in the store")] = None,
    version: Annotated[str | None, typer.Option(help="version in the store")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="checkpoint that produced the version")] = None,
    weights_from_onnx: Annotated[bool, typer.Option(
        help="without --checkpoint, rebuild the PyTorch model from model.onnx for white-box attacks")] = True,
    substitute: Annotated[list[Path] | None, typer.Option(help="substitute checkpoint (repeatable)")] = None,
    out: Annotated[Path, typer.Option(help="output dir (reports, figures)")] = Path("reports/eval"),
    eps: Annotated[float | None, typer.Option(help="L-inf eps (default 0.1; CIFAR-10 8/255)")] = None,
    n_examples: Annotated[int, typer.Option(help="test examples (clean, FGSM, PGD)")] = 1000,
    split: Annotated[str, typer.Option(help="attack the test set, or the validation split the training run held out "
                                            "(to choose a variant or checkpoint without the test set)")] = "test",
    attacks: Annotated[str, typer.Option(help="comma-separated subset of " + ",".join(ALL_ATTACKS))] = ",".join(
        ALL_ATTACKS),
    rho: Annotated[float | None, typer.Option(help="override the manifest's rho")] = None,
    pgd_steps: Annotated[int, typer.Option()] = 100,
    pgd_step_size: Annotated[float, typer.Option(help="paper: 0.01")] = 0.01,
    pgd_restarts: Annotated[int, typer.Option()] = 2,
    n_pgd: Annotated[int, typer.Option(help="examples for PGD (0 = --n-examples)")] = 0,
    apgd_iter: Annotated[int, typer.Option()] = 100,
    n_apgd: Annotated[int, typer.Option(help="examples for each APGD (0 = --n-examples)")] = 0,
    square_queries: Annotated[int, typer.Option()] = 1000,
    n_square: Annotated[int, typer.Option(help="examples for Square (0 = --n-examples)")] = 0,
    transfer_steps: Annotated[int, typer.Option(help="PGD steps on each substitute")] = 100,
    n_transfer: Annotated[int, typer.Option(help="examples per transfer attack (0 = --n-examples)")] = 0,
    adaptive_k: Annotated[int, typer.Option(help="target classes tried by the adaptive attack")] = 3,
    adaptive_steps: Annotated[int, typer.Option()] = 100,
    adaptive_restarts: Annotated[int, typer.Option()] = 1,
    n_adaptive: Annotated[int, typer.Option(help="examples for the adaptive attack (0 = --n-examples)")] = 0,
    rule_steps: Annotated[int, typer.Option(help="rule attack: steps per target, loss and restart")] = 30,
    rule_restarts: Annotated[int, typer.Option(help="rule attack: first round of restarts (then doubled)")] = 1,
    rule_max_restarts: Annotated[int, typer.Option(help="rule attack: cap on the doubled restarts")] = 4,
    rule_cosine_targets: Annotated[int, typer.Option(
        help="rule attack: wrong classes (likeliest first) the cosine loss tries; the margin loss tries all")] = 9,
    n_rule: Annotated[int, typer.Option(help="examples for the rule attack (0 = --n-examples)")] = 0,
    rule_square_queries: Annotated[int, typer.Option(help="Square on the rule's margin: queries")] = 1000,
    n_rule_square: Annotated[int, typer.Option(help="examples for rule-square (0 = --n-examples)")] = 0,
    orthogonal_steps: Annotated[int, typer.Option(help="orthogonal PGD steps")] = 100,
    n_orthogonal: Annotated[int, typer.Option(help="examples for orthogonal PGD (0 = --n-examples)")] = 0,
    ood: Annotated[bool, typer.Option(help="out-of-distribution table and distal attack")] = True,
    n_ood: Annotated[int, typer.Option(help="images per out-of-distribution kind")] = 1000,
    distal_eps: Annotated[str, typer.Option(help="eps values of the distal attack")] = "0.1,0.3",
    n_distal: Annotated[int, typer.Option(help="start images per kind for the distal attack")] = 200,
    sanity: Annotated[bool, typer.Option(help="PGD budget check and eps sweep")] = True,
    n_budget_check: Annotated[int, typer.Option(help="examples for the doubled-PGD check")] = 100,
    sweep_eps: Annotated[str, typer.Option(help="eps values of the sweep")] = "0,0.05,0.1,0.2,0.3,0.5",
    n_sweep: Annotated[int, typer.Option(help="examples for the eps sweep")] = 200,
    sweep_steps: Annotated[int, typer.Option(help="PGD steps of the eps sweep")] = 20,
    figures: Annotated[bool, typer.Option(help="write PNG figures")] = True,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int, typer.Option(help="torch threads (0 = torch default)")] = 0,
    device: Annotated[str, typer.Option(help="where PyTorch attacks run: cpu, cuda, auto")] = "cpu",
    data_dir: Annotated[str | None, typer.Option(help="dataset directory")] = None,
) -> None:
    """Attack a model-store version (FGSM, PGD, APGD, Square, transfer, adaptive) and report
    robust accuracy, reject and defended rates as the service would judge them."""
    import torch

    from training.evaluation.config import EvalConfig
    from training.evaluation.core import evaluate as run_evaluation
    from training.evaluation.loading import version_path

    if threads:
        torch.set_num_threads(threads)
    vdir = Path(portable_path(version_path(version_dir, store, name, version)))
    checkpoint = Path(portable_path(checkpoint)) if checkpoint is not None else None
    cfg = EvalConfig(
        eps=eps, split=split, n_examples=n_examples, attacks=comma_list(attacks, str, "--attacks"),
        seed=seed, rho=rho, data_dir=data_dir, pgd_steps=pgd_steps, pgd_step_size=pgd_step_size,
        pgd_restarts=pgd_restarts, n_pgd=n_pgd, apgd_iter=apgd_iter, n_apgd=n_apgd, square_queries=square_queries,
        n_square=n_square, substitutes=tuple(portable_path(s) for s in (substitute or ())),
        transfer_steps=transfer_steps,
        n_transfer=n_transfer, adaptive_k=adaptive_k, adaptive_steps=adaptive_steps,
        adaptive_restarts=adaptive_restarts, n_adaptive=n_adaptive, sanity=sanity, n_budget_check=n_budget_check,
        sweep_eps=_eps_list(sweep_eps, "--sweep-eps"), n_sweep=n_sweep, sweep_steps=sweep_steps, figures=figures,
        weights_from_onnx=weights_from_onnx, device=device, rule_steps=rule_steps, rule_restarts=rule_restarts,
        rule_max_restarts=rule_max_restarts, rule_cosine_targets=rule_cosine_targets, n_rule=n_rule,
        rule_square_queries=rule_square_queries, n_rule_square=n_rule_square, orthogonal_steps=orthogonal_steps,
        n_orthogonal=n_orthogonal, ood=ood, n_ood=n_ood, distal_eps=_eps_list(distal_eps, "--distal-eps"),
        n_distal=n_distal)
    outcome = run_evaluation(vdir, checkpoint, cfg, out, command=command_line(), progress=typer.echo)
    r = outcome.report
    typer.echo(f"worst case over {len(r.worst_case.attacks) - 1} attacks (n = {r.worst_case.n_examples}): "
               f"robust accuracy {r.worst_case.robust_accuracy:.4f}, defended {r.worst_case.defended_rate:.4f}")
    for w in r.warnings:
        typer.echo(f"WARNING: {w}")
    typer.echo(f"wrote {out / 'report.json'} and {out / 'report.md'}")


@app.command()
def figure2(  # a flat list: one parameter per option, then one call
    out: Annotated[Path, typer.Option(help="output directory")] = Path("reports/figure2"),
    dataset: Annotated[str, typer.Option()] = "fashion-mnist",
    data_dir: Annotated[str | None, typer.Option()] = None,
    n_train: Annotated[int, typer.Option(help="training images")] = 20000,
    epochs: Annotated[float, typer.Option(help="epochs of natural training")] = 10.0,
    n_test: Annotated[int, typer.Option(help="test images scattered")] = 1000,
    eps: Annotated[float, typer.Option(help="PGD eps for the adversarial points")] = 0.1,
    pgd_steps: Annotated[int, typer.Option()] = 20,
    widths: Annotated[str, typer.Option(help="conv widths of the two small models")] = "16,32,32",
    seed: Annotated[int, typer.Option()] = 0,
    runs_dir: Annotated[Path | None, typer.Option(help="cache of the two training runs (default OUT/runs)")] = None,
    threads: Annotated[int, typer.Option(help="torch threads (0 = torch default)")] = 0,
) -> None:
    """The paper's Figure 2 on real data: 2-D features of a D-SphereNet and a baseline CNN,
    clean and PGD-adversarial test images, scattered per class."""
    import torch

    from training.evaluation.figure2 import Figure2Config, make_figure2

    if threads:
        torch.set_num_threads(threads)
    w = comma_list(widths, int, "--widths", "integers")
    cfg = Figure2Config(dataset=dataset, data_dir=data_dir, n_train=n_train, epochs=epochs, n_test=n_test, eps=eps,
                        pgd_steps=pgd_steps, widths=w, seed=seed,
                        runs_dir=str(runs_dir) if runs_dir else None)
    path = make_figure2(cfg, out, progress=typer.echo)
    typer.echo(f"wrote {path}")


@app.command()
def compare(
    reports: Annotated[list[Path], typer.Argument(help="report.json files of `evaluate`, one column each")],
    out: Annotated[Path, typer.Option(help="markdown file to write")] = Path("docs/results/model-comparison.md"),
) -> None:
    """Put evaluation reports side by side, row by row (attacks, worst case, rejection scores, eps sweep)."""
    from training.evaluation.compare import write_comparison

    typer.echo(f"wrote {write_comparison(reports, out)}")
