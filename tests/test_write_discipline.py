"""One writer per transition: every write to a registry, reconciler or core table goes through a
named manager verb (``registry/managers/``, ``reconciler/managers.py``, or a manager class such
as ``core.models.ApiKeyManager``). Nothing else in ``core/``, ``registry/``, ``reconciler/`` or
``controlplane/`` calls ``update``, ``delete``, ``create``, ``save``, ``get_or_create``,
``update_or_create``, ``bulk_create`` or ``bulk_update`` on one of our models.

The check reads the source (``ast``), so it costs no database. It is precise rather than broad:
a call is flagged only when its receiver is provably ORM, i.e. the receiver chain

* reaches ``.objects`` (or ``_default_manager``/``_base_manager``) from one of our model
  classes: a name imported from or defined in a ``models`` module of ours, ``type(self)`` or
  ``self.__class__`` inside such a model, or ``registry_model("X")``/``apps.get_model(...)``;
* or is a model instance built by calling one of our model classes (``Node(...).save()``);
* or starts from a local name bound (assignment, ``for`` target, ``with ... as``) to any of the
  above, transitively (``queryset = Node.objects.filter(...)``; ``queryset.update(...)``);
* or starts from the ``queryset``/``obj`` parameter of a method of a ModelAdmin (the admin hands
  its actions a queryset of its model).

So a dict's ``update``, a set's, a ``Counter``'s or a ``threading.Event``'s are never flagged:
their receivers are not ORM (receiver analysis, no line allow-list).

Explicit exceptions, each for a reason:

* code inside a Manager or QuerySet class (any class deriving from ``models.Manager``,
  ``models.QuerySet`` or ``Manager.from_queryset(...)``), wherever it lives: that is where the
  verbs are. ``core/models.py`` keeps ``ApiKeyManager`` next to its model (``core`` has no
  ``managers`` package), and it counts as a manager;
* django-q2's ``Schedule`` rows, deleted by the migration that retired the reconcile schedule
  (``reconciler/migrations/0003_remove_reconcile_schedule.py``, with the historical model): a
  third-party table with no manager of ours to hold a verb. It is not one of our models, so the receiver analysis does not flag it;
  ``test_foreign_models_are_not_ours`` pins that down.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED_PACKAGES = ("core", "registry", "reconciler", "controlplane", "gateway")
MODEL_MODULES = ("core/models.py", "registry/models.py", "reconciler/models.py")
WRITES = frozenset(
    {"update", "delete", "create", "save", "get_or_create", "update_or_create", "bulk_create", "bulk_update"}
)
MANAGER_ATTRIBUTES = frozenset({"objects", "_default_manager", "_base_manager"})
MODEL_LOOKUPS = frozenset({"registry_model", "get_model"})
ADMIN_ORM_PARAMETERS = frozenset({"queryset", "obj"})


def is_exempt_path(relative: str) -> bool:
    """Where verbs live (the managers), and migrations (historical models, data migrations)."""
    parts = relative.split("/")
    return "managers" in parts or relative == "reconciler/managers.py" or "migrations" in parts


def our_model_names() -> frozenset[str]:
    """Every class of our ``models`` modules that derives from ``models.Model``."""
    names = set()
    for relative in MODEL_MODULES:
        tree = ast.parse((ROOT / relative).read_text(), relative)
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and any(_dotted(base).endswith("Model") for base in node.bases):
                names.add(node.name)
    return frozenset(names)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):
        return _dotted(node.func) + "()"
    return ""


def _is_manager_class(node: ast.ClassDef) -> bool:
    return any(
        "Manager" in _dotted(base) or "QuerySet" in _dotted(base) or "from_queryset" in _dotted(base)
        for base in node.bases
    )


def _is_admin_class(node: ast.ClassDef) -> bool:
    return any(_dotted(base).endswith("Admin") or "ModelAdmin" in _dotted(base) for base in node.bases)


@dataclass(frozen=True)
class Write:
    path: str
    line: int
    code: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.code}"


class _Scope:
    """The names of one module or function that hold our models, querysets or instances."""

    def __init__(self, models: set[str], orm: set[str], model_class: str | None):
        self.models = models  # names bound to our model classes
        self.orm = orm  # names bound to managers, querysets or instances of our models
        self.model_class = model_class  # the model class whose method this is, if any


class WriteFinder:
    def __init__(self, source: str, path: str, model_names: frozenset[str]):
        self.source = source
        self.path = path
        self.model_names = model_names
        self.writes: list[Write] = []

    # --- receiver analysis --------------------------------------------------------------------

    def _chain(self, node: ast.AST):
        """``(root, attributes, constructed)`` of a receiver expression: the innermost name or
        call, the attribute names on the way, and whether the root is a call of the root name."""
        attributes = []
        while True:
            if isinstance(node, ast.Attribute):
                attributes.append(node.attr)
                node = node.value
            elif isinstance(node, ast.Subscript):
                node = node.value
            elif isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Subscript)):
                node = node.func
            else:
                return node, attributes

    def is_orm(self, node: ast.AST, scope: _Scope) -> bool:
        root, attributes = self._chain(node)
        through_manager = bool(MANAGER_ATTRIBUTES.intersection(attributes))
        if isinstance(root, ast.Name):
            if root.id in scope.orm:
                return True
            if root.id in scope.models:
                return through_manager
            if root.id == "self" and "__class__" in attributes and scope.model_class:
                return through_manager
            return False
        if isinstance(root, ast.Call):
            callee = _dotted(root.func)
            if isinstance(root.func, ast.Name) and root.func.id in scope.models:
                return True  # an instance of one of our models
            if callee == "type" and scope.model_class and root.args and _dotted(root.args[0]) == "self":
                return through_manager
            if callee.split(".")[-1] in MODEL_LOOKUPS and self._looks_up_ours(root):
                return through_manager
        return False

    def _looks_up_ours(self, call: ast.Call) -> bool:
        names = [arg.value for arg in call.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
        return any(name in self.model_names for name in names)

    # --- scopes -------------------------------------------------------------------------------

    def module_models(self, tree: ast.Module) -> set[str]:
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module is not None and node.module.split(".")[-1] == "models":
                for alias in node.names:
                    if alias.name in self.model_names:
                        names.add(alias.asname or alias.name)
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name in self.model_names:
                names.add(node.name)
        return names

    def _bind(self, target: ast.AST, scope: _Scope) -> None:
        if isinstance(target, ast.Name):
            scope.orm.add(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                self._bind(element, scope)

    def _collect_bindings(self, body: list[ast.stmt], scope: _Scope) -> None:
        """Names bound to ORM values in a function body, to a fixpoint (order-insensitive)."""
        statements = [node for statement in body for node in ast.walk(statement)]
        changed = True
        while changed:
            before = len(scope.orm)
            for node in statements:
                if isinstance(node, ast.Assign) and self.is_orm(node.value, scope):
                    for target in node.targets:
                        self._bind(target, scope)
                elif isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.NamedExpr)) and node.value is not None:
                    if self.is_orm(node.value, scope):
                        self._bind(node.target, scope)
                elif isinstance(node, (ast.For, ast.comprehension)) and self.is_orm(node.iter, scope):
                    self._bind(node.target, scope)
                elif isinstance(node, ast.withitem) and node.optional_vars is not None:
                    if self.is_orm(node.context_expr, scope):
                        self._bind(node.optional_vars, scope)
            changed = len(scope.orm) != before

    # --- the walk -----------------------------------------------------------------------------

    def run(self) -> list[Write]:
        tree = ast.parse(self.source, self.path)
        models = self.module_models(tree)
        module_scope = _Scope(models, set(), None)
        self._collect_bindings(
            [node for node in tree.body if not isinstance(node, (ast.FunctionDef, ast.ClassDef))], module_scope
        )
        self._visit_body(tree.body, module_scope, in_admin=False)
        return self.writes

    def _visit_body(self, body, scope: _Scope, *, in_admin: bool, model_class: str | None = None) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                if _is_manager_class(node):
                    continue  # verbs live here
                owner = node.name if node.name in self.model_names else None
                self._visit_body(node.body, scope, in_admin=_is_admin_class(node), model_class=owner)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._visit_function(node, scope, in_admin=in_admin, model_class=model_class)
            else:
                self._check_calls(node, scope)

    def _visit_function(self, function, outer: _Scope, *, in_admin: bool, model_class: str | None) -> None:
        scope = _Scope(set(outer.models), set(outer.orm), model_class or outer.model_class)
        if in_admin:
            for argument in function.args.args + function.args.kwonlyargs:
                if argument.arg in ADMIN_ORM_PARAMETERS:
                    scope.orm.add(argument.arg)
        self._collect_bindings(function.body, scope)
        nested = [n for n in function.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        for statement in function.body:
            if statement in nested:
                continue
            self._check_calls(statement, scope)
        self._visit_body(nested, scope, in_admin=False, model_class=scope.model_class)

    def _check_calls(self, statement: ast.AST, scope: _Scope) -> None:
        for node in ast.walk(statement):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and node is not statement:
                continue
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in WRITES
                and self.is_orm(node.func.value, scope)
            ):
                code = ast.get_source_segment(self.source, node) or node.func.attr
                self.writes.append(Write(self.path, node.lineno, " ".join(code.split())[:120]))


def find_writes(source: str, path: str = "<snippet>", model_names: frozenset[str] | None = None) -> list[Write]:
    return WriteFinder(source, path, model_names or our_model_names()).run()


def scanned_files():
    for package in SCANNED_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if not is_exempt_path(relative):
                yield relative


def test_no_write_to_our_tables_outside_a_manager_verb():
    model_names = our_model_names()
    writes = [
        write
        for relative in scanned_files()
        for write in find_writes((ROOT / relative).read_text(), relative, model_names)
    ]
    assert not writes, "writes outside a manager verb (add or use a verb in the managers):\n" + "\n".join(
        map(str, writes)
    )


# --- the checker itself -------------------------------------------------------------------------

MODELS = frozenset({"Node", "NodeModel"})


def flagged(source: str) -> list[int]:
    return [write.line for write in find_writes(source, model_names=MODELS)]


def test_the_models_of_our_apps_are_found():
    names = our_model_names()
    assert {"Node", "NodeModel", "Lease", "LoadJob", "Event", "ReconcilePass", "ApiKey"} <= names
    assert "NodeManager" not in names


def test_manager_chains_querysets_bound_to_names_and_instances_are_flagged():
    source = """
