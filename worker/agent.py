"""The worker's lifecycle: serve the Worker service, register, heartbeat, shut down gracefully.

:class:`WorkerAgent` owns the node identity (id and node token; the token also in a 0600 state
file, because re-registering an existing name needs it) and the node's two gRPC credentials
from the registration answer (the worker command token its service accepts, the backend token
its backends require; never the fleet registration token), the
:class:`~worker.processes.BackendSupervisor` and the gRPC server. ``run()`` blocks until
:meth:`WorkerAgent.request_stop` is called (the CLI calls it on SIGTERM/SIGINT) and then runs
LocalAI's worker shutdown sequence: drain, wait for in-flight requests to end, deregister,
stop every backend, stop the server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from typing import Any

import grpc

from proto import tls
from worker.backend_tls import BackendTls
from worker.config import WorkerConfig, join_host_port
from worker.control_plane import (
    ControlPlaneClient,
    ControlPlaneError,
    ControlPlaneUnreachable,
    RegistrationAborted,
    RegistrationFailed,
    register_with_retry,
)
from worker.processes import BackendSupervisor
from worker.service import build_server

log = logging.getLogger("worker.agent")

#: Statuses after which the control plane no longer knows this node id or its token.
_FORGOTTEN = (401, 404)


class WorkerAgent:
    def __init__(
        self,
        config: WorkerConfig,
        *,
        client: ControlPlaneClient | None = None,
        supervisor: BackendSupervisor | None = None,
    ):
        self.config = config
        if client is None and config.register:
            if not config.control_plane:
                raise ValueError("a control-plane URL is required unless registration is off")
            client = ControlPlaneClient(config.control_plane, timeout=config.http_timeout, ca_file=config.tls_ca)
        self.client = client
        self.supervisor = supervisor or BackendSupervisor(
            config.backends,
            auth_token=config.backend_token,  # the control plane's backend token once registered
            advertise_host=config.advertise_host,
            bind_host=config.listen_host,
            port_range=config.backend_port_range,
            exclude_ports=(config.port,),
            health_timeout=config.backend_health_timeout,
            stop_grace=config.backend_stop_grace,
            tls=BackendTls.from_config(config),
        )
        self.node_id: str | None = None
        self._node_token: str | None = None
        # What the worker service accepts: set by registration (or --no-register's configuration);
        # until then every call is refused.
        self._service_token: str | None = config.service_token
        self.server: grpc.Server | None = None
        self.bound_port: int | None = None
        self._stop = threading.Event()
        self._hurry = threading.Event()

    # ----- control ------------------------------------------------------------------------

    def request_stop(self) -> None:
        """First call: start the graceful shutdown. Second call: stop waiting for in-flight work."""
        if self._stop.is_set():
            log.warning("second stop request: not waiting for in-flight requests any longer")
            self._hurry.set()
        else:
            log.info("stop requested: shutting down gracefully")
            self._stop.set()

    @property
    def registered(self) -> bool:
        return self.node_id is not None

    def run(self) -> int:
        """Serve, register, heartbeat until stopped, shut down. Returns the process exit code."""
        self.start_server()
        try:
            return self._run_started()
        except BaseException:
            self._stop_local()  # never leave backend processes behind
            raise

    def _run_started(self) -> int:
        if self.config.register:
            try:
                self.register(tries=self.config.register_tries)
            except RegistrationAborted:
                log.info("stopped before registration completed")
            except RegistrationFailed as exc:
                log.error("%s", exc)
                self._stop_local()
                return 1
        else:
            log.info("registration disabled (--no-register): serving the Worker service only")
        while not self._stop.wait(self.config.heartbeat_interval):
            if self.config.register:
                self.heartbeat_once()
            else:
                self.supervisor.memory_in_use()  # keeps ListBackends' memory_bytes fresh
        self.shutdown()
        return 0

    def start_server(self) -> int:
        bind = join_host_port(self.config.listen_host, self.config.port)
        self.server, self.bound_port = build_server(
            self.supervisor,
            token=lambda: self._service_token,
            bind=bind,
            node_id=lambda: self.node_id,
            credentials=self._server_credentials(),
        )
        log.info("worker service listening on %s (advertised as %s)", bind, self.config.address)
        return self.bound_port

    def _server_credentials(self):
        cfg = self.config
        if not cfg.tls:
            return None
        return tls.server_credentials(
            cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca, names=("--tls-cert", "--tls-key", "--tls-client-ca")
        )

    # ----- registration and heartbeats -----------------------------------------------------

    def registration_body(self) -> dict[str, Any]:
        cfg = self.config
        body: dict[str, Any] = {
            "name": cfg.name,
            "node_type": "backend",
            "address": cfg.address,
            "token": cfg.registration_token,
            "gpu_vendor": cfg.gpu_vendor,
            "labels": dict(cfg.labels),
            "max_replicas_per_model": cfg.max_replicas_per_model,
            # A per-node token for every later call (the fleet token is then refused for this
            # node), and the worker gRPC service it serves, so replicas are placed on it at once.
            "auth_mode": "node_token",
            "serves_worker_api": True,
        }
        body.update(self._memory_fields(total=True))
        return body

    def heartbeat_body(self) -> dict[str, Any]:
        return self._memory_fields(total=False)

    def _memory_fields(self, *, total: bool) -> dict[str, Any]:
        """``{total_X, available_X}`` (registration) or ``{available_X}`` (heartbeat), X being
        vram or ram, whichever was configured; available is omitted when it is unknown."""
        cfg = self.config
        if cfg.total_vram is not None:
            kind, configured = "vram", cfg.total_vram
        elif cfg.total_ram is not None:
            kind, configured = "ram", cfg.total_ram
        else:
            return {}
        fields: dict[str, Any] = {f"total_{kind}": configured} if total else {}
        in_use = self.supervisor.memory_in_use()
        if in_use is not None:
            fields[f"available_{kind}"] = max(0, configured - in_use)
        return fields

    def register(self, *, tries: int) -> None:
        """Register (with backoff), presenting the node token of an earlier run (re-registering
        an existing name needs it), then keep the new id and tokens."""
        try:
            answer = register_with_retry(
                self.client,
                self.registration_body(),
                self.config.registration_token,
                tries=tries,
                base_delay=self.config.register_base_delay,
                max_delay=self.config.register_max_delay,
                stop=self._stop,
                node_token=self._node_token or self._load_state().get("node_token"),
            )
        except RegistrationFailed as exc:
            if "node_credential_required" in str(exc):
                log.error(
                    "node %r exists and this worker does not hold its node token (state file %s): an operator "
                    "must delete the node before this worker can take its name",
                    self.config.name,
                    self._state_path() or "(none)",
                )
            raise
        previous = self.node_id
        self.node_id = str(answer["id"])
        token = answer.get("node_token")
        if not token:
            log.warning("registration answer has no node_token; using the registration token")
        self._node_token = token or self.config.registration_token
        if token:
            self._save_state({"node_id": self.node_id, "node_token": token})
        if answer.get("worker_token"):
            self._service_token = answer["worker_token"]
        else:
            log.error("registration answer has no worker_token: the worker service refuses every call")
        if answer.get("backend_token"):
            # Backends started from now on require it; running ones keep the token they got.
            self.supervisor.auth_token = answer["backend_token"]
        if previous and previous != self.node_id:
            log.info("re-registered as node %s (was %s), status=%s", self.node_id, previous, answer.get("status"))
        else:
            log.info("registered as node %s, status=%s", self.node_id, answer.get("status"))

    # ----- state file --------------------------------------------------------------------

    def _state_path(self) -> str | None:
        """One file per (control plane, node name), so workers sharing a state directory never
        present each other's tokens."""
        if not self.config.state_dir:
            return None
        key = hashlib.sha256(f"{self.config.control_plane}\0{self.config.name}".encode()).hexdigest()[:20]
        return os.path.join(self.config.state_dir, f"node-{key}.json")

    def _load_state(self) -> dict[str, Any]:
        path = self._state_path()
        if path is None:
            return {}
        try:
            with open(path, encoding="utf-8") as handle:
                state = json.load(handle)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("cannot read the state file %s: %s", path, exc)
            return {}
        return state if isinstance(state, dict) else {}

    def _save_state(self, state: dict[str, Any]) -> None:
        """Write atomically with mode 0600 (the node token is a secret); never raises."""
        path = self._state_path()
        if path is None:
            return
        state = {"control_plane": self.config.control_plane, "name": self.config.name, **state}
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            temporary = f"{path}.{os.getpid()}.tmp"
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(state, handle)
            os.replace(temporary, path)
        except OSError as exc:
            log.warning("cannot write the state file %s (a restart will need an operator): %s", path, exc)

    def heartbeat_once(self) -> bool:
        """Send one heartbeat; re-register when the control plane forgot us. Never raises.

        Returns True when the heartbeat (or the re-registration it led to) was accepted.
        """
        if not self.registered:
            return self._reregister("not registered yet")
        body = self.heartbeat_body()
        try:
            answer = self.client.heartbeat(self.node_id, self._node_token, body)
        except ControlPlaneError as exc:
            if exc.status in _FORGOTTEN:
                return self._reregister(f"heartbeat answered {exc.describe()}")
            log.warning("heartbeat refused: %s", exc.describe())
            return False
        except ControlPlaneUnreachable as exc:
            log.warning("heartbeat failed, will retry next tick: %s", exc)
            return False
        log.debug("heartbeat sent %s", body)
        recorded = answer.get("address") if isinstance(answer, dict) else None
        if recorded is not None and recorded != self.config.address:
            # The control plane's database says another address (restored from a backup taken
            # before this worker last registered): register again, with the kept node token.
            return self._reregister(
                f"the control plane has address {recorded!r} for this node, not {self.config.address!r}"
            )
        return True

    def _reregister(self, why: str) -> bool:
        log.warning("%s: registering again", why)
        try:
            self.register(tries=1)  # the heartbeat tick is the backoff
        except (RegistrationFailed, RegistrationAborted) as exc:
            log.error("%s; will retry next tick", exc)
            return False
        return True

    # ----- shutdown ----------------------------------------------------------------------

    def shutdown(self) -> None:
        """Drain, wait for in-flight work, deregister, stop backends and the server."""
        if self.config.register and self.registered:
            self._drain_and_deregister()
        self._stop_local()
        log.info("worker stopped")

    def _drain_and_deregister(self) -> None:
        cfg = self.config
        # A refused drain still waits and deregisters: the control plane may accept them later.
        drained = self._call("drain", self.client.drain)
        deadline = time.monotonic() + cfg.drain_timeout
        while True:
            in_flight = self._in_flight()
            if in_flight == 0:
                log.info("no request in flight")
                break
            remaining = deadline - time.monotonic()
            if in_flight == -1:
                log.warning("control plane no longer knows this node; not waiting")
                break
            if in_flight is None and not drained:
                # Neither the drain nor the count got an answer: waiting up to the drain timeout
                # would only delay the stop (a stop must end within seconds).
                log.warning("control plane unreachable; not waiting for in-flight requests")
                break
            if remaining <= 0:
                log.warning(
                    "gave up waiting for in-flight requests after %gs (in flight: %s)", cfg.drain_timeout, in_flight
                )
                break
            log.info("waiting for %s in-flight request(s)", "?" if in_flight is None else in_flight)
            if self._hurry.wait(min(cfg.drain_poll_interval, remaining)):
                break
        self._call("deregister", self.client.deregister)

    def _in_flight(self) -> int | None:
        """Sum of in_flight over this node's replica rows; None unknown, -1 node forgotten."""
        try:
            rows = self.client.models(self.node_id, self._node_token)
        except ControlPlaneError as exc:
            log.warning("listing models failed: %s", exc.describe())
            return -1 if exc.status in _FORGOTTEN else None
        except ControlPlaneUnreachable as exc:
            log.warning("listing models failed: %s", exc)
            return None
        return sum(int(row.get("in_flight") or 0) for row in rows if isinstance(row, dict))

    def _call(self, what: str, method) -> bool:
        try:
            method(self.node_id, self._node_token)
        except ControlPlaneError as exc:
            log.warning("%s refused: %s", what, exc.describe())
            return False
        except ControlPlaneUnreachable as exc:
            log.warning("%s failed: %s", what, exc)
            return False
        log.info("%s accepted", what)
        return True

    def _stop_local(self) -> None:
        stopped = self.supervisor.stop_all()
        log.info("stopped %d backend process(es)", stopped)
        if self.server is not None:
            self.server.stop(grace=2).wait()
