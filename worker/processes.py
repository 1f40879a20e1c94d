"""The worker's backend processes: one per (model_name, replica_index), each on its own port.

:class:`BackendSupervisor` is the only place that starts, watches and stops them.

Concurrency: one ``threading.Lock`` per key serialises start/stop of that key (a concurrent
StartBackend for the same replica waits and then gets the process the first call started, with
``reused=True``); the table lock ``_lock`` guards the dict, port bookkeeping and state fields and
is never held across a process wait or a gRPC call. A supervisor thread polls ``Popen.poll``
every ``poll_interval`` seconds and marks dead processes EXITED; each process has a reader thread
that keeps the last lines of its output in a bounded ring buffer.
"""

from __future__ import annotations

import collections
import concurrent.futures
import enum
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from proto import backend_pb2, backend_pb2_grpc, tls
from worker.backend_tls import BACKEND_TLS_ENV, BackendTls, backend_channel
from worker.config import ECHO_BACKEND, join_host_port

log = logging.getLogger("worker.processes")

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)

#: Lines of output kept per process, and how many of them an error message carries.
RING_LINES = 200
ERROR_LINES = 20
ERROR_CHARS = 4000


_SETPRIV = shutil.which("setpriv")


def _die_with_parent(argv: list[str]) -> list[str]:
    """Prefix ``argv`` so the kernel SIGKILLs the backend when its worker dies.

    ``setpriv --pdeathsig`` (util-linux) sets PR_SET_PDEATHSIG and execs the backend. A
    Python ``preexec_fn`` cannot do this here: forking with gRPC's threads running and then
    running Python code in the child crashes it. Where setpriv is missing, a SIGKILLed worker
    can leave orphans (the reconciler stops orphans it finds through ListBackends).
    """
    if _SETPRIV is None:
        return argv
    return [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]


class BackendError(Exception):
    """Base of the errors StartBackend maps to gRPC status codes."""


class UnknownBackendType(BackendError):
    pass


class NoFreePort(BackendError):
    pass


class BackendMismatch(BackendError):
    """A live process for the key runs another backend_type."""


class BackendStartFailed(BackendError):
    """The process exited or did not answer Health in time; the message carries its output."""


class ShuttingDown(BackendError):
    pass


