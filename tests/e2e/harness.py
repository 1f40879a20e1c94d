"""End-to-end harness: real processes on loopback against a fresh PostgreSQL database.

``Fleet`` starts the control plane's web process (gunicorn), optionally a qcluster, and
reference workers with the built-in ``echo`` backend; it talks to them only through their
public interfaces (REST, gRPC). Every process it starts is stopped by ``close()``; every wait
has a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests import processes
from tests.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "cpr_e2e_" + uuid.uuid4().hex
# The control plane's credential key (CONTROLPLANE_CREDENTIAL_KEY), so the tests can derive the
# per-node gRPC credentials it uses: TOKEN only registers, it opens no worker or backend.
CREDENTIAL_KEY = "e2e-credential-key-" + uuid.uuid4().hex


def backend_token(node_id) -> str:
    """What the node's backends require (the lease's ``backend_token``)."""
    from core.credentials import backend_token as derive

    return derive(node_id, key=CREDENTIAL_KEY)


def command_token(node_id) -> str:
    """What the node's worker service requires."""
    from core.credentials import worker_command_token as derive

    return derive(node_id, key=CREDENTIAL_KEY)


def wait_for(predicate, *, timeout: float, interval: float = 0.2, what: str = "condition"):
    """``tests.processes.wait_for`` at the fleet's pace: its conditions are HTTP calls and
    database reads, polled five times a second."""
    return processes.wait_for(predicate, timeout, interval, what=what)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Fleet:
    """A control plane on a fresh PostgreSQL database, plus workers."""

    admin_url: dict
    workdir: Path
    settings_env: dict = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    web_port: int = 0
    api_key: str = ""
    database: str = ""

    # ----- set-up --------------------------------------------------------------------------

    @property
    def database_url(self) -> str:
        admin = self.admin_url
        return f"postgres://{admin['USER']}@{admin['HOST']}:{admin['PORT'] or 5432}/{self.database}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def env(self, **extra) -> dict:
        return {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "CONTROLPLANE_REGISTRATION_TOKEN": TOKEN,
            "CONTROLPLANE_CREDENTIAL_KEY": CREDENTIAL_KEY,
            "CONTROLPLANE_VAR_DIR": str(self.workdir / "var"),
            "DJANGO_SETTINGS_MODULE": "controlplane.settings",
            "PYTHONUNBUFFERED": "1",
            **self.settings_env,
            **extra,
        }

    def _admin_connection(self):
        admin = self.admin_url
        return psycopg.connect(
            host=admin["HOST"], port=admin["PORT"] or 5432, user=admin["USER"], dbname="postgres", autocommit=True
        )

    def create_database(self):
        self.database = f"cp_e2e_{uuid.uuid4().hex[:10]}"
        with self._admin_connection() as connection:
            connection.execute(f'CREATE DATABASE "{self.database}"')
        self.manage("migrate_locked", "-v", "0")
        self.api_key = self.manage("create_api_key", "e2e-operator", "--role", "operator").strip()

    def manage(self, *args: str, timeout: float = 120) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def spawn(self, name: str, argv: list[str], **env) -> Process:
        log_path = self.workdir / f"{name}.log"
        handle = open(log_path, "ab")
        popen = subprocess.Popen(
            argv, cwd=ROOT, env=self.env(**env), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        handle.close()
        process = Process(name, popen, log_path)
        self.processes.append(process)
        return process

    @staticmethod
    def web_command(port: int, workers: int = 2) -> list[str]:
        """gunicorn with the shipped server configuration (threaded workers, limits, problem
        answers), as `make run` starts it: what the fault suite exercises is what operators run."""
        return [sys.executable, "-m", "gunicorn", "-c", "controlplane/gunicorn.conf.py",
                "--bind", f"127.0.0.1:{port}", "--workers", str(workers), "--timeout", "120"]

    def start_web(self, workers: int = 2) -> Process:
        self.web_port = self.web_port or free_port()
        process = self.spawn("web", self.web_command(self.web_port, workers))
        wait_for(lambda: self._answers("/livez") or self._answers("/api/schema/"), timeout=30, what="web up")
        return process

    def start_qcluster(self) -> Process:
        return self.spawn("qcluster", [sys.executable, "manage.py", "qcluster"])

    def start_worker(self, name: str, *, vram: str = "8GiB", slots: int = 2, heartbeat: float = 1.0, extra=()) -> Process:
        port = free_port()
        low = 20000 + (abs(hash(name)) % 400) * 100
        process = self.spawn(
            f"worker-{name}",
            [sys.executable, "-m", "worker", "run", "--control-plane", self.base_url, "--registration-token", TOKEN,
             "--name", name, "--advertise", "127.0.0.1", "--port", str(port), "--vram", vram,
             "--max-replicas-per-model", str(slots), "--heartbeat-interval", str(heartbeat),
             "--backend-port-range", f"{low}-{low + 99}", "--state-dir", str(self.workdir / "worker-state"), *extra],
        )
        process.port = port
        return process

    # ----- REST ------------------------------------------------------------------------------

    def _answers(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=2) as response:
                return response.status < 500
        except urllib.error.HTTPError as error:
            return error.code < 500
        except OSError:
            return False

    def api(self, method: str, path: str, body=None, *, timeout: float = 60) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.api_key}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = response.read()
                return response.status, json.loads(payload) if payload else None
        except urllib.error.HTTPError as error:
            payload = error.read()
            return error.code, json.loads(payload) if payload else None

    def nodes(self) -> dict[str, dict]:
        status, body = self.api("GET", "/api/v1/nodes?limit=500")
        assert status == 200, body
        results = body["results"] if isinstance(body, dict) else body
        return {node["name"]: node for node in results}

    def wait_nodes(self, names, status="healthy", timeout=30.0) -> dict[str, dict]:
        def ready():
            nodes = self.nodes()
            return nodes if all(nodes.get(name, {}).get("status") == status for name in names) else None

        return wait_for(ready, timeout=timeout, what=f"nodes {sorted(names)} {status}")

    # ----- teardown --------------------------------------------------------------------------

    def stop(self, process: Process, sig=signal.SIGTERM, timeout: float = 40) -> int | None:
        if not process.alive():
            # Its own pid may be gone while children it started live on in its process group
            # (a qcluster whose main process alone was SIGKILLed leaves django-q2's sentinel).
            try:
                os.killpg(process.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return process.popen.returncode
        try:
            os.killpg(process.popen.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return process.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.popen.pid, signal.SIGKILL)
            return process.popen.wait(10)

    def close(self):
        # Workers first, while the control plane still answers their drain and deregister calls
        # (a worker whose control plane is gone waits out its drain timeout); then the rest.
        workers_first = sorted(reversed(self.processes), key=lambda p: not p.name.startswith("worker-"))
        for process in workers_first:
            try:
                self.stop(process, signal.SIGKILL if process.name == "qcluster" else signal.SIGTERM, timeout=15)
            except Exception:  # teardown must go on
                pass
        if self.database:
            with self._admin_connection() as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} -----\n{p.log()[-4000:]}" for p in self.processes)


