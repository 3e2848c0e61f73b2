"""Paths as committed artifacts record them (checkpoints, summaries, reports, manifests): relative to
the working directory, the repository's root for every make target, where they lie under it, so
that no machine's own folders (/work/..., /home/...) are kept. tests/test_no_machine_paths.py holds
the committed files to it."""

from __future__ import annotations

from pathlib import Path


def portable_path(path: str | Path) -> str:
    """`path` relative to the working directory where it lies under it; else as given."""
    p = Path(path)
    if p.is_absolute():
        try:
            return str(p.relative_to(Path.cwd()))
        except ValueError:
            return str(path)
    return str(path)
