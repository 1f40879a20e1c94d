"""gunicorn settings used by scripts/run and scripts/demo (``gunicorn -c controlplane/gunicorn.conf.py``).

Command-line flags still win over these. Two things must live here:

* the ``child_exit`` hook: with ``PROMETHEUS_MULTIPROC_DIR`` set, a dead worker's live gauges
  are dropped from the multiprocess metric files (its counters stay, so totals never go
  backwards);
* the worker class: threads (``gthread``), so that a client that connects and sends nothing,
  or sends or reads slowly, holds at most one thread (an idle connection holds none: gthread
  waits for its first byte in a poller), never a whole worker. With the former sync workers,
  two idle connections stopped ``make run``'s web tier (``/livez`` and heartbeats unanswered
  for as long as they stayed open). Each thread that serves a request uses its own database
  connection, kept for ``DATABASE_CONN_MAX_AGE`` (60 s) idle, so a host opens at most
  ``WEB_WORKERS * (WEB_THREADS + 1)`` connections (default 2 x 9 = 18: each worker's heartbeat
  flusher holds one while heartbeats flow). A client that trickles
  its request holds its thread until the request is complete: a host exposed to untrusted
  networks belongs behind a buffering reverse proxy (docs/operations.md, "Deployment");
* how long a stop waits: ``graceful_timeout`` (``WEB_GRACEFUL_TIMEOUT``, 5 s) bounds the wait
  for requests in flight on SIGTERM/SIGINT, so a web process exits within seconds even with a
  slow client connected (``make run`` must stop within 10 s, docs/operations.md);
* the ``worker_exit`` hook: a worker that stops (after finishing its requests on SIGTERM/SIGINT,
  or when it reaches ``max_requests``) writes the heartbeats it acknowledged but has not written
  yet (``registry/heartbeat_flush.py``), so a web restart loses none;
* the request limits gunicorn enforces before Django sees a request, and its error answers as
  problem documents (``controlplane.httpserver``): a request line over 4094 bytes is a 414
  ``uri_too_long``, more than 100 header fields or a field over 8190 bytes a 431. Every valid
  request fits: a model name is at most 255 characters, 3,060 bytes percent-encoded even if
  every character takes four UTF-8 bytes. (Bodies are bounded by Django's
  ``DATA_UPLOAD_MAX_MEMORY_SIZE``, 1 MiB.)
"""

import os

from prometheus_client import multiprocess

from controlplane.httpserver import install_problem_errors

# prometheus_client is imported here, in the arbiter at start, not in child_exit: that hook
# runs in the arbiter's SIGCHLD handler, and when several workers exit at once (a stop) a
# second SIGCHLD re-entered the first handler's half-done import, which crashed the arbiter or
# left it hanging until it was killed.

wsgi_app = "controlplane.wsgi"
bind = os.environ.get("CONTROLPLANE_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_WORKERS", "2"))
worker_class = "gthread"
threads = int(os.environ.get("WEB_THREADS", "8"))
# Seconds an idle keep-alive connection is kept after an answer. A worker sends its heartbeats
# over one kept connection every 10 s (its default interval), so the keep-alive outlasts that
# interval with margin: 20 s. An idle kept connection costs a socket in the worker's poller,
# never a thread (gthread). At most worker_connections - threads (992) are kept per worker
# process; above that gunicorn closes a connection after its answer instead of keeping it, so a
# larger fleet still gets answers, the excess nodes reconnecting per heartbeat.
keepalive = int(os.environ.get("WEB_KEEPALIVE", "20"))
worker_connections = 1000
timeout = int(os.environ.get("WEB_TIMEOUT", "120"))
graceful_timeout = int(os.environ.get("WEB_GRACEFUL_TIMEOUT", "5"))

limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190

install_problem_errors()


def child_exit(server, worker):
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(worker.pid)


def worker_exit(server, worker):
    # In the worker process, after its last request: Django is set up (the app was loaded).
    try:
        from registry.heartbeat_flush import flusher
    except Exception:  # noqa: BLE001 - the app never loaded: nothing was acknowledged either
        return
    flusher.stop_and_flush()
