"""gunicorn settings used by scripts/run and scripts/demo (``gunicorn -c controlplane/gunicorn.conf.py``).

Command-line flags still win over these. Two things must live here:

* the ``child_exit`` hook: with ``PROMETHEUS_MULTIPROC_DIR`` set, a dead worker's live gauges
  are dropped from the multiprocess metric files (its counters stay, so totals never go
  backwards);
* the request limits gunicorn enforces before Django sees a request, and its error answers as
  problem documents (``controlplane.httpserver``): a request line over 4094 bytes is a 414
  ``uri_too_long``, more than 100 header fields or a field over 8190 bytes a 431. Every valid
  request fits: a model name is at most 255 characters, 3,060 bytes percent-encoded even if
  every character takes four UTF-8 bytes. (Bodies are bounded by Django's
  ``DATA_UPLOAD_MAX_MEMORY_SIZE``, 1 MiB.)
"""

import os

from controlplane.httpserver import install_problem_errors

wsgi_app = "controlplane.wsgi"
bind = os.environ.get("CONTROLPLANE_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_WORKERS", "2"))
timeout = int(os.environ.get("WEB_TIMEOUT", "120"))

limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190

install_problem_errors()


def child_exit(server, worker):
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
