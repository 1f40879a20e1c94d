"""`make demo` (scripts/demo) end to end: it brings demo-echo to two ready replicas, the curl and
the `openai` snippet it prints get a completion from the fleet through the gateway, and Ctrl-C
(SIGINT) stops every process it started within 10 s, the workers deregistering first. SQLite in a temporary var dir on both lanes (the
demo's default database), a random web port and backend port range."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.processes import free_port, live_processes

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def session_processes(sid: int) -> dict[int, str]:
    """Live (not zombie) processes of a session: {pid: command line}."""
    return live_processes(lambda entry: os.getsid(int(entry.name)) == sid)


def run_printed_snippets(log_path: Path, demo, env) -> dict[str, str]:
    """Run the curl and the `openai` one-liner the demo printed, as a person would paste them;
    their outputs by name."""
    deadline = time.monotonic() + 60
    while "Ctrl-C stops everything" not in log_path.read_text():
        assert demo.poll() is None and time.monotonic() < deadline, log_path.read_text()[-4000:]
        time.sleep(0.5)
    lines = [line.strip() for line in log_path.read_text().splitlines()]
    snippets = {
        "curl": next(line for line in lines if line.startswith("curl -s http") and "/chat/completions" in line),
        "openai": next(line for line in lines if line.startswith(".venv/bin/python -c")),
    }
    snippets["openai"] = snippets["openai"].replace(".venv/bin/python", sys.executable, 1)
    outputs = {}
    for name, command in snippets.items():
        done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (name, command, done.stdout, done.stderr)
        outputs[name] = done.stdout
    return outputs


def test_make_demo_reaches_two_ready_replicas_and_ctrl_c_stops_everything(tmp_path):
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key not in {"PROMETHEUS_MULTIPROC_DIR", "DATABASE_URL"}}
    env.update(
        CONTROLPLANE_VAR_DIR=str(tmp_path / "var"),
        CONTROLPLANE_BIND=f"127.0.0.1:{port}",
        CONTROLPLANE_GATEWAY_BIND=f"127.0.0.1:{free_port()}",
        DATABASE_URL=f"sqlite:///{tmp_path / 'var' / 'demo.sqlite3'}",
        DEMO_BACKEND_PORT_BASE=str(random.randrange(30000, 39000, 100)),
        CONTROLPLANE_REGISTRATION_TOKEN="cpr_demo_test_" + os.urandom(8).hex(),
        PYTHONUNBUFFERED="1",
    )
    env.pop("CONTROLPLANE_LOAD_JOB_RUNNER", None)
    log = open(tmp_path / "demo.log", "wb")
    demo = subprocess.Popen(
        [str(ROOT / "scripts" / "demo")],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    key_file = tmp_path / "var" / "demo_operator_key"
    try:
        deadline = time.monotonic() + 90
        model = None
        while time.monotonic() < deadline:
            assert demo.poll() is None, (tmp_path / "demo.log").read_text()[-4000:]
            if key_file.exists() and key_file.read_text().strip():
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/v1/models/demo-echo",
                    headers={"Authorization": f"Bearer {key_file.read_text().strip()}"},
                )
                try:
                    with urllib.request.urlopen(request, timeout=5) as response:
                        model = json.loads(response.read())
                except (urllib.error.URLError, OSError):
                    model = None
                if model and model.get("ready_replicas") == 2:
                    break
            time.sleep(0.5)
        assert model and model["ready_replicas"] == 2, (model, (tmp_path / "demo.log").read_text()[-4000:])
        assert oct(key_file.stat().st_mode)[-3:] == "600"
        answers = run_printed_snippets(tmp_path / "demo.log", demo, env)
        assert json.loads(answers["curl"])["choices"][0]["message"]["content"] == "hello fleet", answers
        assert answers["openai"].strip() == "hello fleet", answers
    finally:
        demo.send_signal(signal.SIGINT)
        stop_began = time.monotonic()
        try:
            code = demo.wait(90)
            stop_took = time.monotonic() - stop_began
        finally:
            leftovers = session_processes(demo.pid)
            for pid in leftovers:  # never leave them running, even when the test fails
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            log.close()
    output = (tmp_path / "demo.log").read_text()
    assert "demo: stopped" in output, output[-4000:]
    assert not leftovers, f"still running after Ctrl-C: {leftovers}\n{output[-3000:]}"
    assert code in (0, 130, -2), (code, output[-3000:])
    # Workers first, while the web process still answers them; all of it within 10 s.
    assert output.count("deregister accepted") == 2, output[-3000:]
    assert stop_took < 10, (stop_took, output[-3000:])
