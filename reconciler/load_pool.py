"""The load pool: where a pass's claimed cold loads run, after the pass, outside its lock.

A pass decides and claims replica slots under the reconcile lock (``loading`` rows with their
VRAM reservations: what guarantees one loader per slot), hands each claimed load to a
``LoadPool`` and returns; the lock is released while the loads run. A pool has ``size``
threads (``CONTROLPLANE_RECONCILE_LOAD_CONCURRENCY``): never more than ``size`` loads of one
pool are in flight, across passes. The loads' outcomes are recorded through the verbs and
with their events as they finish, those that finished together at once (``Task.together``,
given by the scale-up phase: one ``mark_loaded_many`` and one event INSERT per batch, not one
each): a batch is whatever finished while the previous one was written, so a lone load waits
for no timer and a burst costs as few writes as the database's speed allows. Until its record
is written a finished load still counts as running (``free``) and its row is kept alive.

Two ways to run it:

- the process's pool (``process_pool``: the leader process, ``manage.py reconcile --loop``),
  long-lived, takes no more work than it has free threads (a pass claims at most that many
  slots; the next passes claim the rest as threads free up); a recorder thread records the
  outcomes (a task without ``together``, the re-reading path, and a failed load record
  themselves on their pool thread), and while any load runs or waits for its record a keep-alive thread refreshes its
  rows (``NodeModel.objects.keep_loading``) every quarter of
  ``CONTROLPLANE_RECONCILE_STALE_LOADING_AFTER``, so the stale-loading sweep only takes the
  rows of a dead process (a SIGKILLed qcluster: its threads died with it);
- a one-shot call's own pool (``reconcile_once``, ``record_on_threads=False``, ``queue=None``):
  the pass claims every slot its plans want at once, as before; loads not started within
  ``CONTROLPLANE_RECONCILE_SCALE_UP_BUDGET`` of the pass's start are discarded unstarted. Its
  threads run the network calls only, and the caller's ``drain`` records the outcomes on its own
  thread, in the same batches, keeping the rows alive while it waits; the re-reading path
  (eviction) runs there too, once the network loads are recorded.

If the process dies between a load's gRPC answer and its record, the row stays ``loading``
with its reservation, as when it dies during the load: no longer kept alive, it is discarded
by the stale-loading sweep and the backend stopped as an orphan.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from django import db

from registry.models import NodeModel

from .conf import ReconcileConfig

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Task:
    """One piece of work: ``network`` (no database, may be None) on a pool thread, then its
    record (database, events; returns action counts): ``record(outcome)`` alone, on the pool
    thread, or, with ``together``, ``together([(task, outcome), ...])`` on the recorder with
    every other finished task sharing that ``together`` (``item``: what it needs of the task).
    ``row_id``: the ``loading`` row to keep alive meanwhile, until it is recorded."""

    model_name: str
    record: object = None
    network: object = None
    row_id: object = None
    together: object = None
    item: object = None


def _outcome(network) -> tuple:
    if network is None:
        return (None, None)
    try:
        return (network(), None)
    except Exception as exc:  # the load's failure, recorded by ``record``
        return (None, exc)


#: The failed loads of this process's pools not yet reported by a pass (model -> error text).
FAILURES: dict[str, str] = {}

#: How long the recorder keeps its database connection while no load finishes.
RECORDER_IDLE = 1.0


class LoadPool:
    def __init__(self, size: int, *, keep_alive_every: float, record_on_threads: bool = True, queue: int | None = 0):
        self.size = max(1, int(size))
        self.queue = queue  # claimed loads it takes beyond its free threads (None: any number)
        self.keep_alive_every = float(keep_alive_every)
        self.record_on_threads = record_on_threads
        self._executor = ThreadPoolExecutor(max_workers=self.size, thread_name_prefix="load")
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a task finished its network, or was recorded
        self._running: dict[Task, object] = {}  # task -> future, until recorded
        self._finished: list[tuple[Task, tuple]] = []  # network done, not yet recorded, in order
        self._counts: Counter = Counter()
        self._keeper: threading.Thread | None = None
        self._recorder: threading.Thread | None = None
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
            if self.record_on_threads and task.together is not None and self._recorder is None:
                self._recorder = threading.Thread(target=self._record_loop, name="load recorder", daemon=True)
                self._recorder.start()

    def _run(self, task: Task):
        outcome = _outcome(task.network)
        # Recorded alone, on this thread: the re-reading path, and a failed load, whose record
        # stops its backend (a network call that must not hold up the batch of the others).
        if self.record_on_threads and (task.together is None or outcome[1] is not None):
            try:
                self._finish([(task, outcome)])
            finally:
                db.connections.close_all()  # this thread's: a pool thread may idle for long
            return outcome
        # Recorded by the recorder thread (or the one-shot caller's ``drain``) with the loads
        # that finished meanwhile: one write for all of them, not one each.
        with self._changed:
            self._finished.append((task, outcome))
            self._changed.notify_all()
        return outcome

    def _finish(self, finished: list[tuple[Task, tuple]]) -> None:
        """Record tasks whose network is done: those sharing a ``together`` in one call, the
        others one by one; then they are no longer running (nor kept alive)."""
        groups: dict = {}
        for task, outcome in finished:
            groups.setdefault(task.together, []).append((task, outcome))
        try:
            for together, items in groups.items():
                if together is None:
                    for task, outcome in items:
                        self._record(task.model_name, task.record, outcome)
                else:
                    names = sorted({task.model_name for task, _ in items})
                    self._record(", ".join(names), together, items)
        finally:
            with self._changed:
                for task, _ in finished:
                    self._running.pop(task, None)
                self._changed.notify_all()

    def _record(self, model_name: str, record, argument) -> None:
        try:
            counts = record(argument)
        except Exception:
            # The database failed: the rows stay ``loading``, no longer kept alive, and the
            # stale-loading sweep discards them.
            logger.exception("could not record the load(s) of %s", model_name)
            return
        with self._lock:
            self._counts.update(counts or {})

    def _record_loop(self) -> None:
        """The recorder: whatever finished while it wrote the previous batch is the next batch,
        so a write waits for no timer and the writes are as few as the database's speed allows."""
        try:
            while True:
                with self._changed:
                    while not self._finished:
                        if not any(task.together is not None for task in self._running):
                            self._recorder = None  # ``submit`` starts another for later loads
                            return
                        if not self._changed.wait(timeout=RECORDER_IDLE):
                            db.connections.close_all()  # idle: do not hold a connection meanwhile
                    finished, self._finished = self._finished, []
                try:
                    db.close_old_connections()  # a kept connection past its age or broken: a new one
                    self._finish(finished)  # no longer running afterwards, whatever happened
                except Exception:  # the thread must live on: ``drain`` waits for the next batches
                    logger.exception("the load recorder failed")
        finally:
            with self._lock:
                if self._recorder is threading.current_thread():
                    self._recorder = None
            db.connections.close_all()

    def keep_alive(self) -> int:
        """Refresh the ``loading`` rows of the loads still running or unrecorded (``keep_loading``)."""
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
        ``record_on_threads=False``: the finished network loads together, as the recorder
        does, the re-reading path once they are all recorded); returns the action counts
        recorded since the last drain."""
        kept_at = time.monotonic()
        while True:
            with self._changed:
                if not self._running:
                    break
                batch = [] if self.record_on_threads else self._take()
                if not batch:
                    self._changed.wait(timeout=self.keep_alive_every)
            if batch:
                self._finish(batch)
            if not self.record_on_threads and time.monotonic() - kept_at >= self.keep_alive_every:
                self.keep_alive()
                kept_at = time.monotonic()
        with self._lock:
            counts, self._counts = self._counts, Counter()
        return counts

    def _take(self) -> list[tuple[Task, tuple]]:
        """(Lock held, one-shot pool.) What ``drain`` records next: the finished network loads,
        all at once; the re-reading path's tasks once no network load is left to record
        (they re-read the placement state the loads change)."""
        loads = [item for item in self._finished if item[0].network is not None]
        if loads:
            self._finished = [item for item in self._finished if item[0].network is None]
            return loads
        if self._finished and not any(task.network is not None for task in self._running):
            taken, self._finished = self._finished, []
            return taken
        return []

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