# ===== fault injection, convergence and invariants (issue 8) ====================================
#
# Added compatibly: the methods below are attached to ``Fleet``; nothing above changes.

import re  # noqa: E402
import threading  # noqa: E402
from collections import Counter  # noqa: E402

ECHO_OPTIONS = {"backend_type": "echo", "model_options": {"Model": "tiny"}}


def fast_settings(**extra) -> dict:
    """The fault suite's settings: stale after 4 s, a pass every second."""
    return {
        "CONTROLPLANE_STALE_AFTER": "4",
        "CONTROLPLANE_RECONCILE_INTERVAL": "1",
        "CONTROLPLANE_HEARTBEAT_INTERVAL": "1",
        "CONTROLPLANE_GRPC_LOAD_TIMEOUT": "20",
        "CONTROLPLANE_GRPC_WORKER_TIMEOUT": "5",
        "CONTROLPLANE_LOAD_JOB_HEARTBEAT_INTERVAL": "1",
        "CONTROLPLANE_LOAD_JOB_STALE_AFTER": "5",
        **{key: str(value) for key, value in extra.items()},
    }


def _fleet_sql(self, query: str, params=()) -> list[tuple]:
    """Run one statement on the fleet's database (autocommit) and return its rows."""
    with psycopg.connect(self.database_url, autocommit=True, connect_timeout=5) as connection:
        cursor = connection.execute(query, params)
        return cursor.fetchall() if cursor.description else []


