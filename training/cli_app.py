"""The `python -m training` Typer application and the command line it records, on which every
command module registers its commands (training/cli.py: train, export, keep;
training/evaluation/cli.py: evaluate, figure2, compare; training/reproduce_cli.py: reproduce;
training/precision.py: precision).
A module of its own so that the command modules import it, never each other."""

from __future__ import annotations

import shlex
import sys

import typer

from training.portable import portable_path

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="D-SphereNet training, export and evaluation.")


def _portable_argument(arg: str) -> str:
    option, eq, value = arg.partition("=")
    return f"{option}={portable_path(value)}" if eq and option.startswith("--") else portable_path(arg)


def command_line() -> str:
    """This process's command line as `python -m training ...` (recorded in checkpoints and reports), with
    paths under the working directory made relative to it."""
    return shlex.join(["python", "-m", "training", *map(_portable_argument, sys.argv[1:])])
