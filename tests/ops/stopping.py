"""Starting ``scripts/run`` / ``scripts/demo`` as real process trees and finding every process
they started, wherever it went (its own process group or session, reparented to init): each
carries the script's ``CONTROLPLANE_VAR_DIR`` in its environment, a temporary directory per test."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.processes import free_port, live_processes

ROOT = Path(__file__).resolve().parents[2]
#: What every process must do after a stop signal (issue: "exit within 10 s").
STOP_BOUND_S = 10.0


def processes_with_env(marker: str) -> dict[int, str]:
    """Live (not zombie) processes whose environment holds ``marker``: {pid: command line}."""
    needle = marker.encode()
    return live_processes(lambda entry: needle in (entry / "environ").read_bytes().split(b"\0"))


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError):
        return None


@dataclass
class ScriptRun:
    script: str
    workdir: Path
    port: int = field(default_factory=free_port)
    popen: subprocess.Popen | None = None

    @property
    def var_dir(self) -> Path:
        return self.workdir / "var"

    @property
    def marker(self) -> str:
        return f"CONTROLPLANE_VAR_DIR={self.var_dir}"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {
            key: value for key, value in os.environ.items() if key not in {"PROMETHEUS_MULTIPROC_DIR", "DATABASE_URL"}
        }
        env.pop("CONTROLPLANE_LOAD_JOB_RUNNER", None)
        env.update(
            CONTROLPLANE_VAR_DIR=str(self.var_dir),
            CONTROLPLANE_BIND=f"127.0.0.1:{self.port}",
            CONTROLPLANE_GATEWAY_BIND=f"127.0.0.1:{free_port()}",
            DEMO_BACKEND_PORT_BASE=str(random.randrange(30000, 39000, 100)),
            CONTROLPLANE_REGISTRATION_TOKEN="cpr_stop_test_" + os.urandom(8).hex(),
            PYTHONUNBUFFERED="1",
            WEB_LOG_LEVEL="info",  # gunicorn's stop steps in the log
        )
        self.var_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.workdir / f"{Path(self.script).name}.log", "wb")
        self.popen = subprocess.Popen(
            [str(ROOT / "scripts" / self.script)],
            cwd=ROOT,
            env=env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the test signals the group
        )

    def log(self) -> str:
        return (self.workdir / f"{Path(self.script).name}.log").read_text(errors="replace")

    def wait_until(self, predicate, *, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.popen.poll() is None, f"{self.script} exited while waiting for {what}:\n{self.log()[-4000:]}"
            if predicate():
                return
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log()[-4000:]}")

    def answers_livez(self) -> bool:
        try:
            with urllib.request.urlopen(self.base + "/livez", timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str):
        key = (self.var_dir / "demo_operator_key").read_text().strip()
        request = urllib.request.Request(self.base + path, headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def nodes(self) -> dict[str, str]:
        body = self.api("/api/v1/nodes?limit=500")
        rows = body["results"] if isinstance(body, dict) else body
        return {row["name"]: row["status"] for row in rows}

    def processes(self) -> dict[int, str]:
        return processes_with_env(self.marker)

    def wait_gone(self, pids, bound: float = STOP_BOUND_S) -> tuple[float, dict[int, str]]:
        """Seconds until none of ``pids`` lives (or the bound), and what still lives then."""
        began = time.monotonic()
        while time.monotonic() - began < bound + 5:
            left = {pid: cmd for pid, cmd in self.processes().items() if pid in pids}
            if not left:
                return time.monotonic() - began, {}
            time.sleep(0.05)
        return time.monotonic() - began, left

    def close(self) -> None:
        """Never leave anything running, even when the test failed."""
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.popen is not None:
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.log_file.close()