def _fleet_pause(self, process_or_pid) -> None:
    """SIGSTOP a fleet process (its process group: the worker agent, not its backends, which
    run in their own sessions) or a bare pid (e.g. one backend)."""
    if isinstance(process_or_pid, Process):
        os.killpg(process_or_pid.popen.pid, signal.SIGSTOP)
    else:
        os.kill(process_or_pid, signal.SIGSTOP)
    self.paused.add(process_or_pid.popen.pid if isinstance(process_or_pid, Process) else process_or_pid)


def _fleet_resume(self, process_or_pid) -> None:
    pid = process_or_pid.popen.pid if isinstance(process_or_pid, Process) else process_or_pid
    try:
        if isinstance(process_or_pid, Process):
            os.killpg(pid, signal.SIGCONT)
        else:
            os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
    self.paused.discard(pid)


def _fleet_start_reconciler(self, interval: float = 1.0, name: str = "reconciler") -> Process:
    """``manage.py reconcile --loop``: passes every ``interval`` s from the first second.

    The same standby leader loop as the qcluster's leader process, without django-q2's
    processes. Cold loads requested through the API still need a load-job runner:
    ``CONTROLPLANE_LOAD_JOB_RUNNER=thread`` runs them inside the web process.
    """
    return self.spawn(name, [sys.executable, "manage.py", "reconcile", "--loop", "--interval", str(interval)])


def _fleet_model(self, model: str) -> dict:
    status, body = self.api("GET", f"/api/v1/models/{model}")
    return body if status == 200 else {}


def _fleet_wait_converged(self, model: str, ready: int, deadline: float, *, since: float | None = None,
                          extra=None) -> float:
    """Wait until ``model`` has exactly ``ready`` ready replicas (and ``extra()`` holds);
    returns the seconds elapsed since ``since`` (default: the call)."""
    start = time.monotonic() if since is None else since

    def done():
        return self.model(model).get("ready_replicas") == ready and (extra is None or extra())

    wait_for(done, timeout=max(0.0, deadline - (time.monotonic() - start)), interval=0.2,
             what=f"{model}: {ready} ready replicas")
    return time.monotonic() - start


def _fleet_set_floor(self, model: str, min_replicas: int, **extra) -> None:
    status, body = self.api("PUT", f"/api/v1/models/{model}/load-info", ECHO_OPTIONS)
    assert status in (200, 201), body
    status, body = self.api(
        "PUT", f"/api/v1/models/{model}/scheduling",
        {"min_replicas": min_replicas, "max_replicas": 0, "node_selector": {}, **extra},
    )
    assert status in (200, 201), body


def _fleet_replica_rows(self, model: str | None = None) -> list[dict]:
    query = (
        "SELECT r.id, n.name, n.status, r.model_name, r.replica_index, r.address, r.state, r.in_flight,"
        " n.address, n.id FROM registry_nodemodel r JOIN registry_node n ON n.id = r.node_id"
    )
    params = ()
    if model is not None:
        query += " WHERE r.model_name = %s"
        params = (model,)
    keys = ("id", "node", "node_status", "model", "replica_index", "address", "state", "in_flight",
            "node_address", "node_id")
    return [dict(zip(keys, row, strict=True)) for row in self.sql(query, params)]


def _fleet_events(self, kind: str) -> list[dict]:
    status, body = self.api("GET", f"/api/v1/events?kind={kind}&limit=200")
    assert status == 200, body
    return body["results"] if isinstance(body, dict) else body


_ADDR = re.compile(r"--addr\s+\S*:(\d+)")


