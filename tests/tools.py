"""External tools a test needs (Redis, promtool, prometheus, nginx, pgbouncer): a missing one is never a silent pass.

``missing(what)`` skips the test with a reason starting ``MISSING TOOL``, which the terminal
summary repeats in a banner (``tests/conftest.py``); under ``CI=true`` it fails the test instead,
since CI installs every tool (``.ci/run``).
"""

from __future__ import annotations

import os
import shutil

import pytest

MARK = "MISSING TOOL"


def missing(what: str) -> None:
    """Fail under CI, else skip loudly."""
    message = f"{MARK}: {what}; this test did NOT run"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI installs it: .ci/run)", pytrace=False)
    pytest.skip(message)


def binary(name: str, package: str) -> str:
    """The path of executable ``name`` (Debian package ``package``), or ``missing``."""
    # nginx and pgbouncer live in /usr/sbin, which an unprivileged user's PATH often lacks.
    path = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    if path is None:
        missing(f"`{name}` not found (Debian package `{package}`: apt-get install -y {package})")
    return path
