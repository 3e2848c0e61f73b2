"""Files written whole or not at all: into a temporary file beside the target, then renamed over
it (a rename is atomic on POSIX), so an interrupted run never leaves a half-written file that a
resumed one, or a reader, would take for a whole one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write `data` to `path` atomically (parents created); returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, target)
    return target


def write_json(path: str | os.PathLike[str], value: Any, indent: int = 2) -> Path:
    """`value` as indented JSON (non-JSON values as their str), atomically."""
    return write_atomic(path, json.dumps(value, indent=indent, default=str))