def _environment(pid: int) -> list[bytes]:
    """The environment a process started with (``/proc/<pid>/environ``); empty once it is gone."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def _echo_backend_processes() -> dict[int, int]:
    """pid -> port of every echo backend process on the machine."""
    result = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True)
    found = {}
    for line in result.stdout.splitlines():
        pid, _, args = line.strip().partition(" ")
        if "worker.backends.echo" in args and "setpriv" not in args.split()[0]:
            match = _ADDR.search(args)
            if match:
                found[int(pid)] = int(match.group(1))
    return found


def _replica_identities(fleet) -> dict:
    """replica id -> the ``Model`` of its recipe (its own copy, else the model's load info): the
    ModelIdentity its backend must hold."""
    from proto import codec

    identities = {}
    for replica_id, blob in fleet.sql(
        "SELECT r.id, coalesce(r.model_opts_blob, l.model_opts_blob) FROM registry_nodemodel r"
        " LEFT JOIN registry_modelloadinfo l ON l.model_name = r.model_name"
    ):
        try:
            identities[replica_id] = codec.options_from_blob(bytes(blob or b"")).Model
        except codec.InvalidModelOptions:
            identities[replica_id] = ""
    return identities


def _fleet_invariant_violations(self) -> list[str]:
    from proto import client

    problems: list[str] = []
    nodes = self.sql("SELECT id, name, status, address, max_replicas_per_model, node_type FROM registry_node")
    live = {str(row[0]): row for row in nodes if row[2] == "healthy" and row[5] == "backend"}
    rows = self.replica_rows()

    # 1. floors (capacity permitting: one replica per slot on a healthy node)
    for model, floor in self.sql("SELECT model_name, min_replicas FROM registry_modelschedulingconfig WHERE min_replicas > 0"):
        capacity = sum(row[4] for row in live.values())
        loaded = sum(1 for r in rows if r["model"] == model and r["state"] == "loaded" and str(r["node_id"]) in live)
        if loaded < min(floor, capacity):
            problems.append(f"{model}: {loaded} loaded replica(s) on live workers < floor {floor} (capacity {capacity})")

    # 2. no duplicate (node, model, replica_index)
    for key, count in Counter((str(r["node_id"]), r["model"], r["replica_index"]) for r in rows).items():
        if count > 1:
            problems.append(f"duplicate replica key {key} x{count}")

    # 3. no loaded row points at a dead backend
    for r in rows:
        if r["state"] == "loaded":
            outcome = client.probe(r["address"], token=backend_token(r["node_id"]), timeout=2).outcome
            if outcome is client.Probe.UNREACHABLE:
                problems.append(f"{r['model']}#{r['replica_index']} on {r['node']} ({r['address']}) is unreachable")

    # 3b. every loaded replica's backend holds its model, loaded exactly once. Status READY proves
    #     nothing (LocalAI's backends, and the echo backend, say READY when idle, loaded or not), so
    #     each backend is asked to prove it: TokenizeString carrying ModelIdentity = the Model of
    #     the replica's recipe (client.holds_model; refused before a load and for another model).
    #     The control plane starts one backend process per replica and adopts a reused one only on
    #     that proof, so the echo backend's count of successful loads (Status:
    #     memory.breakdown["echo.loads"], see worker/backends/echo.py; TokenizeString, Predict and
    #     failed loads never count) must be exactly 1: 0 is an adopted empty process, 2 a double load.
    identities = _replica_identities(self)
    for r in rows:
        if r["state"] == "loaded":
            where = f"{r['model']}#{r['replica_index']} on {r['node']} ({r['address']})"
            try:
                loads = client.status(r["address"], token=backend_token(r["node_id"]), timeout=2).memory.breakdown.get("echo.loads")
            except client.GrpcCallError:
                continue  # unreachable/busy: invariant 3 speaks for it
            if loads is not None and loads != 1:
                problems.append(f"{where}: {loads} successful LoadModel calls (a replica's backend loads exactly once)")
            identity = identities.get(r["id"], "")
            if identity and client.holds_model(r["address"], identity, token=backend_token(r["node_id"]), timeout=2) is False:
                problems.append(f"{where}: its backend does not hold {identity!r} (TokenizeString with ModelIdentity refused)")

    # 4. in-flight equals live leases
    for replica_id, in_flight, leases in self.sql(
        "SELECT r.id, r.in_flight, (SELECT count(*) FROM registry_lease l WHERE l.replica_id = r.id"
        " AND l.released_at IS NULL) FROM registry_nodemodel r"
    ):
        if in_flight != leases:
            problems.append(f"replica {replica_id}: in_flight {in_flight} != live leases {leases}")

    # 5. load info for every model ever loaded (rows now, and every replica_added event)
    ever = {r["model"] for r in rows} | {
        row[0] for row in self.sql("SELECT DISTINCT model_name FROM reconciler_event WHERE kind = 'replica_added'")
    }
    known = {row[0] for row in self.sql("SELECT model_name FROM registry_modelloadinfo")}
    for model in sorted(ever - known):
        problems.append(f"{model}: loaded once but no ModelLoadInfo row")

    # 6. no orphan backend processes: every echo backend in this fleet's port ranges is a
    #    running backend of a live worker, and every live worker's running backend has a row
    owned: set[int] = set()
    row_keys = {(str(r["node_id"]), r["model"], r["replica_index"]) for r in rows}
    for node_id, row in live.items():
        try:
            listing = client.list_backends(row[3], node_id=node_id, token=command_token(node_id), timeout=5)
        except client.GrpcCallError as exc:
            problems.append(f"worker {row[1]} does not answer ListBackends: {exc}")
            continue
        for backend in listing.backends:
            if backend.state == backend.RUNNING:
                owned.add(backend.pid)
                if (node_id, backend.model_name, backend.replica_index) not in row_keys:
                    problems.append(f"{row[1]}: backend {backend.model_name}#{backend.replica_index} has no replica row")
    var_dir = f"CONTROLPLANE_VAR_DIR={self.workdir / 'var'}".encode()
    for pid, port in _echo_backend_processes().items():
        if any(low <= port <= high for low, high in self.port_ranges) and pid not in owned and pid not in self.paused:
            # Port ranges of fleets running at the same time (another pytest-xdist worker) may
            # overlap: a backend is this fleet's when it inherited this fleet's environment.
            if var_dir in _environment(pid):
                problems.append(f"orphan echo backend pid {pid} on port {port}")
    return problems


def _fleet_check_invariants(self, timeout: float = 20.0) -> float:
    """Assert the fleet's invariants, allowing ``timeout`` s for in-progress passes to settle;
    returns how long they took to hold."""
    start = time.monotonic()
    last: list[str] = []

    def holds():
        nonlocal last
        last = self.invariant_violations()
        return not last

    try:
        wait_for(holds, timeout=timeout, interval=0.5, what="fleet invariants")
    except AssertionError:
        raise AssertionError("fleet invariants violated:\n  " + "\n  ".join(last)) from None
    return time.monotonic() - start


def _fleet_restart_postgres(self, down_for: float = 0.0) -> None:
    """Restart the machine's PostgreSQL cluster (debian tooling): stop, wait, start."""
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "stop", "-m", "fast"], check=True)
    time.sleep(down_for)
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=True)


