"""gunicorn settings used by scripts/run and scripts/demo (``gunicorn -c controlplane/gunicorn.conf.py``).

Command-line flags still win over these. The one thing that must live here is the
``child_exit`` hook: with ``PROMETHEUS_MULTIPROC_DIR`` set, a dead worker's live gauges are
dropped from the multiprocess metric files (its counters stay, so totals never go backwards).
"""

import os

wsgi_app = "controlplane.wsgi"
bind = os.environ.get("CONTROLPLANE_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_WORKERS", "2"))
timeout = int(os.environ.get("WEB_TIMEOUT", "120"))


def child_exit(server, worker):
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