class State(enum.Enum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    EXITED = "EXITED"


class OutputRing:
    """The last ``maxlen`` lines a process wrote, filled by one reader thread."""

    def __init__(self, stream, label: str, maxlen: int = RING_LINES):
        self._lines: collections.deque[str] = collections.deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self._label = label
        self._thread = threading.Thread(target=self._read, args=(stream,), name=f"output {label}", daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip()
                with self._lock:
                    self._lines.append(line)
                log.debug("%s | %s", self._label, line)
        except (OSError, ValueError):
            pass  # stream closed under us while stopping
        finally:
            stream.close()

    def tail(self, lines: int = ERROR_LINES, chars: int = ERROR_CHARS) -> str:
        with self._lock:
            text = "\n".join(list(self._lines)[-lines:])
        return text[-chars:]

    def tail_one_line(self, lines: int = 5) -> str:
        """The last lines joined with `` | ``, for a one-line log event."""
        return self.tail(lines, 1000).replace("\n", " | ") or "(no output)"

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@dataclass
class BackendProcess:
    """One backend process and what the worker knows about it (mutated under the table lock)."""

    model_name: str
    replica_index: int
    backend_type: str
    port: int
    address: str
    popen: subprocess.Popen
    output: OutputRing
    state: State = State.STARTING
    started_at: float = field(default_factory=time.time)
    exit_code: int | None = None
    #: Last memory figure reported through Status; None until the backend answered once.
    memory_bytes: int | None = None
    #: The LOCALAI_GRPC_AUTH_TOKEN it was started with (the worker's own calls present it).
    auth_token: str | None = field(default=None, repr=False)
    #: Serves TLS (started with the BACKEND_TLS_* environment; its address is grpcs://...).
    tls: bool = False

    @property
    def key(self) -> tuple[str, int]:
        return (self.model_name, self.replica_index)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def label(self) -> str:
        return f"model={self.model_name} replica={self.replica_index}"

    def last_output(self) -> str:
        return self.output.tail()


@dataclass(frozen=True)
class BackendSnapshot:
    """A read-only copy of a :class:`BackendProcess`, safe to use without locks."""

    model_name: str
    replica_index: int
    backend_type: str
    address: str
    state: State
    pid: int
    exit_code: int | None
    last_stderr: str
    started_at: float
    memory_bytes: int | None


def _port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Like a server would: a port whose old connections linger in TIME_WAIT is usable.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def backend_metadata(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


class BackendSupervisor:
    """Starts, watches and stops backend processes.

    ``backends`` maps backend_type names to argv prefixes; a process is launched as
    ``argv + ["--addr", f"{bind_host}:{port}"]`` with ``LOCALAI_GRPC_AUTH_TOKEN`` = ``auth_token``
    (the node's backend token; the agent sets the attribute once registration hands it over,
    and each process keeps the token it was started with), and the address handed back is
    ``f"{advertise_host}:{port}"``, prefixed ``grpcs://`` for a backend type ``tls`` serves
    (started with the ``BACKEND_TLS_*`` environment). ``exclude_ports`` are never handed
    out (the worker's own port).
    """

    def __init__(
        self,
        backends: dict[str, list[str]],
        *,
        auth_token: str | None,
        advertise_host: str = "127.0.0.1",
        bind_host: str | None = None,
        port_range: tuple[int, int] = (50100, 50199),
        exclude_ports: tuple[int, ...] = (),
        health_timeout: float = 30.0,
        stop_grace: float = 5.0,
        poll_interval: float = 1.0,
        tls: BackendTls | None = None,
    ):
        self.backends = dict(backends)
        self.tls = tls
        self.auth_token = auth_token
        self.advertise_host = advertise_host
        self.bind_host = bind_host or advertise_host
        self.port_range = port_range
        self.exclude_ports = set(exclude_ports)
        self.health_timeout = health_timeout
        self.stop_grace = stop_grace
        self.poll_interval = poll_interval
        self._lock = threading.Lock()
        self._processes: dict[tuple[str, int], BackendProcess] = {}
        self._key_locks: dict[tuple[str, int], threading.Lock] = {}
        self._ports_in_use: set[int] = set()
        self._closed = False
        self._stop_watching = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="backend supervisor", daemon=True)
        self._watcher.start()
        # Every backend is forked from this one long-lived thread: PR_SET_PDEATHSIG fires when
        # the *thread* that forked a child exits, so forking from short-lived request threads
        # would kill backends when those threads end.
        self._spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="backend-spawner")

    # ----- start -------------------------------------------------------------------------

    def start(self, model_name: str, backend_type: str, replica_index: int) -> tuple[BackendSnapshot, bool]:
        """Start (or reuse) the process of (model_name, replica_index).

        Returns ``(snapshot, reused)``; ``reused`` is True when a live process for the key
        already existed (it is returned as is). A process of the key that exited is replaced.
        Blocks until the new process answers Health ``OK`` (at most ``health_timeout``).
        Raises :class:`UnknownBackendType`, :class:`NoFreePort`, :class:`BackendMismatch`,
        :class:`BackendStartFailed` or :class:`ShuttingDown`.
        """
        if backend_type not in self.backends:
            raise UnknownBackendType(f"unknown backend_type {backend_type!r}; this worker has {sorted(self.backends)}")
        key = (model_name, replica_index)
        with self._key_lock(key):
            if self._closed:
                raise ShuttingDown("worker is shutting down")
            existing = self._processes.get(key)
            if existing is not None and existing.popen.poll() is None:
                if existing.backend_type != backend_type:
                    raise BackendMismatch(
                        f"replica {replica_index} of {model_name} runs backend "
                        f"{existing.backend_type!r}, not {backend_type!r}; stop it first"
                    )
                log.info("%s backend reused pid=%d address=%s", existing.label, existing.pid, existing.address)
                return self._snapshot(existing), True
            if existing is not None:
                log.info("%s restarting backend that exited with %s", existing.label, existing.exit_code)
                self._forget(existing)
            proc = self._spawn(model_name, backend_type, replica_index)
            self._wait_healthy(proc)
            if self._closed:  # shutdown began while it came up: do not hand out a doomed process
                self._terminate(proc, free=False)
                self._forget(proc)
                raise ShuttingDown("worker is shutting down")
            return self._snapshot(proc), False

    def _key_lock(self, key: tuple[str, int]) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def _allocate_port(self) -> int:
        low, high = self.port_range
        with self._lock:
            for port in range(low, high + 1):
                if port in self._ports_in_use or port in self.exclude_ports:
                    continue
                # Skip ports something else on the machine holds (a backend of another worker,
                # a leftover process) instead of starting a backend that cannot bind.
                if _port_is_free(self.bind_host, port):
                    self._ports_in_use.add(port)
                    return port
        raise NoFreePort(f"no free port in {low}-{high}")

    def _spawn(self, model_name: str, backend_type: str, replica_index: int) -> BackendProcess:
        port = self._allocate_port()
        argv = [*self.backends[backend_type], "--addr", join_host_port(self.bind_host, port)]
        env = dict(os.environ)
        # A backend holds the node's data-plane credential and nothing else: never the fleet
        # registration token (it would let anything that reads the backend's environment
        # register nodes) nor the worker's command token.
        env.pop("CONTROLPLANE_REGISTRATION_TOKEN", None)
        env.pop("WORKER_SERVICE_TOKEN", None)
        auth_token = self.auth_token
        if auth_token:
            env["LOCALAI_GRPC_AUTH_TOKEN"] = auth_token
        else:
            env.pop("LOCALAI_GRPC_AUTH_TOKEN", None)
        for name in BACKEND_TLS_ENV:
            env.pop(name, None)
        serves_tls = self.tls is not None and backend_type in self.tls.backend_types
        if serves_tls:
            env.update(self.tls.environment())
        if backend_type == ECHO_BACKEND:
            # The built-in backend imports this repository's packages wherever we run from.
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [_REPO_ROOT, env.get("PYTHONPATH")]))
        label = f"model={model_name} replica={replica_index}"
        try:
            popen = self._spawner.submit(
                subprocess.Popen,
                # Die with the worker: a SIGKILLed worker must not leave orphan backends.
                _die_with_parent(argv),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                # Own process group: a terminal's Ctrl+C reaches the worker only, which then
                # stops its backends in order (Free, SIGTERM, SIGKILL).
                start_new_session=True,
            ).result()
        except OSError as exc:
            with self._lock:
                self._ports_in_use.discard(port)
            raise BackendStartFailed(f"{label}: cannot execute {argv[0]!r}: {exc}") from exc
        proc = BackendProcess(
            model_name=model_name,
            replica_index=replica_index,
            backend_type=backend_type,
            port=port,
            address=(tls.tls_address if serves_tls else str)(join_host_port(self.advertise_host, port)),
            popen=popen,
            output=OutputRing(popen.stdout, label),
            auth_token=auth_token,
            tls=serves_tls,
        )
        with self._lock:
            self._processes[proc.key] = proc
        log.info("%s backend %s spawned pid=%d port=%d", label, backend_type, popen.pid, port)
        return proc

    def _wait_healthy(self, proc: BackendProcess) -> None:
        deadline = time.monotonic() + self.health_timeout
        with self._channel(proc) as channel:
            stub = backend_pb2_grpc.BackendStub(channel)
            while True:
                if self._closed:
                    return  # the worker is stopping: start() stops the process (a stop must not wait for it)
                if proc.popen.poll() is not None:
                    self._fail_start(proc, f"exited with code {proc.popen.returncode} before answering Health")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._fail_start(proc, f"did not answer Health within {self.health_timeout:g}s")
                try:
                    reply = stub.Health(
                        backend_pb2.HealthMessage(),
                        timeout=min(1.0, max(remaining, 0.05)),
                        metadata=backend_metadata(proc.auth_token),
                    )
                    if reply.message == b"OK":
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        with self._lock:
            if proc.state is State.STARTING:
                proc.state = State.RUNNING
        log.info("%s backend healthy pid=%d address=%s", proc.label, proc.pid, proc.address)

    def _fail_start(self, proc: BackendProcess, why: str):
        self._terminate(proc, free=False)
        output = proc.last_output()
        log.error(
            "%s backend %s %s; last output: %s",
            proc.label,
            proc.backend_type,
            why,
            proc.output.tail_one_line(),
        )
        message = f"backend {proc.backend_type} for {proc.label} {why}"
        raise BackendStartFailed(f"{message}; last output:\n{output}" if output else message)

    # ----- stop --------------------------------------------------------------------------

    def stop(self, model_name: str, replica_index: int) -> bool:
        """Stop and forget the process of the key: Free, SIGTERM, SIGKILL after ``stop_grace``.

        Returns True when a live process was stopped, False when there was none (an EXITED
        entry is reaped, i.e. removed from the table, and still counts as False).
        """
        key = (model_name, replica_index)
        with self._key_lock(key):
            proc = self._processes.get(key)
            if proc is None:
                return False
            was_alive = proc.popen.poll() is None
            self._terminate(proc, free=was_alive)
            self._forget(proc)
        if was_alive:
            log.info("%s backend stopped pid=%d", proc.label, proc.pid)
        return was_alive

    def unload_model(self, model_name: str) -> int:
        """Stop every replica process of ``model_name``; returns how many were running."""
        with self._lock:
            keys = [key for key in self._processes if key[0] == model_name]
        return sum(self.stop(*key) for key in sorted(keys))

    def stop_all(self) -> int:
        """Refuse further starts, stop every process and the supervisor thread."""
        with self._lock:
            self._closed = True
            keys = list(self._processes)
        threads = []
        results: list[bool] = []

        def stop_one(key):
            results.append(self.stop(*key))

        for key in keys:  # in parallel: each may wait for a grace period
            thread = threading.Thread(target=stop_one, args=(key,), name=f"stop {key}")
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
        self._stop_watching.set()
        self._watcher.join(timeout=5)
        return sum(results)

    def _terminate(self, proc: BackendProcess, *, free: bool) -> None:
        """Free (UNIMPLEMENTED tolerated), SIGTERM, SIGKILL; release the port. Key lock held."""
        popen = proc.popen
        if free and popen.poll() is None:
            self._free(proc)
        if popen.poll() is None:
            self._signal(popen, signal.SIGTERM)
            try:
                popen.wait(self.stop_grace)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s backend pid=%d ignored SIGTERM for %gs; killing", proc.label, popen.pid, self.stop_grace
                )
                self._signal(popen, signal.SIGKILL)
                popen.wait()
        else:
            popen.wait()
        proc.output.join(timeout=2)
        with self._lock:
            proc.state = State.EXITED
            proc.exit_code = popen.returncode
            self._ports_in_use.discard(proc.port)

    @staticmethod
    def _signal(popen: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(popen.pid, sig)  # the backend and anything it spawned
        except (ProcessLookupError, PermissionError):
            try:
                popen.send_signal(sig)
            except ProcessLookupError:
                pass

    def _free(self, proc: BackendProcess) -> None:
        try:
            with self._channel(proc) as channel:
                result = backend_pb2_grpc.BackendStub(channel).Free(
                    backend_pb2.HealthMessage(), timeout=5, metadata=backend_metadata(proc.auth_token)
                )
            if not result.success:
                log.warning("%s Free answered success=false: %s", proc.label, result.message)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                log.warning("%s Free failed: %s %s", proc.label, exc.code().name, exc.details())

    def _forget(self, proc: BackendProcess) -> None:
        with self._lock:
            if self._processes.get(proc.key) is proc:
                del self._processes[proc.key]
            self._ports_in_use.discard(proc.port)

    def _channel(self, proc: BackendProcess) -> grpc.Channel:
        """A channel for the worker's own call to ``proc`` (TLS when it serves TLS)."""
        return backend_channel(self._dial_address(proc), self.tls if proc.tls else None, self.advertise_host)

    def _dial_address(self, proc: BackendProcess) -> str:
        if self.bind_host in ("0.0.0.0", "::", ""):  # listening everywhere: dial loopback
            return f"127.0.0.1:{proc.port}"
        return join_host_port(self.bind_host, proc.port)

    # ----- watching ----------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop_watching.wait(self.poll_interval):
            self.reap_exited()

    def reap_exited(self) -> list[BackendSnapshot]:
        """Mark processes that died on their own EXITED; returns the newly exited ones."""
        with self._lock:
            live = [p for p in self._processes.values() if p.state is not State.EXITED]
        exited = []
        for proc in live:
            code = proc.popen.poll()
            if code is None:
                continue
            with self._lock:
                if proc.state is State.EXITED:
                    continue
                proc.state = State.EXITED
                proc.exit_code = code
                proc.memory_bytes = 0
                self._ports_in_use.discard(proc.port)
            proc.output.join(timeout=1)
            log.warning(
                "%s backend pid=%d exited with code %d; last output: %s",
                proc.label,
                proc.pid,
                code,
                proc.output.tail_one_line(),
            )
            exited.append(self._snapshot(proc))
        return exited

    def snapshots(self) -> list[BackendSnapshot]:
        """Every known process, including exited ones not yet reaped by :meth:`stop`."""
        self.reap_exited()
        with self._lock:
            procs = sorted(self._processes.values(), key=lambda p: p.key)
        return [self._snapshot(p) for p in procs]

    def get(self, model_name: str, replica_index: int) -> BackendSnapshot | None:
        with self._lock:
            proc = self._processes.get((model_name, replica_index))
        return None if proc is None else self._snapshot(proc)

    def _snapshot(self, proc: BackendProcess) -> BackendSnapshot:
        with self._lock:
            return BackendSnapshot(
                model_name=proc.model_name,
                replica_index=proc.replica_index,
                backend_type=proc.backend_type,
                address=proc.address,
                state=proc.state,
                pid=proc.pid,
                exit_code=proc.exit_code,
                last_stderr=proc.last_output() if proc.state is State.EXITED else "",
                started_at=proc.started_at,
                memory_bytes=proc.memory_bytes,
            )

    # ----- memory ------------------------------------------------------------------------

    def memory_in_use(self, timeout: float = 1.0) -> int | None:
        """Sum of ``Status().memory.total`` over running backends, or None when unknown.

        Each running backend is asked once (``timeout`` each). One that cannot answer now (a
        single-threaded backend busy predicting) counts with its last reported figure; one that
        never answered makes the sum unknown. UNIMPLEMENTED counts as 0 (nothing reported).
        """
        with self._lock:
            running = [p for p in self._processes.values() if p.state is State.RUNNING]
        total = 0
        known = True
        for proc in running:
            figure = self._status_memory(proc, timeout)
            with self._lock:
                if figure is not None:
                    proc.memory_bytes = figure
                figure = proc.memory_bytes
            if figure is None:
                known = False
            else:
                total += figure
        return total if known else None

    def _status_memory(self, proc: BackendProcess, timeout: float) -> int | None:
        try:
            with self._channel(proc) as channel:
                status = backend_pb2_grpc.BackendStub(channel).Status(
                    backend_pb2.HealthMessage(), timeout=timeout, metadata=backend_metadata(proc.auth_token)
                )
            return int(status.memory.total)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return 0
            log.debug("%s Status failed: %s", proc.label, exc.code().name)
            return None
