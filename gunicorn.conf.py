"""gunicorn settings: how the image, docker-compose.yml and `make serve` run dsphere (docs/SERVING.md, "Workers").

    gunicorn -c gunicorn.conf.py app.main:app      (gunicorn reads ./gunicorn.conf.py by default)

DSPHERE_WORKERS uvicorn workers (default 2) of DSPHERE_INTRA_OP_THREADS inference threads each
(default 1): on a 2-core machine the combination that measured best (`make bench`, docs/SERVING.md).
What the workers share lives in one fresh directory per start of the server (under DSPHERE_RUN_DIR,
default /dev/shm where it has room, else the temporary directory); each is kept where already set:

  PROMETHEUS_MULTIPROC_DIR          <run>/metrics: /metrics sums every worker (emptied at start)
  DSPHERE_QUERY_HISTORY_SHARED_DIR  <run>/query-history: one query history for the workers of the host
                                    (DSPHERE_QUERY_HISTORY_REDIS_URL, where set, is one across hosts)
  DSPHERE_SERVED_MODEL_FILE         <run>/served-model.json: POST /admin/reload reaches every worker
"""

import os
import shutil
import tempfile
import time
from pathlib import Path

worker_class = "app.gunicorn_worker.Worker"
workers = int(os.environ.get("DSPHERE_WORKERS", "2"))
bind = os.environ.get("DSPHERE_BIND", "0.0.0.0:8000")
graceful_timeout = 20
os.environ.setdefault("DSPHERE_INTRA_OP_THREADS", "1")


def _run_root() -> str:
    root = os.environ.get("DSPHERE_RUN_DIR")
    if root:
        return root
    try:
        if shutil.disk_usage("/dev/shm").free >= 256 * 2**20 and os.access("/dev/shm", os.W_OK):
            return "/dev/shm"
    except OSError:
        pass
    return tempfile.gettempdir()


# Set here, in the master before it forks, so that every worker (and every replacement) inherits them.
_RUN = Path(tempfile.mkdtemp(prefix="dsphere-run-", dir=_run_root()))
for _name, _default in [("PROMETHEUS_MULTIPROC_DIR", _RUN / "metrics"),
                        ("DSPHERE_QUERY_HISTORY_SHARED_DIR", _RUN / "query-history")]:
    os.environ.setdefault(_name, str(_default))
    Path(os.environ[_name]).mkdir(parents=True, exist_ok=True)
os.environ.setdefault("DSPHERE_SERVED_MODEL_FILE", str(_RUN / "served-model.json"))


def on_starting(server):  # type: ignore[no-untyped-def]
    """Values of an earlier run left in the metrics directory would be summed in. From here on the
    counters count from zero: the workers' GET /stats windows start at this moment (app/recent.py)."""
    for f in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("*.db"):
        f.unlink()
    os.environ["DSPHERE_SERVER_STARTED_MONOTONIC"] = repr(time.monotonic())  # app/recent.py SERVER_STARTED_ENV


def on_exit(server):  # type: ignore[no-untyped-def]
    shutil.rmtree(_RUN, ignore_errors=True)


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    """A replaced or dead worker's live gauges (queue depth, model info) leave the totals."""
    # Imported here, not at the top: prometheus_client picks its multiprocess values when first
    # imported, which must be after PROMETHEUS_MULTIPROC_DIR is set above (the workers inherit it).
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
