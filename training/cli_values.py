"""Comma-separated CLI values (`--lr-milestones 0.5,0.75`, `--attacks fgsm,pgd`): one parser,
one error message shape for every option that takes a list."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def comma_list(text: str, convert: Callable[[str], T], option: str, what: str = "values") -> tuple[T, ...]:
    """The non-empty items of `text`, each converted; a ValueError naming the option otherwise."""
    try:
        return tuple(convert(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated {what}, got {text!r}") from None


def format_list(values: tuple[float, ...] | tuple[int, ...]) -> str:
    """The inverse of comma_list for a default: (0.5, 0.75) -> "0.5,0.75" (repr: no digits lost)."""
    return ",".join(repr(v) for v in values)
