"""Coalesced heartbeats: acknowledged once in this web process's buffer, written in batches.

The heartbeat's lean path (``registry/api/heartbeat.py``) answers an ordinary heartbeat of a
node whose token this process has seen the database accept (``registry.heartbeat_cache``)
without a database round trip: it puts the heartbeat into ``pending`` and answers 200 with
the status and address the database last answered. One flusher thread per web process writes
everything pending every ``CONTROLPLANE_HEARTBEAT_FLUSH_SECONDS`` (0.2 s) with one
``UPDATE ... FROM (VALUES ...)`` (``Node.objects.heartbeat_batch``), however many heartbeats
arrived; several heartbeats of one node within a window become one row.

What is coalesced: only the steady heartbeat, i.e. a node-token heartbeat of a node the cache
says is ``healthy`` or ``draining`` (``COALESCED_STATUSES``). Every other heartbeat takes the
path it took before, a synchronous ``Node.objects.heartbeat_with_token`` (one UPDATE ...
RETURNING, whose answer fills the cache): the first heartbeat of a node in this process, one
after its entry expired or was dropped, a pending, offline or unhealthy node's (the heartbeat
that brings an offline node back is written before it is answered), and a fleet-token node's
(LocalAI's workers: their credential is the node's ``auth_mode``, not a token hash).

Correctness of what is written and of whom it is answered:

* **Authentication.** The batch UPDATE keeps the token check (``WHERE id = v.id AND token_hash
  = v.token_hash``): a heartbeat whose token was rotated or whose node was deleted (by any
  process) after it was acknowledged writes nothing. Nor does one whose node went pending or
  offline meanwhile (a worker that signed off must not be revived by its own last heartbeat).
  A row the flush did not write drops its token's cache entry, so that node's next heartbeat
  goes to the database (401 for a refused token, the stamp that recovers an offline node).
  A row it wrote refreshes the entry with the status and address the database returned.
* **Staleness across processes.** A token rotated, a node deleted or its status changed
  through another process is learnt here by the next flush that carries one of its
  heartbeats: until then (at most ``CONTROLPLANE_HEARTBEAT_FLUSH_SECONDS`` after its first
  heartbeat since the change) its heartbeats are answered 200 with the old status and write
  nothing, and no entry is ever used longer than ``CONTROLPLANE_NODE_AUTH_CACHE_SECONDS``
  (30 s) after the database last confirmed it. In this process the change drops the entry at
  once (``forget_node``). A token that never matched its node is never in the cache.
* **The reconciler.** A heartbeat reaches the row at most one flush window (0.2 s, plus the
  statement) after its answer; its ``last_heartbeat`` is when it was received, as before.
  The reconciler judges staleness by when it saw ``last_heartbeat`` change on its own clock
  (``stale_after`` 30 s, ``observation_gap`` >= 15 s), so a delay that is a small fraction of
  a heartbeat interval cannot make a heartbeating node stale, and nothing in ``reconciler/``
  assumes the write is synchronous: it compares ``last_heartbeat`` values by equality
  (``plan_observation``, ``mark_offline(expected_heartbeat=...)``). The router's probe cache
  (``registry/router.py``) ages ``last_heartbeat`` against two heartbeat intervals (20 s), for
  which 0.2 s later is immaterial. The one edge: a node
  already ``stale_after`` silent whose heartbeat waits in the buffer while the pass reaps it
  is not stamped by that flush (offline rows are not written); its next heartbeat brings it
  back, exactly as a heartbeat arriving just after the reaping would.
* **Restarts.** ``stop_and_flush`` writes what is pending when the process stops gracefully:
  gunicorn's ``worker_exit`` hook (``controlplane/gunicorn.conf.py``, after the worker
  finished its requests on SIGTERM/SIGINT) and ``atexit`` for any other server. A process
  killed (SIGKILL, a crash) loses at most the heartbeats of its last flush window; their
  senders' next heartbeats replace them long before the stale threshold.
* **A failing database.** A flush that fails keeps its heartbeats pending (merged under newer
  ones) and is retried next window; meanwhile the lean path stops acknowledging into the
  buffer (``accepting``) and writes synchronously, whose failure the full request cycle
  answers (503) as before: a heartbeat is never acknowledged into a buffer that cannot drain.

Concurrency idiom: one flusher thread per web process (started with the first coalesced
heartbeat, after gunicorn forked the worker) and many request threads; they share only the
locked buffer and cache (``registry.heartbeat_cache``). The batch statement is a conditional
UPDATE over rows locked in id order (``heartbeat_batch_sql``), so the flushers of several web
processes and other writers of node rows that lock in id order cannot deadlock with it; a
writer that does not (the reconciler's set-based ``observe_heartbeats``) can meet it in a
deadlock PostgreSQL breaks by failing one statement: the flush then keeps its rows and
retries, the pass retries next interval.
"""

