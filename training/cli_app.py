"""The `python -m training` Typer application and the command line it records, on which every
command module registers its commands (training/cli.py: train, export, keep;
training/evaluation/cli.py: evaluate, figure2, compare; training/reproduce.py: reproduce;
training/precision.py: precision).
A module of its own so that the command modules import it, never each other."""

from __future__ import annotations

import shlex
import sys

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="D-SphereNet training, export and evaluation.")


def command_line() -> str:
    """This process's command line as `python -m training ...` (recorded in checkpoints and reports)."""
    return shlex.join(["python", "-m", "training", *sys.argv[1:]])
