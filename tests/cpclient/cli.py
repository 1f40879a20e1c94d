"""Running the operator CLI (``python -m cpclient``) as a subprocess, and reading its tables
back by their header positions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli_env(url: str | None, key: str | None, **extra: str) -> dict[str, str]:
    """The environment of a CLI run: this one without any CONTROLPLANE_* or DJANGO_* variable
    (the CLI must not need Django), plus the CLI's own two when given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTROLPLANE_", "DJANGO_", "DATABASE_"))}
    if url is not None:
        env["CONTROLPLANE_URL"] = url
    if key is not None:
        env["CONTROLPLANE_API_KEY"] = key
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cpclient", *args]


def run(*args: str, url: str | None, key: str | None, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(*args), cwd=ROOT, env=cli_env(url, key, **extra), capture_output=True, text=True, timeout=timeout
    )


def table(text: str) -> list[dict[str, str]]:
    """The rows of a table printed by the CLI, as {header: cell}; every cell must start exactly
    under its header (the columns are aligned) and be preceded by a blank."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = lines[0]
    names = header.split()
    starts = []
    position = 0
    for name in names:
        position = header.index(name, position)
        starts.append(position)
        position += len(name)
    rows = []
    for line in lines[1:]:
        row = {}
        for index, name in enumerate(names):
            start = starts[index]
            end = starts[index + 1] if index + 1 < len(starts) else len(line)
            assert start == 0 or line[start - 1] == " ", f"column {name} not aligned in {line!r}"
            assert line[start] != " ", f"column {name} not aligned in {line!r}"
            row[name] = line[start:end].rstrip()
        rows.append(row)
    return rows
