"""``manage.py check --deploy`` is clean in the README's documented production configuration.

The README's "HTTPS and TLS" block is run as written (bash, a fresh process, nothing of this
test's environment but PATH), so the block and the settings cannot drift apart: a setting
renamed in controlplane/settings.py, or a warning Django adds, fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def documented_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("**HTTPS and TLS**") :]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "README: the HTTPS and TLS paragraph has no sh block"
    return match.group(1)


def run(script: str, tmp_path) -> subprocess.CompletedProcess:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "CONTROLPLANE_VAR_DIR": str(tmp_path / "var"),
    }
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_documented_production_configuration_passes_check_deploy(tmp_path):
    block = documented_block()
    assert "check --deploy --fail-level WARNING" in block
    done = run(block, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "System check identified no issues" in done.stdout, done.stdout


def test_without_the_https_settings_check_deploy_fails_on_them(tmp_path):
    """The block is what makes it clean: without its HTTPS lines the same check fails."""
    kept = [line for line in documented_block().splitlines() if "SECURE" not in line]
    done = run("\n".join(kept), tmp_path)
    assert done.returncode != 0
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in done.stderr, done.stderr


def test_an_unreadable_grpc_tls_file_stops_every_command_at_its_checks(tmp_path):
    """The qcluster and the gateway run the system checks as they start: a TLS file they cannot
    read stops them there (controlplane.E002), not at their first gRPC call."""
    done = run(f"CONTROLPLANE_GRPC_TLS_CA={tmp_path / 'missing.pem'} python manage.py check", tmp_path)
    assert done.returncode != 0
    assert "controlplane.E002" in done.stderr and "missing.pem" in done.stderr, done.stderr
