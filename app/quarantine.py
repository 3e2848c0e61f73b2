"""Opt-in quarantine of rejected inputs, for later review.

Each rejected input (`Service.classify`, app/service.py) is written as
`<stamp>_<request_id>[_<index>]<ext>` (an upload's original bytes; a v2 tensor row as .npy)
plus a `.json` sidecar (request id, time, label, class name, angle, threshold, probability,
model name/version). The directory is bounded:
when a new entry would push the total over `max_bytes`, the OLDEST entries are
evicted first (an entry larger than the whole budget is dropped, not written).
Writes happen in a worker thread; failures are logged and never fail a request.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("dsphere.quarantine")


class Quarantine:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.directory.mkdir(parents=True, exist_ok=True)
        # entries oldest first: (stem, bytes on disk)
        self._entries: deque[tuple[str, int]] = deque()
        self.total_bytes = 0
        self._scan()

    def _scan(self) -> None:
        sizes: dict[str, int] = {}
        mtimes: dict[str, float] = {}
        for p in self.directory.iterdir():
            if p.is_file() and not p.name.startswith("."):
                st = p.stat()
                sizes[p.stem] = sizes.get(p.stem, 0) + st.st_size
                mtimes[p.stem] = min(mtimes.get(p.stem, st.st_mtime), st.st_mtime)
        for stem in sorted(sizes, key=lambda s: (mtimes[s], s)):
            self._entries.append((stem, sizes[stem]))
            self.total_bytes += sizes[stem]

    def _evict_until(self, budget: int) -> None:
        while self._entries and self.total_bytes > budget:
            stem, size = self._entries.popleft()
            for p in self.directory.glob(f"{stem}.*"):
                try:
                    p.unlink()
                except OSError:
                    pass
            self.total_bytes -= size

    def add(self, data: bytes, ext: str, record: dict[str, Any]) -> Path | None:
        """Store one rejected input; returns the image path, or None if dropped."""
        rid = "".join(ch for ch in str(record.get("request_id", "")) if ch.isalnum() or ch in "-_")[:64]
        idx = record.get("index")
        stem = time.strftime("%Y%m%dT%H%M%S") + f"{time.time_ns() % 1_000_000_000:09d}_{rid}"
        if idx is not None:
            stem += f"_{int(idx)}"
        sidecar = json.dumps(
            {**record, "time": datetime.now(UTC).isoformat(), "image_file": stem + ext, "bytes": len(data)},
            indent=1,
        ).encode()
        size = len(data) + len(sidecar)
        with self._lock:
            if size > self.max_bytes:
                log.warning("quarantine: entry of %d bytes exceeds the %d-byte budget; dropped", size, self.max_bytes)
                return None
            self._evict_until(self.max_bytes - size)
            img_path = self.directory / (stem + ext)
            try:
                _write(img_path, data)
                _write(self.directory / (stem + ".json"), sidecar)
            except OSError as exc:
                log.warning("quarantine: cannot write %s: %s", img_path, exc)
                return None
            self._entries.append((stem, size))
            self.total_bytes += size
        return img_path


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
