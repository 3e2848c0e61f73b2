"""A real `redis-server` for tests and benchmarks, on a free loopback port, nothing persisted.

    with start_redis() as r:          # waits until PING answers
        env = {"DSPHERE_QUERY_HISTORY_REDIS_URL": r.url}
        ...
        r.stop()                      # e.g. to see the service go on without it
        r.start()                     # the same port again, an empty database

`start_redis()` runs `redis-server --port P --bind 127.0.0.1 --save "" --appendonly no` (no
RDB snapshots, no append-only file: a fresh empty database every start) in a temporary
working directory and returns a `RedisHandle` (.url, .port, .proc, .ping(), .stop(),
.start()). Leaving the block stops it with SIGTERM and waits for its exit (SIGKILL after a
timeout). `redis_available()` says whether the binary is installed (Debian's `redis-server`).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from support.server import free_port

LOG_TAIL_CHARS = 4000


def redis_binary() -> str | None:
    return shutil.which("redis-server")


def redis_available() -> bool:
    return redis_binary() is not None


def ping(port: int, timeout: float = 1.0) -> bool:
    """PING over a plain socket (RESP), True when the server answers +PONG."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisHandle:
    def __init__(self, port: int, workdir: Path, timeout: float) -> None:
        self.port = port
        self.workdir = workdir
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ping(self) -> bool:
        return ping(self.port)

    def start(self) -> RedisHandle:
        """Start (or restart, on the same port) and wait until PING answers."""
        assert not self.alive(), "redis-server is already running"
        binary = redis_binary()
        assert binary, "redis-server is not installed (Debian: apt-get install redis-server)"
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--protected-mode", "no", "--daemonize", "no",
                "--logfile", str(self.log_path)]
        self.returncode = None
        self.proc = subprocess.Popen(argv, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while not self.ping():
            if not self.alive():
                code = self.proc.returncode
                raise AssertionError(f"redis-server exited with {code} before answering PING\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"redis-server did not answer PING within {self.timeout} s\n{self.log_tail()}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, wait for the exit (SIGKILL after `timeout`); the exit status (idempotent)."""
        if self.proc is None:
            return None
        if self.returncode is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.returncode = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.returncode = self.proc.wait(timeout=10)
        return self.returncode

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisHandle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def start_redis(port: int | None = None, timeout: float = 20) -> RedisHandle:
    """A started `redis-server` on `port` (a free loopback port if None); see the module docstring."""
    workdir = Path(tempfile.mkdtemp(prefix="dsphere-redis-"))
    handle = RedisHandle(port or free_port(), workdir, timeout)
    try:
        return handle.start()
    except BaseException:
        handle.close()
        raise
