"""The shipped systemd units (deploy/systemd/) run as systemd would run them, without systemd.

There is no systemd (PID 1) on the machines the tests run on, so the test does what the units
tell systemd to do: read the unit's ``EnvironmentFile`` (the shipped example, its example values
replaced by this fleet's: the database, loopback ports, a token) and ``Environment=`` lines,
create its ``StateDirectory``/``RuntimeDirectory`` (under a temporary root in place of /var/lib
and /run), expand ``${VAR}`` in the commands, run each ``ExecStartPre`` to success, start
``ExecStart`` in the unit's ``WorkingDirectory`` (the checkout in place of /opt/controlplane, this
Python in place of its virtualenv's), and stop it as ``KillMode=mixed`` does: SIGTERM to the main
process only, measured against ``TimeoutStopSec``, then nothing of its process group may be left
for the SIGKILL. ``make check`` verifies the same files with ``systemd-analyze verify``.

web, qcluster, gateway and worker run together: the worker registers and heartbeats through the
web unit, the qcluster's passes run, the gateway answers.
"""

import os
import re
import shlex
import signal
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.e2e.harness import ROOT, TOKEN, Fleet, wait_for
from tests.processes import free_port, pid_alive

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

UNITS = ROOT / "deploy" / "systemd"
VENV_PYTHON = "/opt/controlplane/.venv/bin/python"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's unit syntax as these files use it: sections, ``Key=value`` lines (a key may
    repeat), comments; no line continuations."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"line continuation not expected: {line}"
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def parse_env_file(text: str) -> dict[str, str]:
    env = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


class Unit:
    def __init__(self, fleet: Fleet, name: str, root, env_file_values: dict[str, str]):
        self.name = name
        self.service = parse_unit((UNITS / f"{name}.service").read_text())["Service"]
        self.root = root
        env_file = self.service["EnvironmentFile"][0]
        example = UNITS / (os.path.basename(env_file) + ".example")
        values = parse_env_file(example.read_text())
        unknown = set(env_file_values) - set(values) - {"DATABASE_POOLER", "DATABASE_DIRECT_URL"}
        assert not unknown, f"{example.name} has no {sorted(unknown)}"
        values.update(env_file_values)
        for line in self.service.get("Environment", []):
            key, _, value = line.partition("=")
            values[key] = self.path(value)
        for directory in self.service.get("StateDirectory", []) + self.service.get("RuntimeDirectory", []):
            for entry in directory.split():
                base = "var/lib" if directory in self.service.get("StateDirectory", []) else "run"
                (root / base / entry).mkdir(parents=True, exist_ok=True)
        assert self.service["WorkingDirectory"] == ["/opt/controlplane"]
        self.env = values
        self.fleet = fleet

    def path(self, value: str) -> str:
        for prefix, base in (("/var/lib/", "var/lib"), ("/run/", "run")):
            if value.startswith(prefix):
                return str(self.root / base / value[len(prefix):])
        return value

    def argv(self, command: str) -> list[str]:
        expanded = re.sub(r"\$\{(\w+)\}", lambda m: self.env[m.group(1)], command)
        words = shlex.split(expanded)
        assert words[0] == VENV_PYTHON, words
        return [sys.executable, *words[1:]]

    def start(self):
        import subprocess

        for command in self.service.get("ExecStartPre", []):
            result = subprocess.run(self.argv(command), cwd=ROOT, env=self.fleet.env(**self.env),
                                    capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, (self.name, command, result.stderr[-3000:])
        (command,) = self.service["ExecStart"]
        self.process = self.fleet.spawn(self.name, self.argv(command), **self.env)
        return self.process

    def stop(self) -> float:
        """KillMode=mixed: SIGTERM to the main process; seconds until it exited, asserted within
        TimeoutStopSec, and nothing left in its process group."""
        assert self.service["KillMode"] == ["mixed"]
        bound = float(self.service["TimeoutStopSec"][0])
        pid = self.process.popen.pid
        began = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        self.process.popen.wait(bound)
        took = time.monotonic() - began
        left = [p for p in _group_members(pid) if pid_alive(p)]
        assert left == [], f"{self.name}: {left} still running when its main process exited"
        return took


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    members.append(int(entry))
            except ProcessLookupError:
                pass
    return members


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except urllib.error.HTTPError as error:
        return error.code < 500
    except OSError:
        return False


def test_the_shipped_units_start_serve_and_stop_within_their_timeouts(fleet, tmp_path, report):
    web_port, gateway_port, worker_port = free_port(), free_port(), free_port()
    fleet.web_port = web_port
    shared = {
        "DATABASE_URL": fleet.database_url,
        "DJANGO_SECRET_KEY": "units-" + "x" * 50,
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "DJANGO_CSRF_TRUSTED_ORIGINS": f"http://127.0.0.1:{web_port}",
        "CONTROLPLANE_REGISTRATION_TOKEN": TOKEN,
        "CONTROLPLANE_BIND": f"127.0.0.1:{web_port}",
        "CONTROLPLANE_GATEWAY_BIND": f"127.0.0.1:{gateway_port}",
        "METRICS_ALLOW": "127.0.0.0/8",
    }
    fleet.settings_env.update({"CONTROLPLANE_RECONCILE_INTERVAL": "1", "CONTROLPLANE_HEARTBEAT_INTERVAL": "1"})
    units = {name: Unit(fleet, name, tmp_path / "root", shared)
             for name in ("controlplane-web", "controlplane-qcluster", "controlplane-gateway")}
    units["controlplane-worker"] = Unit(fleet, "controlplane-worker", tmp_path / "root", {
        "CONTROLPLANE_URL": fleet.base_url, "CONTROLPLANE_REGISTRATION_TOKEN": TOKEN, "WORKER_NAME": "unit-gpu",
        "WORKER_ADVERTISE": "127.0.0.1", "WORKER_PORT": str(worker_port), "WORKER_BACKEND_PORTS": "27100-27119",
        "WORKER_VRAM": "8GiB", "WORKER_SLOTS": "1",
    })

    units["controlplane-web"].start()
    wait_for(lambda: _answers(f"{fleet.base_url}/livez"), timeout=60, what="web unit answering")
    units["controlplane-qcluster"].start()
    units["controlplane-gateway"].start()
    units["controlplane-worker"].start()
    wait_for(lambda: _answers(f"http://127.0.0.1:{gateway_port}/v1/models"), timeout=60, what="gateway unit answering")
    fleet.wait_nodes({"unit-gpu"}, timeout=60)
    wait_for(lambda: fleet.sql("SELECT count(*) FROM reconciler_reconcilepass WHERE outcome = 'ok'")[0][0] >= 2,
             timeout=60, what="two passes by the qcluster unit")
    assert (tmp_path / "root" / "var/lib/controlplane/static/admin").is_dir()  # collectstatic ran
    assert list((tmp_path / "root" / "run/controlplane/prometheus").glob("*.db"))  # shared metrics directory

    # stopped in the order a machine shuts down: the worker first (it deregisters through the web)
    took = {name: units[name].stop() for name in
            ("controlplane-worker", "controlplane-gateway", "controlplane-qcluster", "controlplane-web")}
    rows = fleet.sql("SELECT status FROM registry_node WHERE name = 'unit-gpu'")
    assert rows == [] or rows[0][0] != "healthy", rows  # deregistered on SIGTERM, not left healthy
    report("systemd units run as systemd would (KillMode=mixed): stopped in "
           + ", ".join(f"{name.removeprefix('controlplane-')} {seconds:.1f}s (TimeoutStopSec "
                       f"{units[name].service['TimeoutStopSec'][0]})" for name, seconds in took.items()))
