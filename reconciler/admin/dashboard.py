"""The fleet dashboard, ``/admin/fleet/`` (URL name ``admin:fleet_dashboard``): nodes x models,
desired vs ready, the last reconcile pass and the recent events, built from the reconciler's
snapshot in a fixed number of queries.

It is registered on the default admin site by wrapping its ``get_urls`` (see the bottom of this
module), so neither ``settings.py`` nor ``urls.py`` needs a custom ``AdminSite``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime

from django.contrib import admin
from django.template.response import TemplateResponse
from django.urls import path

from registry.admin.display import age, status_badge
from registry.models import Node, NodeModel

from ..models import Event, ModelCondition, ReconcilePass
from ..snapshot import take_snapshot
from .records import summary_text

DASHBOARD_EVENTS = 15


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


def dashboard_context(*, now: datetime | None = None) -> dict:
    """Everything the dashboard shows, in a fixed number of queries: the reconciler's snapshot
    (six), the newest events (one) and the newest reconcile pass (one)."""
    snapshot = take_snapshot(now=now)
    nodes = sorted(snapshot.nodes.values(), key=lambda node: node.name)
    models = snapshot.model_names
    cells = defaultdict(list)
    for replica in snapshot.replicas:
        cells[(replica.node_id, replica.model_name)].append(replica)
    grid = [
        {
            "node": node,
            "badge": status_badge(node.status),
            "heartbeat": age(node.last_heartbeat, now=snapshot.taken_at),
            "cells": [replica_cell(cells.get((node.id, model), ())) for model in models],
        }
        for node in nodes
    ]
    model_rows = []
    for model in models:
        config = snapshot.config_for(model)
        conditions = {kind: snapshot.conditions.get((model, kind)) for kind, _ in ModelCondition.Type.choices}
        unhealthy = [
            f"{kind}: {cond.reason}"
            for kind, cond in conditions.items()
            if cond
            and cond.status == (kind != ModelCondition.Type.AVAILABLE)
            and kind != ModelCondition.Type.PROGRESSING
        ]
        model_rows.append(
            {
                "name": model,
                "ready": len(snapshot.ready(model)),
                "loading": len(snapshot.loading(model)),
                "desired": config.min_replicas if config.autoscaled else None,
                "max": config.max_replicas,
                "has_config": model in snapshot.configs,
                "has_load_info": snapshot.has_load_info(model),
                "problems": unhealthy,
            }
        )
    status_counts = Counter(node.status for node in nodes)
    last_pass = ReconcilePass.objects.order_by("-started_at", "-id").first()
    return {
        "taken_at": snapshot.taken_at,
        "models": models,
        "grid": grid,
        "model_rows": model_rows,
        "status_counts": [
            (status, label, status_counts.get(status, 0), status_badge(status)) for status, label in Node.Status.choices
        ],
        "events": list(Event.objects.all()[:DASHBOARD_EVENTS]),
        "last_pass": last_pass,
        "last_pass_summary": summary_text(last_pass.summary) if last_pass else "",
        "refresh_seconds": 10,
    }


def dashboard_view(request):
    context = {
        **admin.site.each_context(request),
        "title": "Fleet dashboard",
        **dashboard_context(),
    }
    return TemplateResponse(request, "admin/reconciler/dashboard.html", context)


def _with_dashboard(get_urls):
    def urls():
        return [path("fleet/", admin.site.admin_view(dashboard_view), name="fleet_dashboard"), *get_urls()]

    return urls


# admin_view: staff only, login redirect otherwise, never cached.
admin.site.get_urls = _with_dashboard(admin.site.get_urls)