_original_start_worker = Fleet.start_worker
_original_close = Fleet.close


def _fleet_start_worker(self, name: str, **kwargs) -> Process:
    process = _original_start_worker(self, name, **kwargs)
    argv = process.popen.args
    low, high = argv[argv.index("--backend-port-range") + 1].split("-")
    self.port_ranges.append((int(low), int(high)))
    return process


def _fleet_close(self) -> None:
    for pid in list(self.paused):  # a stopped process cannot act on SIGTERM
        try:
            os.kill(pid, signal.SIGCONT)
            os.killpg(pid, signal.SIGCONT)
        except (ProcessLookupError, PermissionError):
            pass
    self.paused.clear()
    _original_close(self)


Fleet.paused = property(lambda self: self.__dict__.setdefault("_paused", set()))
Fleet.port_ranges = property(lambda self: self.__dict__.setdefault("_port_ranges", []))
Fleet.sql = _fleet_sql
Fleet.pause = _fleet_pause
Fleet.resume = _fleet_resume
Fleet.start_reconciler = _fleet_start_reconciler
Fleet.model = _fleet_model
Fleet.wait_converged = _fleet_wait_converged
Fleet.set_floor = _fleet_set_floor
Fleet.replica_rows = _fleet_replica_rows
Fleet.events = _fleet_events
Fleet.invariant_violations = _fleet_invariant_violations
Fleet.check_invariants = _fleet_check_invariants
Fleet.restart_postgres = _fleet_restart_postgres
Fleet.start_worker = _fleet_start_worker
Fleet.close = _fleet_close


