"""A request's hold on a replica: route (a lease), wait for a cold load, release, report an
unreachable replica. The registry is sync Django ORM; every call to it runs on a bounded pool of
threads (:class:`Database`), never on the event loop, and no transaction is open while a gRPC
call runs (each verb commits before it returns).

Leases are never leaked by a cancelled request (a client that hung up): a route call already
running in a thread finishes there, and the lease it grants is released as soon as it does; a
release is never interrupted once started.

The database threads' PostgreSQL sessions commit asynchronously (``synchronous_commit = off``,
unless ``GATEWAY_SYNCHRONOUS_COMMIT``): a commit returns without waiting for its WAL flush, which
was most of a lease's cost (each request commits twice, the grant and the release, and the
replica's row stays locked until a commit's flush ends). A PostgreSQL crash can lose the last
fraction of a second of the gateway's writes, never a part of one, and never one that another
process's synchronous commit came after: the database is then as if the gateway had stopped
writing a moment earlier, which the registry survives anyway (a lease whose release was lost
expires; a lost lease grant took its in-flight increment with it; a lost load-job claim is made
again by the next request). It is a session ``SET``: behind a pooler in transaction mode it would
outlive the session on a shared server connection, hence the setting to turn it off there.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connections
from django.db.backends.signals import connection_created

from core.credentials import backend_token
from core.models import ApiKey
from registry import router
from registry.models import Lease, LoadJob, ModelLoadInfo, NodeModel

from .errors import invalid, model_not_found, unavailable

logger = logging.getLogger(__name__)

JOB_POLL_SECONDS = 0.2  # between reads of a load job a cold request waits on
# A lease outlives the request's deadline by this much, so it only expires on its own when the
# gateway died holding it.
LEASE_MARGIN_SECONDS = 60.0


# How often (seconds, per database thread) a kept connection is checked before use, as Django
# checks one at the start and end of each request: a per-call check would add a round trip to
# each of a request's three calls (key, route, release).
CONNECTION_CHECK_INTERVAL = 1.0
_thread_state = threading.local()


def _with_connection(fn, *args):
    """Run ``fn`` with a usable connection: an expired or broken one is dropped first (at most
    once a second per thread), and one that failed is checked (and dropped) right after."""
    now = time.monotonic()
    if now - getattr(_thread_state, "checked_at", -CONNECTION_CHECK_INTERVAL) >= CONNECTION_CHECK_INTERVAL:
        close_old_connections()
        _thread_state.checked_at = now
    try:
        return fn(*args)
    except DatabaseError:
        close_old_connections()
        raise


def _mark_database_thread() -> None:
    _thread_state.gateway = True


def _session_settings(sender, connection, **kwargs) -> None:
    """A connection opened by one of the gateway's database threads commits asynchronously
    (module docstring); every other connection of the process is left as it is."""
    if (
        getattr(_thread_state, "gateway", False)
        and connection.vendor == "postgresql"
        and not settings.GATEWAY_SYNCHRONOUS_COMMIT
    ):
        with connection.cursor() as cursor:
            cursor.execute("SET synchronous_commit TO off")


connection_created.connect(_session_settings, dispatch_uid="gateway.serving.session_settings")


class Database:
    """A bounded thread pool for the ORM; log context (request id, model) follows each call."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._executor = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="gateway-db", initializer=_mark_database_thread
        )

    def future(self, fn, *args) -> asyncio.Future:
        context = contextvars.copy_context()
        return asyncio.get_running_loop().run_in_executor(self._executor, context.run, _with_connection, fn, *args)

    async def run(self, fn, *args):
        return await self.future(fn, *args)

    def submit(self, fn, *args) -> None:
        """Fire and forget (from a callback, where nothing can await)."""
        self._executor.submit(contextvars.copy_context().run, _with_connection, fn, *args)

    def shutdown(self) -> None:
        """Wait for the work in progress, then close every thread's database connection (one
        closing task per thread: each waits at a barrier until all threads hold one)."""
        barrier = threading.Barrier(self.threads)

        def close_connections() -> None:
            try:
                barrier.wait(timeout=10)
            except threading.BrokenBarrierError:
                pass
            connections.close_all()

        for _ in range(self.threads):
            self._executor.submit(close_connections)
        self._executor.shutdown(wait=True)


@dataclass(frozen=True)
class Leased:
    """A replica leased for one request: where to call it and with what."""

    lease_id: object
    model_name: str
    node_id: object
    node_name: str
    replica_index: int
    address: str
    model_identity: str
    token: str


# --- what runs in the database threads --------------------------------------------------------


def authenticate(token: str) -> ApiKey | None:
    """An active API key of role frontend or operator (core's verification through this
    process's cache of verified keys, as the web process's: ``API_KEY_CACHE_SECONDS``), or None."""
    return _accepted(ApiKey.objects.verify(token))


def _accepted(key: ApiKey | None) -> ApiKey | None:
    if key is None or key.role not in (ApiKey.Role.FRONTEND, ApiKey.Role.OPERATOR):
        return None
    return key