from registry.models import Node, NodeModel

def f(node_id):
    Node.objects.filter(pk=node_id).update(status="x")
    rows = NodeModel.objects.filter(node_id=node_id)
    mine = rows.exclude(in_flight=0)
    mine.delete()
    for row in NodeModel.objects.all():
        row.save()
    Node(name="n").save()
    type(node_id).objects.create()  # not a model method: type(...) of an argument is unknown
"""
    assert flagged(source) == [5, 8, 10, 11]


def test_non_orm_receivers_are_not_flagged():
    source = """
from collections import Counter
from registry.models import Node

def f(rows):
    counts = Counter()
    counts.update(rows)
    names = {}
    names.update(a=1)
    seen = set()
    seen.update(rows)
    settings = {"a": 1}
    settings.update(Node.objects.values("pk").first() or {})
"""
    assert flagged(source) == []


def test_model_methods_writing_through_their_own_class_are_flagged_and_managers_are_not():
    source = """
from django.db import models

class NodeManager(models.Manager):
    def touch(self, pk):
        return self.filter(pk=pk).update(x=1)

class Node(models.Model):
    objects = NodeManager()

    def touch(self):
        return type(self).objects.filter(pk=self.pk).update(x=1)

    def again(self):
        return self.__class__.objects.filter(pk=self.pk).delete()
