"""Ports and processes for the tests that start real servers and child processes (workers,
``scripts/run``, the e2e fleet): a free port, polling until a condition holds, and what
``/proc`` says about processes. (Where the other shared test helpers live: ``tests/clients.py``.)"""

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05, *, what: str = "condition"):
    """Poll ``predicate`` every ``interval`` seconds until it returns something truthy (returned),
    or fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(interval)


def _state(entry: Path) -> str:
    return (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (exited, not yet waited for: gone for our purposes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return _state(Path(f"/proc/{pid}")) != "Z"
    except (OSError, IndexError):
        return False


def live_processes(matches: Callable[[Path], bool]) -> dict[int, str]:
    """Live (not zombie) processes other than this one whose ``/proc/<pid>`` entry ``matches``:
    {pid: command line}. A process that exits while it is looked at is left out."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if matches(entry) and _state(entry) != "Z":
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            pass
    return found