class Traffic(threading.Thread):
    """A frontend: routes ``model`` through ``cpclient`` every ``period`` s and releases each
    lease at once.

    One ``ControlPlaneClient`` per Traffic, with ``max_retries=0`` so each attempt is one route
    request (no 503 backoff hidden inside an attempt) and records stay comparable across
    scenarios. Records ``(monotonic time, status, node name, address, probe outcome)``: status is
    200 on a lease, else the HTTP status of cpclient's typed error (``ControlPlaneError.status``;
    0 for ``TransportError``/``DeadlineExceeded``, i.e. no HTTP answer in time)."""

    def __init__(self, fleet: Fleet, model: str, period: float = 0.1, probe: bool = True):
        from cpclient import ControlPlaneClient

        super().__init__(daemon=True)
        self.fleet, self.model, self.period, self.probe = fleet, model, period, probe
        self.client = ControlPlaneClient(fleet.base_url, fleet.api_key, timeout=10, max_retries=0, route_deadline=15)
        self.records: list[tuple[float, int, str, str, str]] = []
        self.release_errors: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        from cpclient import ControlPlaneError
        from proto import client

        while not self._stop_event.is_set():
            at = time.monotonic()
            node = address = outcome = ""
            try:
                lease = self.client.route(self.model, **ECHO_OPTIONS, wait_seconds=5)
            except ControlPlaneError as error:
                status = error.status
            else:
                status, node, address = 200, lease.node_name, lease.address
                if self.probe:
                    outcome = client.probe(address, token=lease.backend_token, timeout=1).outcome.value
                try:
                    self.client.release(lease)
                except ControlPlaneError as error:
                    self.release_errors.append(str(error))
            self.records.append((at, status, node, address, outcome))
            self._stop_event.wait(max(0.0, self.period - (time.monotonic() - at)))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)


class PrivatePostgres:
    """A throwaway PostgreSQL cluster (initdb in ``directory``, trust auth, loopback on a free
    port) that a scenario may stop and start without disturbing the machine's shared server."""

    def __init__(self, directory: Path | None = None):
        import tempfile

        # not under pytest's tmp_path: the postgres user must be able to reach it
        directory = directory or Path(tempfile.mkdtemp(prefix="cp-e2e-pg-"))
        bindirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
        if not bindirs or not (bindirs[-1] / "initdb").exists():
            raise RuntimeError("PostgreSQL server binaries not installed")
        self.bindir = bindirs[-1]
        self.directory = directory
        self.port = free_port()
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
        directory.mkdir(parents=True, exist_ok=True)
        if self.run_as:
            subprocess.run(["chown", "postgres", str(directory)], check=True)
        subprocess.run([*self.run_as, str(self.bindir / "initdb"), "-D", str(directory / "data"), "-U", "postgres",
                        "--auth=trust", "--no-sync"], check=True, capture_output=True)
        self.start()

    @property
    def admin_url(self) -> dict:
        return {"HOST": "127.0.0.1", "PORT": self.port, "USER": "postgres"}

    def _ctl(self, *args: str) -> None:
        subprocess.run([*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.directory / "data"), *args],
                       check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        self._ctl("-l", str(self.directory / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "stop")

    def crash(self) -> None:
        """Stop as a crash would: no shutdown checkpoint, and whatever the WAL buffers held
        (asynchronous commits not yet written by the WAL writer) is gone; the next start
        recovers from the WAL."""
        self._ctl("-m", "immediate", "-w", "stop")

    def close(self) -> None:
        import shutil

        try:
            self.stop()
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.directory, ignore_errors=True)


# ===== LocalAI's restart bug (every replica row reaped, recipe lost) (scenario h, bench/bench_restart.py) =============

RESTART_FLOORS = {"tiny-a": 2, "tiny-b": 1, "tiny-c": 2}


