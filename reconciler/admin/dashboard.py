"""The fleet dashboard, ``/admin/fleet/`` (URL name ``admin:fleet_dashboard``): summaries of the
whole fleet first (nodes by status, models by condition, the problems), then a searchable, paged
slice of it (models: desired vs ready; the grid of nodes x models), the last reconcile pass and
the recent events, built from the reconciler's snapshot in a fixed number of queries.

It is registered on the default admin site by wrapping its ``get_urls`` (see the bottom of this
module), so neither ``settings.py`` nor ``urls.py`` needs a custom ``AdminSite``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlencode

from django.contrib import admin
from django.template.response import TemplateResponse
from django.urls import path

from registry import rules
from registry.admin.display import age, status_badge
from registry.models import Node, NodeModel

from ..models import Event, ModelCondition, ReconcilePass
from ..snapshot import take_snapshot
from . import history
from .records import summary_text

DASHBOARD_EVENTS = 15
# The page shows summaries of the whole fleet, then one slice of it: a page of models and a page
# of nodes (after the search filters), and the grid of those nodes x those models. Its size is
# bounded by these numbers, not by the fleet's: 1,000 nodes x 1,000 models would be a million
# grid cells.
MODELS_PER_PAGE = 50
NODES_PER_PAGE = 50
GRID_MODELS = 20  # grid columns: the first models of the model page
PROBLEMS_SHOWN = 20
SEARCH_MAX_LENGTH = 255


@dataclass(frozen=True)
class DashboardQuery:
    """The slice the operator asked for (query string), read leniently: a bad page number is the
    first page, an over-long search is cut, so no query string can fail the page."""

    model: str = ""  # substring of the model name, case-insensitive
    node: str = ""  # substring of the node name, case-insensitive
    label: str = ""  # "key=value" or "key" (nodes carrying that label)
    problems: bool = False  # only models with a problem
    page: int = 1  # of models
    node_page: int = 1

    @classmethod
    def from_query(cls, query) -> DashboardQuery:
        def text(name):
            return str(query.get(name, "")).strip()[:SEARCH_MAX_LENGTH]

        def number(name):
            value = text(name)
            return int(value) if value.isdecimal() and 0 < len(value) < 7 and int(value) > 0 else 1

        return cls(
            model=text("model"),
            node=text("node"),
            label=text("label"),
            problems=text("problems") in ("1", "on", "true", "yes"),
            page=number("page"),
            node_page=number("node_page"),
        )

    def link(self, **changes) -> str:
        """The query string of this slice with ``changes`` (empty values left out)."""
        values = {**self.__dict__, **changes}
        kept = {}
        for name, value in values.items():
            if name in ("page", "node_page"):
                if value != 1:
                    kept[name] = value
            elif value is True:
                kept[name] = "1"
            elif value:
                kept[name] = value
        return "?" + urlencode(kept)

    @property
    def filtered(self) -> bool:
        return bool(self.model or self.node or self.label or self.problems)

    def label_matches(self, labels) -> bool:
        key, _, value = self.label.partition("=")
        key = key.strip()
        if key not in labels:
            return False
        return not _ or labels[key] == value.strip()


@dataclass(frozen=True)
class Page:
    """One page of a filtered list: its items, where it is and how many there are in all."""

    items: list
    number: int
    pages: int
    total: int

    @classmethod
    def of(cls, items: list, number: int, size: int) -> Page:
        pages = max(1, -(-len(items) // size))
        number = min(number, pages)
        return cls(items[(number - 1) * size : number * size], number, pages, len(items))

    @property
    def previous(self) -> int | None:
        return self.number - 1 if self.number > 1 else None

    @property
    def next(self) -> int | None:
        return self.number + 1 if self.number < self.pages else None


def replica_cell(rows) -> str:
    """Text of one dashboard cell: ``"loaded x2 (1 in flight), loading x1"``."""
    by_state = defaultdict(list)
    for row in rows:
        by_state[row.state].append(row)
    parts = []
    for state in (NodeModel.State.LOADED, NodeModel.State.LOADING):
        group = by_state.get(state)
        if not group:
            continue
        text = f"{state} x{len(group)}"
        in_flight = sum(row.in_flight for row in group)
        if in_flight:
            text += f" ({in_flight} in flight)"
        parts.append(text)
    return ", ".join(parts)


def model_row(snapshot, model: str) -> dict:
    """One model's line: desired vs ready, and what is wrong with it (unhealthy conditions,
    missing load info, fewer ready than its floor)."""
    config = snapshot.config_for(model)
    ready, loading = len(snapshot.ready(model)), len(snapshot.loading(model))
    problems = [
        f"{kind}: {cond.reason}"
        for kind, _ in ModelCondition.Type.choices
        if (cond := snapshot.conditions.get((model, kind)))
        and cond.status == (kind != ModelCondition.Type.AVAILABLE)
        and kind != ModelCondition.Type.PROGRESSING
    ]
    has_load_info = snapshot.has_load_info(model)
    desired = config.min_replicas if config.autoscaled else None
    if not has_load_info and not any(p.startswith(ModelCondition.Type.NO_LOAD_INFO) for p in problems):
        problems.append("no load info")
    if desired is not None and ready < desired and not problems:
        problems.append(f"{ready} of {desired} ready")
    return {
        "name": model,
        "ready": ready,
        "loading": loading,
        "desired": desired,
        "max": config.max_replicas,
        "has_config": model in snapshot.configs,
        "has_load_info": has_load_info,
        "floor": rules.ready_for_available(config.min_replicas),
        "problems": problems,
    }


def condition_counts(snapshot, models) -> list[tuple[str, int, int]]:
    """Per condition type: how many models have it true and false (models without the
    condition recorded yet count in neither)."""
    counts = []
    for kind, _ in ModelCondition.Type.choices:
        if kind == ModelCondition.Type.REAPING_PAUSED:
            continue  # a cluster condition, shown with the nodes
        true = false = 0
        for model in models:
            cond = snapshot.conditions.get((model, kind))
            if cond is not None:
                if cond.status:
                    true += 1
                else:
                    false += 1
        counts.append((kind, true, false))
    return counts


def dashboard_context(*, now: datetime | None = None, query: DashboardQuery | None = None) -> dict:
    """Everything the dashboard shows, in a fixed number of queries: the reconciler's snapshot
    (seven), the newest events (one), the newest reconcile pass (one) and the charts of the last
    hour (three: the page's models' replica samples, the passes, the cold loads). The summaries cover the
    whole fleet; the tables and the grid only the slice ``query`` selects (a page of models, a
    page of nodes), so the page's size does not grow with the fleet."""
    query = query or DashboardQuery()
    snapshot = take_snapshot(now=now)
    nodes = sorted(snapshot.nodes.values(), key=lambda node: node.name)
    all_models = snapshot.model_names
    rows = [model_row(snapshot, model) for model in all_models]
    with_problems = [row for row in rows if row["problems"]]

    selected_models = rows
    if query.model:
        needle = query.model.casefold()
        selected_models = [row for row in selected_models if needle in row["name"].casefold()]
    if query.problems:
        selected_models = [row for row in selected_models if row["problems"]]
    model_page = Page.of(selected_models, query.page, MODELS_PER_PAGE)

    selected_nodes = nodes
    if query.node:
        needle = query.node.casefold()
        selected_nodes = [node for node in selected_nodes if needle in node.name.casefold()]
    if query.label:
        selected_nodes = [node for node in selected_nodes if query.label_matches(node.labels)]
    node_page = Page.of(selected_nodes, query.node_page, NODES_PER_PAGE)

    history.replica_charts(model_page.items, now=snapshot.taken_at)
    grid_models = [row["name"] for row in model_page.items[:GRID_MODELS]]
    cells = _cells(snapshot, node_page.items, frozenset(grid_models))
    grid = [
        {
            "node": node,
            "badge": status_badge(node.status),
            "heartbeat": age(node.last_heartbeat, now=snapshot.taken_at),
            "cells": [replica_cell(cells.get((node.id, model), ())) for model in grid_models],
        }
        for node in node_page.items
    ]
    problem_nodes = [node for node in nodes if node.status in (Node.Status.UNHEALTHY, Node.Status.OFFLINE)]
    status_counts = Counter(node.status for node in nodes)
    reaping_paused = snapshot.conditions.get((ModelCondition.CLUSTER, ModelCondition.Type.REAPING_PAUSED))
    last_pass = ReconcilePass.objects.order_by("-started_at", "-id").first()
    return {
        "taken_at": snapshot.taken_at,
        "query": query,
        "model_total": len(all_models),
        "node_total": len(nodes),
        "replica_total": len(snapshot.replicas),
        "condition_counts": condition_counts(snapshot, all_models),
        "problem_models": with_problems[:PROBLEMS_SHOWN],
        "problem_model_total": len(with_problems),
        "problem_nodes": problem_nodes[:PROBLEMS_SHOWN],
        "problem_node_total": len(problem_nodes),
        "reaping_paused": reaping_paused if reaping_paused and reaping_paused.status else None,
        "model_rows": model_page.items,
        "model_page": model_page,
        "models": grid_models,
        "grid": grid,
        "node_page": node_page,
        "links": {
            "models_previous": model_page.previous and query.link(page=model_page.previous),
            "models_next": model_page.next and query.link(page=model_page.next),
            "nodes_previous": node_page.previous and query.link(node_page=node_page.previous),
            "nodes_next": node_page.next and query.link(node_page=node_page.next),
            "problems": query.link(problems=True, page=1),
            "clear": "?",
        },
        "status_counts": [
            (status, label, status_counts.get(status, 0), status_badge(status)) for status, label in Node.Status.choices
        ],
        "events": list(Event.objects.all()[:DASHBOARD_EVENTS]),
        **history.pass_charts(now=snapshot.taken_at),
        **history.cold_load_chart(now=snapshot.taken_at),
        "last_pass": last_pass,
        "last_pass_summary": summary_text(last_pass.summary) if last_pass else "",
        "refresh_seconds": 10,
    }


def _cells(snapshot, nodes, models: frozenset[str]) -> dict:
    """The replica rows of the grid's cells, by (node id, model): only the page's nodes are read."""
    cells = defaultdict(list)
    for node in nodes:
        for row in snapshot.replicas_by_node.get(node.id, ()):
            if row.model_name in models:
                cells[(node.id, row.model_name)].append(row)
    return cells


def dashboard_view(request):
    context = {
        **admin.site.each_context(request),
        "title": "Fleet dashboard",
        **dashboard_context(query=DashboardQuery.from_query(request.GET)),
    }
    return TemplateResponse(request, "admin/reconciler/dashboard.html", context)


def _with_dashboard(get_urls):
    def urls():
        return [path("fleet/", admin.site.admin_view(dashboard_view), name="fleet_dashboard"), *get_urls()]

    return urls


# admin_view: staff only, login redirect otherwise, never cached.
admin.site.get_urls = _with_dashboard(admin.site.get_urls)
