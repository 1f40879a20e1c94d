"""The gRPC ``controlplane.worker.v1.Worker`` service: the control plane's handle on a worker.

Every call is authenticated by :class:`worker.grpc_auth.BearerTokenInterceptor` (the worker
command token the control plane handed over at registration, never the fleet registration
token, and ``x-node-id`` when both sides know the node id). The servicer only maps
between protobuf and :class:`worker.processes.BackendSupervisor`; error classes map to status
codes here and nowhere else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent import futures

import grpc

from proto import worker_pb2, worker_pb2_grpc
from worker.grpc_auth import BearerTokenInterceptor
from worker.processes import (
    BackendMismatch,
    BackendSnapshot,
    BackendStartFailed,
    BackendSupervisor,
    NoFreePort,
    ShuttingDown,
    State,
    UnknownBackendType,
)

log = logging.getLogger("worker.service")


class BindError(RuntimeError):
    """The worker service cannot listen on the requested address."""


_STATUS_OF_ERROR = {
    UnknownBackendType: grpc.StatusCode.INVALID_ARGUMENT,
    NoFreePort: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BackendMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    BackendStartFailed: grpc.StatusCode.INTERNAL,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
}

_STATE = {
    State.STARTING: worker_pb2.BackendProcess.STARTING,
    State.RUNNING: worker_pb2.BackendProcess.RUNNING,
    State.EXITED: worker_pb2.BackendProcess.EXITED,
}


def backend_process_message(snap: BackendSnapshot) -> worker_pb2.BackendProcess:
    return worker_pb2.BackendProcess(
        model_name=snap.model_name,
        backend_type=snap.backend_type,
        replica_index=snap.replica_index,
        address=snap.address,
        state=_STATE[snap.state],
        pid=snap.pid,
        exit_code=snap.exit_code or 0,
        last_stderr=snap.last_stderr,
        started_at_unix_ms=int(snap.started_at * 1000),
        memory_bytes=snap.memory_bytes or 0,
    )


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, supervisor: BackendSupervisor, node_id: Callable[[], str | None] = lambda: None):
        self.supervisor = supervisor
        self._node_id = node_id

    def StartBackend(self, request, context):
        if not request.model_name:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model_name is required")
        if request.replica_index < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "replica_index must be >= 0")
        try:
            snap, reused = self.supervisor.start(request.model_name, request.backend_type, request.replica_index)
        except tuple(_STATUS_OF_ERROR) as exc:
            log.warning(
                "model=%s replica=%d StartBackend refused: %s",
                request.model_name,
                request.replica_index,
                str(exc).splitlines()[0],
            )
            context.abort(_STATUS_OF_ERROR[type(exc)], str(exc))
        return worker_pb2.StartBackendResponse(address=snap.address, reused=reused, pid=snap.pid)

    def StopBackend(self, request, context):
        stopped = self.supervisor.stop(request.model_name, request.replica_index)
        return worker_pb2.StopBackendResponse(stopped=stopped)

    def UnloadModel(self, request, context):
        if not request.model_name:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model_name is required")
        return worker_pb2.UnloadModelResponse(stopped=self.supervisor.unload_model(request.model_name))

    def ListBackends(self, request, context):
        return worker_pb2.ListBackendsResponse(
            node_id=self._node_id() or "",
            backends=[backend_process_message(s) for s in self.supervisor.snapshots()],
        )


def build_server(
    supervisor: BackendSupervisor,
    *,
    token: str | Callable[[], str | None],
    bind: str,
    node_id: Callable[[], str | None] = lambda: None,
    max_workers: int = 32,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.Server, int]:
    """Create and start the worker's gRPC server on ``bind`` (``host:port``, port 0 = any),
    serving TLS with ``credentials`` (``proto.tls.server_credentials``), plaintext without.

    Returns ``(server, port)``. Raises :class:`BindError` when the address cannot be bound. The thread
    pool is large because StartBackend blocks while a backend comes up.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="worker-rpc"),
        interceptors=[BearerTokenInterceptor(token, node_id)],
        # A second worker on the same port must fail to start, not share the port.
        options=[("grpc.so_reuseport", 0)],
    )
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerService(supervisor, node_id), server)
    try:
        port = server.add_secure_port(bind, credentials) if credentials else server.add_insecure_port(bind)
    except RuntimeError:
        port = 0
    if port == 0:
        raise BindError(f"cannot bind the worker service to {bind}")
    server.start()
    return server, port