"""
    assert flagged(source) == [12, 15]


def test_admin_action_querysets_are_orm():
    source = """
from django.contrib import admin

class NodeAdmin(admin.ModelAdmin):
    def drain(self, request, queryset):
        queryset.update(status="draining")

    def save_model(self, request, obj, form, change):
        obj.save()

def helper(queryset):
    queryset.update(a=1)  # not an admin method: unknown receiver
"""
    assert flagged(source) == [6, 9]


def test_foreign_models_are_not_ours():
    """django-q2's Schedule (the migration that retired the reconcile schedule) is written with
    its own ORM calls: not one of our tables, so not a transition of ours."""
    path = "reconciler/migrations/0003_remove_reconcile_schedule.py"
    source = (ROOT / path).read_text()
    assert ".delete()" in source
    assert find_writes(source, path) == []


# --- the verbs name their idiom -----------------------------------------------------------------


def _method_writes(method: ast.FunctionDef, methods: dict, seen: tuple = ()) -> bool:
    for node in ast.walk(method):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in WRITES:
                return True
            called = node.func.attr
            if _dotted(node.func.value) == "self" and called in methods and called not in seen:
                if _method_writes(methods[called], methods, (*seen, method.name)):
                    return True
    return False


def _writing_verbs(relative: str):
    """Public methods (verbs) of the manager classes of ``relative`` that write: a write call of
    their own, or a call of another writing method of the same manager (``self.<name>(...)``,
    private helpers included: their callers name the idiom)."""
    tree = ast.parse((ROOT / relative).read_text(), relative)
    for cls in tree.body:
        # Manager and QuerySet classes, and the verb mixins of a manager (``NodeCapacityVerbs``).
        if isinstance(cls, ast.ClassDef) and (_is_manager_class(cls) or cls.name.endswith("Verbs")):
            methods = {node.name: node for node in cls.body if isinstance(node, ast.FunctionDef)}
            for name, method in methods.items():
                if not name.startswith("_") and _method_writes(method, methods):
                    yield cls.name, name, ast.get_docstring(method) or ""


def _verb_modules() -> list[str]:
    registry = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "registry" / "managers").glob("*.py"))
    return [*registry, "reconciler/managers.py", "core/models.py"]


def test_every_writing_verb_names_its_idiom():
    missing = [
        f"{relative}: {cls}.{name}"
        for relative in _verb_modules()
        for cls, name, doc in _writing_verbs(relative)
        if "Idiom" not in doc
    ]
    assert not missing, "writing verbs whose docstring does not name its idiom:\n" + "\n".join(missing)
