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
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "cpr_e2e_" + uuid.uuid4().hex


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, *, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(interval)


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

    def start_web(self, workers: int = 2) -> Process:
        self.web_port = self.web_port or free_port()
        process = self.spawn(
            "web",
            [sys.executable, "-m", "gunicorn", "controlplane.wsgi", "--bind", f"127.0.0.1:{self.web_port}",
             "--workers", str(workers), "--timeout", "120"],
        )
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
             "--backend-port-range", f"{low}-{low + 99}", *extra],
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
        if process.alive():
            try:
                os.killpg(process.popen.pid, sig)
            except ProcessLookupError:
                pass
            try:
                return process.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.popen.pid, signal.SIGKILL)
                return process.popen.wait(10)
        return process.popen.returncode

    def close(self):
        for process in reversed(self.processes):
            try:
                self.stop(process, signal.SIGKILL if process.name == "qcluster" else signal.SIGTERM, timeout=15)
            except Exception:  # teardown must go on
                pass
        if self.database:
            with self._admin_connection() as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} -----\n{p.log()[-4000:]}" for p in self.processes)
