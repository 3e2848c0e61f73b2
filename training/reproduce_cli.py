"""`python -m training reproduce` (registered on training.cli_app.app): the command line of
training/reproduce.py's Table 1 grid."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from training.cli_app import app
from training.cli_values import comma_list
from training.reproduce import MODELS, TRAININGS, make_protocol, reproduce


def _names(text: str, allowed: tuple[str, ...] | list[str], what: str) -> tuple[str, ...]:
    if text.strip() in ("", "all"):
        return tuple(allowed)
    vals = comma_list(text, str, what)
    bad = [v for v in vals if v not in allowed]
    if bad:
        raise ValueError(f"unknown {what} {', '.join(bad)}; expected {', '.join(allowed)}")
    return vals


@app.command(name="reproduce")
def reproduce_command(  # a flat list: one parameter per option, then one call
    dataset: Annotated[str, typer.Option(help="fashion-mnist, mnist or cifar10")] = "fashion-mnist",
    data_dir: Annotated[str | None, typer.Option(help="dataset directory")] = None,
    protocol: Annotated[str, typer.Option(help="quick (CPU) or paper (GPU)")] = "quick",
    out: Annotated[Path | None, typer.Option(help="default reports/reproduce/<dataset>-<protocol>")] = None,
    models: Annotated[str, typer.Option(help=f"comma-separated subset of {','.join(MODELS)}")] = "all",
    trainings: Annotated[str, typer.Option(help="comma-separated subset of natural,fgsm,pgd")] = "all",
    eps: Annotated[float | None, typer.Option(help="default 0.1 Fashion-MNIST, 0.3 MNIST, 8/255 CIFAR-10")] = None,
    iterations: Annotated[int, typer.Option(help="override the protocol's training iterations")] = 0,
    epochs: Annotated[float, typer.Option(help="override the protocol's epochs")] = 0.0,
    limit_train: Annotated[int, typer.Option(help="override the protocol's training subset (-1 = all)")] = 0,
    n_eval: Annotated[int, typer.Option(help="override the protocol's evaluation subset (-1 = all)")] = 0,
    eval_pgd_steps: Annotated[int, typer.Option(help="override the evaluation PGD steps")] = 0,
    natural_epochs: Annotated[float, typer.Option(help="override natural warm-start epochs (-1 = protocol)")] = -1.0,
    n_val: Annotated[int, typer.Option(help="override validation examples")] = 0,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option()] = "auto",
    threads: Annotated[int, typer.Option(help="torch threads (0 = torch default)")] = 0,
) -> None:
    """Train and evaluate the paper's Table 1 grid (cached per cell, resumable)."""
    if threads:
        torch.set_num_threads(threads)
    proto = make_protocol(protocol, dataset)
    over: dict[str, Any] = {}
    if iterations:
        over["iterations"] = iterations
    if epochs:
        over.update(epochs=epochs, iterations=0)
    if limit_train:
        over["limit_train"] = max(0, limit_train)
    if n_eval:
        over["n_eval"] = max(0, n_eval)
    if eval_pgd_steps:
        over["eval_pgd_steps"] = eval_pgd_steps
    if natural_epochs >= 0:
        over["natural_epochs"] = natural_epochs
    if n_val:
        over["n_val"] = n_val
    proto = replace(proto, **over)
    path = reproduce(dataset, data_dir, proto, out, _names(models, list(MODELS), "model(s)"),
                     _names(trainings, TRAININGS, "training(s)"), eps=eps, seed=seed, device=device,
                     progress=typer.echo)
    typer.echo(f"wrote {path} and {path.with_suffix('.md')}")
