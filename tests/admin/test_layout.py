"""The admin's place in the layers: the registry's admin imports nothing from the reconciler
(the reconciler's admin adds what needs it), every admin module stays small, and the model
page is registered once, by the reconciler, on top of the registry's page."""

import ast
from pathlib import Path

import pytest
from django.contrib import admin

from reconciler.admin.scheduling import ReconciledModelSchedulingConfigAdmin
from registry.admin.scheduling import ModelSchedulingConfigAdmin
from registry.models import ModelSchedulingConfig

ROOT = Path(__file__).resolve().parents[2]
ADMIN_MODULES = sorted([*(ROOT / "registry" / "admin").glob("*.py"), *(ROOT / "reconciler" / "admin").glob("*.py")])


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth of the file."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            names.add(".".join(part for part in (base, node.module or "") if part))
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "registry" / "admin").glob("*.py")), ids=lambda p: p.name)
def test_the_registry_admin_imports_nothing_from_the_reconciler(path):
    assert not {name for name in imported_modules(path) if name.split(".")[0] in {"reconciler", "controlplane"}}


@pytest.mark.parametrize("path", ADMIN_MODULES, ids=lambda p: f"{p.parent.parent.name}.{p.name}")
def test_no_admin_module_exceeds_600_lines(path):
    assert len(path.read_text().splitlines()) <= 600


def test_the_model_page_is_registered_once_with_the_reconcilers_features():
    registered = admin.site._registry[ModelSchedulingConfig]
    assert type(registered) is ReconciledModelSchedulingConfigAdmin
    assert isinstance(registered, ModelSchedulingConfigAdmin)
