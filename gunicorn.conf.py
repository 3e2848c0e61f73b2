"""gunicorn settings for several dsphere workers (docs/RELIABILITY.md, "Several workers").

gunicorn reads ./gunicorn.conf.py by default; `gunicorn -c gunicorn.conf.py app.main:app`.
Set PROMETHEUS_MULTIPROC_DIR to an empty directory first, so /metrics sums all workers.
"""

import os

from prometheus_client import multiprocess

worker_class = "uvicorn.workers.UvicornWorker"
workers = int(os.environ.get("DSPHERE_WORKERS", "2"))
bind = os.environ.get("DSPHERE_BIND", "0.0.0.0:8000")
graceful_timeout = 20


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    """A replaced or dead worker's live gauges (queue depth, model info) leave the totals."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(worker.pid)
