"""The served version shared by every worker of one host: DSPHERE_SERVED_MODEL_FILE.

With several worker processes (gunicorn), POST /admin/reload reaches one of them. That worker
loads the version, swaps it in, and then writes its name and concrete version to this file
(atomically: a temporary file renamed over it). Every worker follows the file (`Service.follow`:
its modification checked every `poll_s`) and reloads the version it names, so all of them serve
it within about a second; a worker that starts later (gunicorn replacing one that died) starts
on the file's version instead of DSPHERE_MODEL_VERSION. gunicorn.conf.py sets the file in a
fresh directory for each start of the server, so a restart serves the configured version again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("dsphere.served_file")


class ServedModelFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int] | None = None  # (inode, mtime_ns) of the last version read or written

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def changed(self) -> bool:
        """Whether the file was written (by any process) since this one last read or wrote it."""
        stamp = self._stamp()
        return stamp is not None and stamp != self._seen

    def read(self) -> tuple[str, str] | None:
        """(name, version) as last written, or None (no file yet, or unreadable: logged)."""
        stamp = self._stamp()
        try:
            data = json.loads(self.path.read_text())
            name, version = str(data["name"]), str(data["version"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("cannot read the served version from %s: %s", self.path, exc)
            self._seen = stamp
            return None
        self._seen = stamp
        return name, version

    def write(self, name: str, version: str, sha256: str) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"name": name, "version": version, "sha256": sha256}))
        tmp.replace(self.path)
        self._seen = self._stamp()