def _route(model: str, affinity_key: str | None = None) -> Leased | object:
    """A lease (``Leased``), or the id of the load job that is loading the model (not waited on
    here: the caller polls it without holding a thread)."""
    try:
        result = router.route(
            model,
            wait=0,
            lease_ttl=settings.GATEWAY_REQUEST_TIMEOUT + LEASE_MARGIN_SECONDS,
            affinity_key=affinity_key,
        )
    except router.NoLoadInfo:
        raise model_not_found(model) from None
    except router.NoMatchingNodes as error:
        # Checked by the router before the model's load info: with no healthy node at all, a
        # name nobody configured is still unknown first.
        if not _known(model):
            raise model_not_found(model) from None
        raise unavailable(error.message, code=error.code, retry_after=settings.ROUTE_RETRY_AFTER_SECONDS) from None
    except router.RouterError as error:
        raise unavailable(error.message, code=error.code, retry_after=settings.ROUTE_RETRY_AFTER_SECONDS) from None
    except ValueError as error:
        raise invalid(str(error), param="model") from None
    if result.lease is None:
        return result.load_job.pk
    lease = result.lease
    return Leased(
        lease_id=lease.pk,
        model_name=lease.model_name,
        node_id=lease.node_id,
        node_name=result.node_name,
        replica_index=lease.replica_index,
        address=lease.address,
        model_identity=result.model_identity,
        token=backend_token(lease.node_id),
    )


def _known(model: str) -> bool:
    return (
        ModelLoadInfo.objects.filter(model_name=model).exists() or NodeModel.objects.filter(model_name=model).exists()
    )


def _job_outcome(job_id) -> tuple[str, str, str]:
    row = LoadJob.objects.filter(pk=job_id).values_list("state", "error_code", "error_message").first()
    return row or (LoadJob.State.FAILED, "load_failed", "the load job disappeared")


def _release(lease_id) -> bool:
    return Lease.objects.release(lease_id)


def _remove_unreachable(leased: Leased) -> bool:
    """As the router's warm path does with a replica that does not answer: release the lease,
    then remove the row (the reconciler stops any backend left behind)."""
    Lease.objects.release(leased.lease_id)
    return NodeModel.objects.remove_replica(leased.node_id, leased.model_name, leased.replica_index)


# --- the async side -------------------------------------------------------------------------


class Serving:
    """Lease handling for the gateway's handlers, on one event loop."""

    def __init__(self, database: Database) -> None:
        self.db = database

    async def authenticate(self, token: str) -> ApiKey | None:
        # A key verified in the last API_KEY_CACHE_SECONDS is answered here, on the event loop:
        # no database access, so no hop to a database thread and back.
        cached = ApiKey.objects.cached(token)
        if cached is not None:
            return _accepted(cached)
        return await self.database(authenticate, token)

    async def database(self, fn, *args):
        """``fn(*args)`` on a database thread; an unreachable database is a 503."""
        try:
            return await self.db.run(fn, *args)
        except DatabaseError as error:
            logger.warning("database unavailable: %s", error)
            raise unavailable(
                "The control plane's database is unavailable.",
                code="database_unavailable",
                retry_after=settings.ROUTE_RETRY_AFTER_SECONDS,
            ) from None

    async def acquire(self, model: str, affinity_key: str | None = None) -> Leased:
        """Lease a replica of ``model``; a model being loaded is waited for up to
        ``GATEWAY_LOAD_WAIT_SECONDS``, then 503 ``model_loading`` with Retry-After."""
        deadline = time.monotonic() + float(settings.GATEWAY_LOAD_WAIT_SECONDS)
        while True:
            outcome = await self._route(model, affinity_key)
            if isinstance(outcome, Leased):
                return outcome
            await self._wait_for_job(model, outcome, deadline)

    async def _route(self, model: str, affinity_key: str | None = None) -> Leased | object:
        future = self.db.future(_route, model, affinity_key)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The client hung up while the route ran: the lease it grants is not ours to keep.
            future.add_done_callback(self._release_orphan)
            raise
        except DatabaseError as error:
            logger.warning("database unavailable: %s", error)
            raise unavailable(
                "The control plane's database is unavailable.",
                code="database_unavailable",
                retry_after=settings.ROUTE_RETRY_AFTER_SECONDS,
            ) from None

    def _release_orphan(self, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is None and isinstance(future.result(), Leased):
            self.db.submit(_release, future.result().lease_id)

    async def _wait_for_job(self, model: str, job_id, deadline: float) -> None:
        """Return once the job succeeded (route again); raise when it failed or time ran out."""
        while True:
            state, code, message = await self.database(_job_outcome, job_id)
            if state == LoadJob.State.SUCCEEDED:
                return
            if state == LoadJob.State.FAILED:
                error = router.error_from_code(code, message)
                raise unavailable(
                    f"Loading {model!r} failed: {error.message}",
                    code=error.code,
                    retry_after=settings.ROUTE_RETRY_AFTER_SECONDS,
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise unavailable(
                    f"The model {model!r} is being loaded; retry shortly.",
                    code="model_loading",
                    retry_after=settings.ROUTE_RETRY_AFTER_SECONDS,
                )
            await asyncio.sleep(min(JOB_POLL_SECONDS, remaining))

    async def release(self, leased: Leased) -> None:
        """Give the lease back; runs to its end even if the request is cancelled meanwhile."""
        future = self.db.future(_release, leased.lease_id)
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            raise  # the release goes on in its thread
        except Exception:
            logger.warning("releasing lease %s failed; it expires on its own", leased.lease_id, exc_info=True)

    async def report_unreachable(self, leased: Leased, reason: str) -> None:
        """The replica did not answer (or answers for another model): release and remove it."""
        logger.warning(
            "replica %s of %s at %s on %s: %s; removing it and re-routing",
            leased.replica_index,
            leased.model_name,
            leased.address or "(no address)",
            leased.node_name,
            reason,
        )
        future = self.db.future(_remove_unreachable, leased)
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning("removing replica %s of %s failed", leased.replica_index, leased.model_name, exc_info=True)