from __future__ import annotations

import atexit
import logging
import threading

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connections

from .heartbeat_cache import node_tokens, pending
from .models import Node

logger = logging.getLogger(__name__)

COALESCED_STATUSES = frozenset({Node.Status.HEALTHY, Node.Status.DRAINING})
# The flusher closes its database connection after this long with nothing to write (a web
# process whose nodes went away holds none); under load every window has rows and it is kept.
IDLE_CLOSE_SECONDS = 2.0


def flush_seconds() -> float:
    return float(settings.CONTROLPLANE_HEARTBEAT_FLUSH_SECONDS)


def flush() -> int:
    """Write everything pending now, in this thread; returns the rows written. On a database
    error the heartbeats stay pending and the error propagates."""
    heartbeats = pending.take()
    if not heartbeats:
        return 0
    generation = node_tokens.generation
    try:
        written = Node.objects.heartbeat_batch(
            (heartbeat.node_id, heartbeat.token_hash, heartbeat.received_at, heartbeat.figures)
            for heartbeat in heartbeats
        )
    except BaseException:
        pending.put_back(heartbeats)
        raise
    for heartbeat in heartbeats:
        answer = written.get((heartbeat.node_id, heartbeat.token_hash))
        if answer is None:
            node_tokens.drop(heartbeat.token_hash)
        else:
            node_tokens.confirm(heartbeat.token_hash, heartbeat.node_id, *answer, generation)
    return len(written)


class Flusher:
    """The process's flusher thread (module doc), started on first use."""

    def __init__(self):
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()
        self.healthy = True  # the last flush succeeded (or none failed yet)
        self.stopped = False

    def accepting(self) -> bool:
        """Whether a heartbeat may be acknowledged into the buffer now."""
        return self.healthy and not self.stopped and flush_seconds() > 0

    def enqueue(self, node_id: str, token_hash: str, received_at, figures: dict) -> None:
        pending.add(node_id, token_hash, received_at, figures)
        if self.thread is None:
            self._start()

    def _start(self) -> None:
        with self.lock:
            if self.thread is not None or self.stopped:
                return
            self.thread = threading.Thread(target=self._run, name="heartbeat-flusher", daemon=True)
            self.thread.start()
            atexit.register(self.stop_and_flush)

    def _run(self) -> None:
        idle = 0.0
        while not self.stopping.wait(flush_seconds()):
            if len(pending):
                idle = 0.0
                self._flush_once()
            else:
                idle += flush_seconds()
                if idle >= IDLE_CLOSE_SECONDS:
                    connections.close_all()  # a quiet process holds no database connection
        connections.close_all()

    def _flush_once(self) -> None:
        try:
            close_old_connections()  # past DATABASE_CONN_MAX_AGE or broken: a new connection
            flush()
        except DatabaseError as exc:
            if self.healthy:
                logger.warning("heartbeat flush failed (%s); retrying, new heartbeats are written directly", exc)
            self.healthy = False
            connections[Node.objects.db].close()  # the next try starts on a new connection
        except Exception:  # noqa: BLE001 - a bug must not end the thread: the next window retries
            logger.exception("heartbeat flush failed")
            self.healthy = False
        else:
            if not self.healthy:
                logger.info("heartbeat flushes succeed again")
            self.healthy = True

    def stop_and_flush(self, timeout: float = 5.0) -> None:
        """Stop the thread, then write what is pending (graceful stop of the process). No
        heartbeat is acknowledged into the buffer afterwards. Idempotent."""
        with self.lock:
            self.stopped = True
            thread = self.thread
        self.stopping.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if not len(pending):
            return
        try:
            written = flush()
        except Exception:  # noqa: BLE001 - the process is exiting; say what was lost
            logger.exception("heartbeats pending at exit could not be written (%d nodes)", len(pending))
        else:
            logger.info("wrote %d pending heartbeats at exit", written)
        finally:
            connections.close_all()


flusher = Flusher()
