"""A real service process for tests and benchmarks: `uvicorn app.main:app` (or gunicorn) on a free loopback port.

`start_server(env, workers=N)` starts it with the bundled model store (overridable through
`env`), waits until `wait_path` (default /readyz) answers 200 and, with several workers, until
every worker has installed its model; it returns a `ServerHandle` (.url, .proc, .rss_bytes(),
.stop()). Use it as a context manager: leaving the block sends SIGTERM and asserts a clean exit.

Several workers (workers > 1) run under `uvicorn --workers N` or, with server="gunicorn",
`gunicorn -k uvicorn.workers.UvicornWorker -w N`, with PROMETHEUS_MULTIPROC_DIR set to an
emptied directory (a fresh temporary one unless `env` names one).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Literal

import httpx

from support.bundled import BUNDLED_STORE, MODEL_NAME, REPO

# uvicorn shuts down gracefully on SIGTERM, then re-raises the signal (-15); gunicorn exits 0.
CLEAN_EXIT = (0, -signal.SIGTERM)
LOG_TAIL_CHARS = 6000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc/<p>/stat (field 4 is the parent pid)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # comm (field 2) may contain spaces: fields after the last ')' are plain
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    todo, found = [pid], []
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def rss_of(pid: int) -> int:
    """Resident set size of one process in bytes (VmRSS of /proc/<pid>/status), 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class ServerHandle:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log_path: Path, env: dict[str, str],
                 workers: int) -> None:
        self.proc = proc
        self.url = url
        self.log_path = log_path
        self.env = env
        self.workers = workers
        self.returncode: int | None = None

    @property
    def multiproc_dir(self) -> Path | None:
        d = self.env.get("PROMETHEUS_MULTIPROC_DIR")
        return Path(d) if d else None

    def worker_pids(self) -> list[int]:
        """Processes under the server process (the workers, for workers > 1), except the helper
        that `uvicorn --workers` starts through multiprocessing (its resource tracker)."""
        return [p for p in descendants(self.proc.pid) if b"resource_tracker" not in _cmdline(p)]

    def rss_bytes(self) -> int:
        """VmRSS of the server process plus all its descendants (supervisor, workers, helpers)."""
        return sum(rss_of(p) for p in [self.proc.pid, *descendants(self.proc.pid)])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self) -> str:
        return self.log_text()[-LOG_TAIL_CHARS:]

    def client(self, **kwargs: object) -> httpx.Client:
        """An httpx client on this server that never goes through an HTTP(S)_PROXY.

        Plain HTTP on loopback: verify=False only skips loading the CA bundle (30 ms a client).
        """
        kw: dict[str, object] = {"base_url": self.url, "timeout": 30, "trust_env": False, "verify": False, **kwargs}
        return httpx.Client(**kw)  # type: ignore[arg-type]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, wait for the exit, return the exit status (idempotent)."""
        if self.returncode is None:
            if self.proc.poll() is None:
                self.proc.terminate()
            try:
                self.returncode = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError(f"server did not exit within {timeout} s of SIGTERM\n{self.log_tail()}") from None
        return self.returncode

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        rc = self.stop()
        if exc_type is None:
            assert rc in CLEAN_EXIT, f"server exited with {rc}\n{self.log_tail()}"


def _empty_dir(d: Path) -> None:
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)


def start_server(
    env: dict[str, str] | None = None,
    workers: int = 1,
    *,
    server: Literal["uvicorn", "gunicorn"] = "uvicorn",
    wait_path: str = "/readyz",
    log_path: Path | None = None,
    timeout: float = 60,
) -> ServerHandle:
    """Start the service and wait until `wait_path` answers 200; see the module docstring.

    `env` overrides the defaults below (on top of os.environ): the bundled store, model
    fashion-mnist-dsphere, CPU provider, one ONNX Runtime thread, 1 ms batching delay.
    """
    full = {
        **os.environ,
        "DSPHERE_MODEL_STORE": str(BUNDLED_STORE),
        "DSPHERE_MODEL_NAME": MODEL_NAME,
        "DSPHERE_PROVIDERS": "CPUExecutionProvider",
        "DSPHERE_INTRA_OP_THREADS": "1",
        "DSPHERE_BATCH_DELAY_MS": "1",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    full.pop("prometheus_multiproc_dir", None)
    if workers > 1 or "PROMETHEUS_MULTIPROC_DIR" in (env or {}):
        mp = Path(full.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="dsphere-prom-"))
        _empty_dir(mp)  # values of earlier runs would be summed in
        full["PROMETHEUS_MULTIPROC_DIR"] = str(mp)
    else:
        full.pop("PROMETHEUS_MULTIPROC_DIR", None)
    port = free_port()
    if server == "uvicorn":
        argv = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning"]
        if workers > 1:
            argv += ["--workers", str(workers)]
    else:
        argv = [sys.executable, "-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w", str(workers),
                "-b", f"127.0.0.1:{port}", "--log-level", "warning", "--graceful-timeout", "20", "app.main:app"]
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="dsphere-server-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=full, stdout=log, stderr=subprocess.STDOUT)
    handle = ServerHandle(proc, f"http://127.0.0.1:{port}", log_path, full, workers)
    try:
        _wait_ready(handle, wait_path, timeout)
    except BaseException:
        handle.stop()
        raise
    return handle


def _wait_ready(h: ServerHandle, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with h.client(timeout=5) as c:
        while True:
            assert h.alive(), f"server exited with {h.proc.returncode} before answering {path}\n{h.log_tail()}"
            try:
                if c.get(path).status_code == 200 and (path != "/readyz" or _workers_ready(h)):
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{path} not 200 within {timeout} s\n{h.log_tail()}"
            time.sleep(0.1)


def _workers_ready(h: ServerHandle) -> bool:
    """With several workers: each one has set dsphere_model_info (a livemax gauge file per pid)."""
    if h.workers <= 1 or h.multiproc_dir is None:
        return True
    return len(list(h.multiproc_dir.glob("gauge_livemax_*.db"))) >= h.workers
