"""The load pool: where a pass's claimed cold loads run, after the pass, outside its lock.

A pass decides and claims replica slots under the reconcile lock (``loading`` rows with their
VRAM reservations: what guarantees one loader per slot), hands each claimed load to a
``LoadPool`` and returns; the lock is released while the loads run. A pool has ``size``
threads (``CONTROLPLANE_RECONCILE_LOAD_CONCURRENCY``): never more than ``size`` loads of one
pool are in flight, across passes. Each load's outcome is recorded when it
finishes, through the verbs and with its events (``record``, given by the scale-up phase).

Two ways to run it:

- the process's pool (``process_pool``: the leader process, ``manage.py reconcile --loop``),
  long-lived, takes no more work than it has free threads (a pass claims at most that many
  slots; the next passes claim the rest as threads free up); its threads record the outcomes, and while any load runs a keep-alive
  thread refreshes its rows (``NodeModel.objects.keep_loading``) every quarter of
  ``CONTROLPLANE_RECONCILE_STALE_LOADING_AFTER``, so the stale-loading sweep only takes the
  rows of a dead process (a SIGKILLed qcluster: its threads died with it);
- a one-shot call's own pool (``reconcile_once``, ``record_on_threads=False``, ``queue=None``):
  the pass claims every slot its plans want at once, as before; loads not started within
  ``CONTROLPLANE_RECONCILE_SCALE_UP_BUDGET`` of the pass's start are discarded unstarted. Its
  threads run the network calls only, and the caller's ``drain`` records the outcomes on its own thread,
  keeping the rows alive while it waits; the re-reading path (eviction) runs there too, once
  the network loads are recorded.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

from django import db

from registry.models import NodeModel

from .conf import ReconcileConfig

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Task:
    """One piece of work: ``network`` (no database, may be None) on a pool thread, then
    ``record(outcome)`` (database, events; returns action counts). ``row_id``: the ``loading``
    row to keep alive meanwhile."""

    model_name: str
    record: object
    network: object = None
    row_id: object = None


def _outcome(network) -> tuple:
    if network is None:
        return (None, None)
    try:
        return (network(), None)
    except Exception as exc:  # the load's failure, recorded by ``record``
        return (None, exc)


#: The failed loads of this process's pools not yet reported by a pass (model -> error text).
FAILURES: dict[str, str] = {}


class LoadPool:
    def __init__(self, size: int, *, keep_alive_every: float, record_on_threads: bool = True, queue: int | None = 0):
        self.size = max(1, int(size))
        self.queue = queue  # claimed loads it takes beyond its free threads (None: any number)
        self.keep_alive_every = float(keep_alive_every)
        self.record_on_threads = record_on_threads
        self._executor = ThreadPoolExecutor(max_workers=self.size, thread_name_prefix="load")
        self._lock = threading.Lock()
        self._running: dict[Task, object] = {}  # task -> future, until recorded
        self._counts: Counter = Counter()
        self._keeper: threading.Thread | None = None
        #: model -> the text of its last failed load, for the process's next pass's conditions
        self.failures = FAILURES

    def free(self) -> int:
        """How many more loads it takes: its free threads, plus ``queue`` waiting for one."""
        if self.queue is None:
            return sys.maxsize
        with self._lock:
            return max(0, self.size + self.queue - len(self._running))

    def busy(self) -> bool:
        """A task is still running or unrecorded."""
        with self._lock:
            return bool(self._running)

    def models_in_slow_path(self) -> set:
        """Models with a re-reading path task (no row of its own yet) running or unrecorded."""
        with self._lock:
            return {task.model_name for task in self._running if task.row_id is None}

    def submit(self, task: Task) -> None:
        with self._lock:
            self._running[task] = self._executor.submit(self._run, task)
            if self.record_on_threads and self._keeper is None:
                self._keeper = threading.Thread(target=self._keep_alive_loop, name="load keep-alive", daemon=True)
                self._keeper.start()

    def _run(self, task: Task):
        outcome = _outcome(task.network)
        if not self.record_on_threads:
            return outcome
        try:
            self._finish(task, outcome)
        finally:
            with self._lock:
                self._running.pop(task, None)
            db.connections.close_all()  # this thread's: a pool thread may idle for long
        return outcome

    def _finish(self, task: Task, outcome: tuple) -> None:
        try:
            counts = task.record(outcome)
        except Exception:
            # The database failed: the row stays ``loading``, no longer kept alive, and the
            # stale-loading sweep discards it.
            logger.exception("could not record the load of %s", task.model_name)
            return
        with self._lock:
            self._counts.update(counts or {})

    def keep_alive(self) -> int:
        """Refresh the ``loading`` rows of the loads still running (``keep_loading``)."""
        with self._lock:
            ids = [task.row_id for task in self._running if task.row_id is not None]
        return NodeModel.objects.keep_loading(ids)

    def _keep_alive_loop(self) -> None:
        while True:
            time.sleep(self.keep_alive_every)
            with self._lock:
                if not self._running:
                    self._keeper = None
                    return
            try:
                self.keep_alive()
            except Exception:
                logger.warning("could not keep the loading rows alive", exc_info=True)
            finally:
                db.connections.close_all()

    def drain(self) -> Counter:
        """Wait until every task is recorded (recording them here with
        ``record_on_threads=False``); returns the action counts recorded since the last drain."""
        kept_at = time.monotonic()
        while True:
            with self._lock:
                running = dict(self._running)
            if not running:
                break
            if self.record_on_threads:
                wait(list(running.values()), timeout=self.keep_alive_every)
                continue
            loads = {task: future for task, future in running.items() if task.network is not None}
            if not loads:  # the re-reading path, once the network loads are recorded
                for task in running:
                    self._finish(task, running[task].result())
                    with self._lock:
                        self._running.pop(task, None)
                continue
            done, _ = wait(list(loads.values()), timeout=self.keep_alive_every, return_when=FIRST_COMPLETED)
            for task, future in loads.items():
                if future in done:
                    self._finish(task, future.result())
                    with self._lock:
                        self._running.pop(task, None)
            if len(done) < len(loads) and time.monotonic() - kept_at >= self.keep_alive_every:
                self.keep_alive()
                kept_at = time.monotonic()
        with self._lock:
            counts, self._counts = self._counts, Counter()
        return counts

    def close(self) -> None:
        self._executor.shutdown(wait=False)


def keep_alive_every(cfg: ReconcileConfig) -> float:
    """A quarter of the stale-loading threshold: three refreshes may fail before a live row
    would look stale."""
    return max(0.05, cfg.stale_loading_after.total_seconds() / 4)


_process_pool: LoadPool | None = None
_process_lock = threading.Lock()


def process_pool(cfg: ReconcileConfig) -> LoadPool:
    """This process's long-lived pool, sized by ``CONTROLPLANE_RECONCILE_LOAD_CONCURRENCY``
    (made again, once idle, when the settings changed)."""
    global _process_pool
    with _process_lock:
        pool = _process_pool
        wanted = (cfg.load_concurrency, keep_alive_every(cfg))
        if pool is None or ((pool.size, pool.keep_alive_every) != wanted and not pool.busy()):
            if pool is not None:
                pool.close()
            _process_pool = pool = LoadPool(cfg.load_concurrency, keep_alive_every=keep_alive_every(cfg))
        return pool


def drain_process_pool() -> None:
    """Wait for this process's pool, if it has one, to record its running loads."""
    with _process_lock:
        pool = _process_pool
    if pool is not None:
        pool.drain()
