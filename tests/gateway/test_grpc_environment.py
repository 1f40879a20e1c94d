"""The gateway process's gRPC configuration (gateway/grpc_environment.py): set before grpc is
first imported, in both ways the gateway starts, and never over an operator's own value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import grpc_environment

ROOT = Path(__file__).resolve().parents[2]

# Records GRPC_EXPERIMENTS as it is at the moment grpc is first imported (what gRPC reads),
# whether the gateway's start-up imports it or the probe's last line does.
PROBE = r"""
import json, os, runpy, sys
seen = {}

class FirstGrpcImport:
    def find_spec(self, name, path=None, target=None):
        if name == "grpc" and "at_import" not in seen:
            seen["at_import"] = os.environ.get("GRPC_EXPERIMENTS")
        return None

sys.meta_path.insert(0, FirstGrpcImport())
if sys.argv[1] == "manage.py":
    sys.argv = ["manage.py", *sys.argv[2:]]
    try:
        runpy.run_path("manage.py", run_name="__main__")
    except SystemExit:
        pass
else:
    import gateway.asgi  # noqa: F401
import grpc  # noqa: F401  (recorded here if nothing before imported it)
print(json.dumps(seen))
"""


# ``manage.py gateway`` with a bind address the command refuses: it starts like the real
# command, up to serving.
GATEWAY = ("manage.py", "gateway", "--bind", "no-port-here")


def _first_grpc_import(*entry: str, **env: str) -> dict:
    """``entry``: ``gateway.asgi``, or ``manage.py`` and the command's arguments."""
    environment = {key: value for key, value in os.environ.items() if key != "GRPC_EXPERIMENTS"}
    environment.update(env)
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *entry],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.strip(), result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("entry", [GATEWAY, ("gateway.asgi",)], ids=["manage.py gateway", "gateway.asgi"])
def test_the_gateway_process_sets_its_grpc_experiments_before_grpc_is_imported(entry):
    seen = _first_grpc_import(*entry)
    assert seen == {"at_import": grpc_environment.GATEWAY_GRPC_EXPERIMENTS}


def test_an_operators_grpc_experiments_is_kept():
    seen = _first_grpc_import(*GATEWAY, GRPC_EXPERIMENTS="-some_other_experiment")
    assert seen == {"at_import": "-some_other_experiment"}


def test_other_commands_leave_grpc_alone():
    seen = _first_grpc_import("manage.py", "check", "--deploy", "--fail-level", "CRITICAL")
    assert seen == {"at_import": None}


def test_configure_sets_the_default_only_when_unset(monkeypatch):
    monkeypatch.delenv("GRPC_EXPERIMENTS", raising=False)
    grpc_environment.configure()
    assert os.environ["GRPC_EXPERIMENTS"] == "-event_engine_client"
    monkeypatch.setenv("GRPC_EXPERIMENTS", "")
    grpc_environment.configure()
    assert os.environ["GRPC_EXPERIMENTS"] == ""  # set (even empty) by the operator: kept