def start_stale_restart_fleet(fleet: Fleet, floors: dict[str, int] = RESTART_FLOORS, *, workers: int = 3,
                              interval: float = 1.0) -> dict[str, Process]:
    """web + ``reconcile --loop`` + ``workers`` reference workers (2 slots each) with the fault
    suite's settings, every model of ``floors`` at its floor; returns the processes by name."""
    fleet.settings_env.update(fast_settings(CONTROLPLANE_LOAD_JOB_RUNNER="thread"))
    procs = {"web": fleet.start_web()}
    names = [f"restart-{index}" for index in range(workers)]
    for name in names:
        procs[name] = fleet.start_worker(name, slots=2)
    fleet.wait_nodes(set(names))
    procs["reconciler"] = fleet.start_reconciler(interval)
    for model, floor in floors.items():
        fleet.set_floor(model, floor)
    for model, floor in floors.items():
        fleet.wait_converged(model, floor, 60)
    return procs


def stale_restart(fleet: Fleet, procs: dict[str, Process], floors: dict[str, int] = RESTART_FLOORS, *,
                  down_for: float = 8.0, interval: float = 1.0, deadline: float = 60.0) -> dict[str, float]:
    """SIGKILL web and reconciler, keep the control plane down ``down_for`` s (longer than the
    stale threshold: nobody receives heartbeats), start both again and wait until every model is
    back at its floor. Returns ``{"restart": s from the restart until all floors held, "web": s
    until the web process answered}``; ``procs`` is updated with the new processes."""
    fleet.stop(procs["web"], signal.SIGKILL)
    fleet.stop(procs["reconciler"], signal.SIGKILL)
    time.sleep(down_for)
    restarted = time.monotonic()
    procs["web"] = fleet.start_web()
    web_up = time.monotonic() - restarted
    procs["reconciler"] = fleet.start_reconciler(interval)

    def at_floor():
        return all(fleet.model(model).get("ready_replicas") == floor for model, floor in floors.items())

    wait_for(at_floor, timeout=deadline, interval=0.2, what=f"every model at its floor {floors}")
    return {"restart": time.monotonic() - restarted, "web": web_up}


# ===== restore drill and soak (issue 12) ===========================================================


def _fleet_running_backends(self) -> dict[tuple[str, str, int], int]:
    """``(node name, model, replica index) -> pid`` of every RUNNING backend that the fleet's
    healthy backend nodes report (``ListBackends``); a worker that does not answer is skipped."""
    from proto import client, worker_pb2

    running = {}
    for node_id, name, address in self.sql(
        "SELECT id, name, address FROM registry_node WHERE status = 'healthy' AND node_type = 'backend'"
    ):
        try:
            listing = client.list_backends(address, node_id=str(node_id), token=command_token(node_id), timeout=5)
        except client.GrpcCallError:
            continue
        for backend in listing.backends:
            if backend.state == worker_pb2.BackendProcess.RUNNING:
                running[(name, backend.model_name, backend.replica_index)] = backend.pid
    return running


def _fleet_rss_kib(self, process: Process) -> int:
    """Resident set size (KiB, ``VmRSS``) of a fleet process and all its descendants (a
    gunicorn master and its workers; a qcluster and its worker processes)."""
    return sum(_vm_rss_kib(pid) for pid in _process_tree(process.popen.pid))


def _process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def _vm_rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


Fleet.running_backends = _fleet_running_backends
Fleet.rss_kib = _fleet_rss_kib


# ===== the OpenAI-compatible gateway (issue 15) ====================================================


def _fleet_start_gateway(self, **env) -> Process:
    """``manage.py gateway`` on a free port (``self.gateway_url`` is its OpenAI base URL, ending in
    ``/v1``); returns once it answers."""
    self.gateway_port = free_port()
    process = self.spawn(
        "gateway",
        [sys.executable, "manage.py", "gateway", "--bind", f"127.0.0.1:{self.gateway_port}", "--graceful", "2"],
        **env,
    )

    def answers():
        assert process.alive(), process.log()[-3000:]
        try:
            with urllib.request.urlopen(f"{self.gateway_url}/models", timeout=2):
                return True
        except urllib.error.HTTPError as error:
            return error.code == 401  # up, and asking for a key
        except OSError:
            return False

    wait_for(answers, timeout=30, what="gateway up")
    return process


Fleet.gateway_port = 0
Fleet.gateway_url = property(lambda self: f"http://127.0.0.1:{self.gateway_port}/v1")
Fleet.start_gateway = _fleet_start_gateway
