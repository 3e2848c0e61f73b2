"""`AttackCache`: an evaluation's adversarial inputs on disk, one safetensors file a crafted run
(each restart is a run of its own), `<out>/.cache/<attack>-<key>.safetensors`. The key is a
digest of what makes the run: the model's sha256, the attack's name and settings, the attacked
examples themselves, the seed and ε; so a run made again with the same key is read back (an
interrupted evaluation resumes) and any change makes a new file. Each file records its attack's
name, so that precision records (training/precision.py) find an evaluation's inputs by attack, and
the seconds it took to craft, so that a resumed evaluation reports what its runs cost, not the
moment it took to read them back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

SUFFIX = ".safetensors"
SECONDS = "crafting_seconds"  # the metadata key of a run's crafting time
_FILE = re.compile(rf"^(?P<stem>.+)-(?P<key>[0-9a-f]{{20}}){re.escape(SUFFIX)}$")


def cache_key(*parts: Any) -> str:
    """The 20-hex-digit digest of a run's identity (JSON of `parts`)."""
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True, default=str).encode()).hexdigest()[:20]


def _stem(attack: str) -> str:
    return attack.replace(":", "_")


class AttackCache:
    """The files of one evaluation's cache folder (None: nothing is kept)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    def path(self, attack: str, key: str) -> Path | None:
        return self.folder / f"{_stem(attack)}-{key}{SUFFIX}" if self.folder is not None else None

    def load(self, attack: str, key: str) -> Tensor | None:
        path = self.path(attack, key)
        return load_file(str(path))["x_adv"] if path is not None and path.is_file() else None

    def save(self, attack: str, key: str, x_adv: Tensor, seconds: float | None = None) -> None:
        """Written to a temporary file and renamed: an interrupted write leaves no file behind.
        `seconds`: what crafting the inputs took, kept beside them."""
        path = self.path(attack, key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        metadata = {"attack": attack} | ({} if seconds is None else {SECONDS: f"{seconds:.3f}"})
        save_file({"x_adv": x_adv.contiguous()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)

    def crafting_seconds(self, attack: str, key: str) -> float:
        """The seconds that crafting this run's kept inputs took; 0.0 where none is kept or the file
        is older than the record."""
        path = self.path(attack, key)
        if path is None or not path.is_file():
            return 0.0
        return float(_metadata(path).get(SECONDS, 0.0))

    def within(self, name: str) -> AttackCache:
        """A cache in a subfolder (None stays None): the checks' runs, apart from the attacks' own files
        (those a report lists in `cached_inputs` and the worst case over a prefix reads)."""
        return AttackCache(self.folder / name if self.folder is not None else None)

    def made(self, attack: str, key: str, make: Callable[[], Tensor]) -> Tensor:
        """`make()`'s inputs, read back instead when this run (`key`) was made before: an interrupted
        evaluation resumes its checks too."""
        return self.made_timed(attack, key, make)[0]

    def made_timed(self, attack: str, key: str, make: Callable[[], Tensor]) -> tuple[Tensor, float]:
        """`made`, with the recorded crafting seconds of a run read back (0.0 for one made now: the
        caller's clock counts it)."""
        kept = self.load(attack, key)
        if kept is not None:
            return kept, self.crafting_seconds(attack, key)
        t0 = time.perf_counter()
        x_adv = make()
        self.save(attack, key, x_adv, seconds=time.perf_counter() - t0)
        return x_adv, 0.0

    def read(self, file_name: str) -> Tensor:
        """The inputs of one file of this cache, by its name (a report's `cached_inputs`);
        FileNotFoundError when it is not there."""
        path = self.folder / file_name if self.folder is not None else None
        if path is None or not path.is_file() or path.parent != self.folder:
            raise FileNotFoundError(f"{path or file_name} is not in the cache")
        return load_file(str(path))["x_adv"]

    def files(self) -> dict[str, list[Path]]:
        """attack name -> its files, sorted by name (older files, without the name inside, by their stem)."""
        found: dict[str, list[Path]] = {}
        if self.folder is None or not self.folder.is_dir():
            return found
        for path in sorted(self.folder.glob(f"*{SUFFIX}")):
            match = _FILE.match(path.name)
            if match:
                found.setdefault(_attack_of(path) or match["stem"], []).append(path)
        return found

    def inputs(self) -> dict[str, list[Tensor]]:
        """attack name -> the inputs of each of its runs."""
        return {name: [load_file(str(p))["x_adv"] for p in paths] for name, paths in self.files().items()}

    def find(self, attack: str) -> list[Tensor]:
        """One attack's inputs (every run, restarts included); [] when none is kept."""
        files = self.files()
        return [load_file(str(p))["x_adv"] for p in files.get(attack, files.get(_stem(attack), []))]


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _attack_of(path: Path) -> str | None:
    return _metadata(path).get("attack")
