"""``controlplane/settings.py`` is THE settings table: every setting's default is written there
once, nothing else carries a second copy, and the documentation lists what it reads.

Read from the source (no process, no database): a ``getattr(settings, NAME, default)`` anywhere
in production code is a second default that drifts; an environment variable the settings read
but no document names is a knob nobody can find; a documented variable nothing reads is a
knob that does nothing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION_PACKAGES = ("core", "registry", "reconciler", "controlplane", "proto")
SETTINGS = ROOT / "controlplane" / "settings.py"
OPERATIONS = ROOT / "docs" / "operations.md"
README = ROOT / "README.md"
# Process-level knobs read outside Django (gunicorn's config, the shell scripts).
OTHER_READERS = (ROOT / "controlplane" / "gunicorn.conf.py", *sorted((ROOT / "scripts").iterdir()))

ENV_READERS = {"env_bool", "env_float", "env_int", "env_optional_float"}


def production_modules():
    for package in PRODUCTION_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if not path.name.endswith("_pb2.py") and not path.name.endswith("_pb2_grpc.py"):
                yield path


def getattr_settings_with_default(path: Path) -> list[int]:
    """Lines of ``getattr(settings, ..., default)`` calls in ``path``."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"):
            continue
        target = node.args[0] if node.args else None
        named_settings = (isinstance(target, ast.Name) and target.id == "settings") or (
            isinstance(target, ast.Attribute) and target.attr == "settings"
        )
        if named_settings and len(node.args) >= 3:
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("path", list(production_modules()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_production_module_keeps_a_second_default(path):
    assert getattr_settings_with_default(path) == [], (
        f"{path.relative_to(ROOT)} reads a setting with a default of its own: read settings.NAME and "
        "define the default once in controlplane/settings.py"
    )


def settings_env_defaults() -> dict[str, object]:
    """``{environment variable: its default as written}`` for every variable settings.py reads."""
    found = {}
    for node in ast.walk(ast.parse(SETTINGS.read_text())):
        if not isinstance(node, ast.Call) or not node.args or not isinstance(node.args[0], ast.Constant):
            continue
        func = node.func
        reader = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if reader in ENV_READERS or (reader == "get" and ast.unparse(func) == "os.environ.get"):
            default = node.args[1] if len(node.args) > 1 else None
            found[node.args[0].value] = ast.literal_eval(default) if isinstance(default, ast.Constant) else None
    return found


def documented_variables(text: str) -> dict[str, str]:
    """``{variable: default cell}`` of every table row naming variables in its first cell.
    ``A_B_C` / `_D`` abbreviates ``A_B_D`` (the tail replaces as many segments of the first
    name as it has)."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([A-Z_][A-Z0-9_]*)`", cells[0])
        if not names:
            continue
        first = names[0]
        for name in names:
            if name.startswith("_"):
                segments = name.strip("_").split("_")
                name = "_".join(first.split("_")[: -len(segments)] + segments)
            rows[name] = cells[1]
    return rows


def settings_section(text: str) -> str:
    """The "## Settings" section of docs/operations.md (up to the next level-2 heading)."""
    start = text.index("\n## Settings\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_every_variable_the_settings_read_is_documented():
    documented = documented_variables(README.read_text()) | documented_variables(
        settings_section(OPERATIONS.read_text())
    )
    missing = sorted(set(settings_env_defaults()) - set(documented))
    assert missing == [], f"read by controlplane/settings.py, documented nowhere: {missing}"


def test_every_documented_operations_variable_is_read_with_the_documented_default():
    env = settings_env_defaults()
    other_sources = "\n".join(path.read_text() for path in OTHER_READERS if path.is_file())
    rows = documented_variables(settings_section(OPERATIONS.read_text()))
    assert rows, "docs/operations.md has no settings table"
    for name, default in rows.items():
        if name in env:
            literal = re.fullmatch(r"`([^`]*)`", default)
            if literal and isinstance(env[name], (int, float)) and not isinstance(env[name], bool):
                assert float(literal.group(1)) == float(env[name]), (name, default, env[name])
        else:
            assert name in other_sources, f"{name} is documented in docs/operations.md but nothing reads it"
