"""The CLI's commands (``cpclient.cli`` parses; each function here takes the client, the parsed
options and an :class:`Output`, and answers the exit code). Errors of the API are raised as
``ControlPlaneError`` and turned into exit codes by ``cli.main``."""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from .client import ControlPlaneClient
from .errors import NotFoundError
from .table import (
    NONE,
    age_of,
    column_widths,
    format_fields,
    format_row,
    format_table,
    indent,
    labels_text,
    parse_instant,
    size,
)

# How far back each poll of `events --follow` looks again: an event is stamped when it is made
# and may be committed a little later (a reconcile pass writes its events at the end), so a
# poll from exactly the newest instant seen could miss it. Ids already printed are skipped.
FOLLOW_OVERLAP = timedelta(seconds=60)
FOLLOW_PAGE = 500
pause = time.sleep  # between two polls of a follow (replaced in tests)


class Output:
    """Where and how results go: ``table``, ``wide`` or ``json``."""

    def __init__(self, mode: str, stream: TextIO):
        self.mode = mode
        self.stream = stream

    @property
    def json(self) -> bool:
        return self.mode == "json"

    @property
    def wide(self) -> bool:
        return self.mode == "wide"

    def line(self, text: str = "") -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def dump(self, value: Any, *, compact: bool = False) -> None:
        self.line(json.dumps(value, separators=(",", ":")) if compact else json.dumps(value, indent=2))

    def table(self, headers: list[str], rows: list[list[Any]], *, empty: str) -> None:
        if rows:
            self.line(format_table(headers, rows))
        else:
            self.line(empty)


def _now() -> datetime:
    return datetime.now(UTC)


# --- nodes -------------------------------------------------------------------------------


def _node_row(node: dict[str, Any], now: datetime, wide: bool) -> list[Any]:
    row = [
        node["name"],
        node["status"],
        labels_text(node.get("labels")),
        node.get("model_count", 0),
        age_of(node.get("last_heartbeat"), now),
    ]
    if wide:
        row += [
            node["id"],
            node.get("address"),
            node.get("in_flight_total", 0),
            f"{size(node.get('available_vram'))}/{size(node.get('total_vram'))}",
            node.get("worker_api"),
            node.get("drained_by"),
        ]
    return row


NODE_HEADERS = ["NAME", "STATUS", "LABELS", "REPLICAS", "HEARTBEAT"]
NODE_WIDE = ["ID", "ADDRESS", "IN-FLIGHT", "VRAM", "WORKER-API", "DRAINED-BY"]


def nodes(client: ControlPlaneClient, options: argparse.Namespace, out: Output) -> int:
    found = client.list_nodes(status=options.status, label=options.label)
    if out.json:
        out.dump(found)
        return 0
    now = _now()
    headers = NODE_HEADERS + (NODE_WIDE if out.wide else [])
    out.table(headers, [_node_row(node, now, out.wide) for node in found], empty="No nodes found.")
    return 0


def _node_action(verb, done: str):
    def run(client: ControlPlaneClient, options: argparse.Namespace, out: Output) -> int:
        node = client.find_node(options.name)
        answer = verb(client, node["id"])
        if out.json:
            out.dump(answer)
        else:
            out.line(f"node/{answer['name']} {done} (status {answer['status']})")
        return 0

    return run


drain = _node_action(ControlPlaneClient.drain_node, "drained")
resume = _node_action(ControlPlaneClient.resume_node, "resumed")
approve = _node_action(ControlPlaneClient.approve_node, "approved")


def describe_node(client: ControlPlaneClient, options: argparse.Namespace, out: Output) -> int:
    node = client.find_node(options.name)
    replicas = client.list_replicas(node=node["id"])
    recent = _newest(client, options.events, node=node["id"])
    if out.json:
        out.dump({"node": node, "replicas": replicas, "events": recent})
        return 0
    now = _now()
    drained = f" (by {node['drained_by']})" if node.get("drained_by") and node["status"] == "draining" else ""
    worker_api = node.get("worker_api") or NONE
    if node.get("worker_api_detail"):
        worker_api += f" ({node['worker_api_detail']})"
    slots = node.get("max_replicas_per_model")
    if node.get("max_replicas_per_model_manual"):
        slots = f"{slots} (set by an operator; the worker reports {node.get('reported_max_replicas_per_model')})"
    out.line(
        format_fields(
            [
                ("Name", node["name"]),
                ("ID", node["id"]),
                ("Type", node.get("node_type")),
                ("Status", f"{node['status']}{drained}"),
                ("Address", node.get("address")),
                ("HTTP address", node.get("http_address")),
                ("Labels", labels_text(node.get("labels"))),
                ("Auth mode", node.get("auth_mode")),
                ("Worker API", worker_api),
                ("GPU vendor", node.get("gpu_vendor")),
                ("VRAM", _resource(node, "vram", reserved=True)),
                ("RAM", _resource(node, "ram")),
                ("Disk", _resource(node, "disk")),
                ("Replicas per model", slots),
                ("Replica rows", node.get("model_count", 0)),
                ("In flight", node.get("in_flight_total", 0)),
                ("Last heartbeat", _instant_and_age(node.get("last_heartbeat"), now)),
                ("Created", _instant_and_age(node.get("created_at"), now)),
            ]
        )
    )
    out.line("Replicas:")
    rows = [[r["model_name"], r["replica_index"], r["state"], r["in_flight"], r.get("address")] for r in replicas]
    out.line(_block(["MODEL", "INDEX", "STATE", "IN-FLIGHT", "ADDRESS"], rows))
    _events_block(out, recent, now)
    return 0


def _resource(node: dict[str, Any], name: str, *, reserved: bool = False) -> str:
    text = f"{size(node.get('available_' + name))} available of {size(node.get('total_' + name))}"
    if reserved and node.get("reserved_" + name):
        text += f", {size(node['reserved_' + name])} reserved by loads"
    return text


def _instant_and_age(value: str | None, now: datetime) -> str:
    return f"{value} ({age_of(value, now)} ago)" if value else NONE


def _block(headers: list[str], rows: list[list[Any]]) -> str:
    return indent(format_table(headers, rows)) if rows else "  " + NONE


# --- models ------------------------------------------------------------------------------


def conditions_text(conditions: list[dict[str, Any]], *, reasons: bool = False) -> str:
    """The conditions in one cell: ``Available`` when true, ``NotAvailable`` when false, every
    other condition by its type when true (false ones left out); with ``reasons``, each with its
    reason (``NotAvailable(BelowFloor)``)."""
    shown = []
    for condition in conditions or []:
        if condition["type"] == "Available":
            label = "Available" if condition["status"] else "NotAvailable"
        elif condition["status"]:
            label = condition["type"]
        else:
            continue
        shown.append(f"{label}({condition['reason']})" if reasons and condition.get("reason") else label)
    return ",".join(shown) or NONE


def desired_text(model: dict[str, Any]) -> str:
    """``2`` (floor, no ceiling), ``2-4`` (floor and ceiling), ``-`` when not autoscaled."""
    if not model.get("autoscaled"):
        return "-"
    low, high = model.get("min_replicas", 0), model.get("max_replicas", 0)
    return f"{low}-{high}" if high else str(low)


MODEL_HEADERS = ["NAME", "DESIRED", "READY", "CONDITIONS"]
MODEL_WIDE = ["LOADING", "REPLICAS", "LOAD-INFO", "SELECTOR"]


def models(client: ControlPlaneClient, options: argparse.Namespace, out: Output) -> int:
    found = client.list_models(name=options.name)
    if out.json:
        out.dump(found)
        return 0
    rows = []
    for model in found:
        row = [
            model["model_name"],
            desired_text(model),
            model.get("ready_replicas", 0),
            conditions_text(model.get("conditions"), reasons=out.wide),
        ]
        if out.wide:
            row += [
                model.get("loading_replicas", 0),
                model.get("replicas", 0),
                model.get("load_info"),
                labels_text(model.get("node_selector")),
            ]
        rows.append(row)
    out.table(MODEL_HEADERS + (MODEL_WIDE if out.wide else []), rows, empty="No models found.")
    return 0


def describe_model(client: ControlPlaneClient, options: argparse.Namespace, out: Output) -> int:
    model = client.get_model(options.name)
    replicas = client.list_replicas(model=model["model_name"])
    names = _node_names(client, {replica["node_id"] for replica in replicas})
    for replica in replicas:
        replica["node_name"] = names.get(replica["node_id"], "")
    recent = _newest(client, options.events, model=model["model_name"])
    if out.json:
        out.dump({"model": model, "replicas": replicas, "events": recent})
        return 0
    now = _now()
    high = model.get("max_replicas", 0)
    out.line(
        format_fields(
            [
                ("Name", model["model_name"]),
                ("Configured", model.get("configured")),
                ("Autoscaled", model.get("autoscaled")),
                ("Min replicas", model.get("min_replicas", 0)),
                ("Max replicas", f"{high}" if high else "0 (unlimited)"),
                ("Node selector", labels_text(model.get("node_selector"))),
                ("Load info", model.get("load_info") or "none (cannot be scheduled)"),
                ("Ready", model.get("ready_replicas", 0)),
                ("Loading", model.get("loading_replicas", 0)),
                ("Replica rows", model.get("replicas", 0)),
                ("Unsatisfiable until", model.get("unsatisfiable_until")),
            ]
        )
    )
    out.line("Conditions:")
    rows = [
        [c["type"], c["status"], c.get("reason"), age_of(c.get("since"), now), c.get("message")]
        for c in model.get("conditions") or []
    ]
    out.line(_block(["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"], rows))
    out.line("Replicas:")
    rows = [
        [r.get("node_name") or r["node_id"], r["replica_index"], r["state"], r["in_flight"], r.get("address")]
        for r in replicas
    ]
    out.line(_block(["NODE", "INDEX", "STATE", "IN-FLIGHT", "ADDRESS"], rows))
    _events_block(out, recent, now)
    return 0


def _node_names(client: ControlPlaneClient, ids: set[str]) -> dict[str, str]:
    """Names of the nodes with these ids: one call per node for a few, the node list for many
    (a node deleted meanwhile has none)."""
    if len(ids) > 20:
        return {node["id"]: node["name"] for node in client.list_nodes()}
    names = {}
    for node_id in ids:
        try:
            names[node_id] = client.get_node(node_id)["name"]
        except NotFoundError:
            pass
    return names


def scale(client: ControlPlaneClient, options: argparse.Namespace, out: Output) -> int:
    config = client.scale(options.name, min_replicas=options.min_replicas, max_replicas=options.max_replicas)
    if out.json:
        out.dump(config)
    else:
        high = config["max_replicas"] or "unlimited"
        out.line(f"model/{config['model_name']} scaled (min {config['min_replicas']}, max {high})")
    return 0


# --- events ------------------------------------------------------------------------------


EVENT_HEADERS = ["AGE", "KIND", "MODEL", "NODE", "MESSAGE"]
EVENT_WIDE = ["TIME", "ID"]


def _event_row(event: dict[str, Any], now: datetime, wide: bool) -> list[Any]:
    row = [
        age_of(event.get("created_at"), now),
        event["kind"],
        event.get("model_name"),
        event.get("node_name"),
        event.get("message"),
    ]
    if wide:
        row += [event.get("created_at"), event["id"]]
    return row


def _newest(client: ControlPlaneClient, limit: int, **filters: Any) -> list[dict[str, Any]]:
    """The newest ``limit`` events matching ``filters``, oldest first."""
    if limit <= 0:
        return []
    return list(reversed(client.list_events(limit=limit, **filters)))


def _events_block(out: Output, recent: list[dict[str, Any]], now: datetime) -> None:
    out.line("Events:")
    rows = [[age_of(e.get("created_at"), now), e["kind"], e.get("node_name"), e.get("message")] for e in recent]
    out.line(_block(["AGE", "KIND", "NODE", "MESSAGE"], rows))


def events(client: ControlPlaneClient, options: argparse.Namespace, out: Output) -> int:
    filters: dict[str, Any] = {"model": options.model, "kind": options.kind}
    if options.node:
        filters["node"] = client.find_node(options.node)["id"]
    limit = min(options.limit, 1000)
    # A follow reads up to a whole page (newest first) in the same request: what it does not
    # show but would find again in its first window counts as seen, not as new.
    newest = client.list_events(limit=1000 if options.follow else limit, **filters)
    shown = list(reversed(newest[:limit]))
    headers = EVENT_HEADERS + (EVENT_WIDE if out.wide else [])
    now = _now()
    rows = [_event_row(event, now, out.wide) for event in shown]
    if out.json and not options.follow:
        out.dump(shown)
        return 0
    if out.json:
        for event in shown:
            out.dump(event, compact=True)
    elif rows or options.follow:
        out.line(format_table(headers, rows))
    else:
        out.line("No events found.")
    if not options.follow:
        return 0
    try:
        _follow(client, options, out, filters, newest, column_widths(headers, rows))
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a follow ends
    return 0


def _window(client: ControlPlaneClient, since: datetime | None, filters: dict[str, Any]) -> list[dict[str, Any]]:
    """Every event created at or after ``since`` (every event: None), oldest first, page by page."""
    found: dict[Any, dict[str, Any]] = {}
    while True:
        after = None if since is None else since.isoformat()
        page = client.list_events(since=after, oldest_first=True, limit=FOLLOW_PAGE, **filters)
        found.update((event["id"], event) for event in page)
        last = parse_instant(page[-1]["created_at"]) if page else None
        if len(page) < FOLLOW_PAGE or last == since:
            break
        since = last  # more in the window: on from the last one read (ids already read are kept once)
    return sorted(found.values(), key=lambda event: (parse_instant(event["created_at"]), event["id"]))


def _follow(client, options, out: Output, filters, known: list[dict[str, Any]], widths) -> None:
    """Poll every ``options.interval`` seconds for the events created since the newest one
    known, less ``FOLLOW_OVERLAP`` (one committed late may be stamped before it), and print
    those not known yet, oldest first."""
    seen = {event["id"]: parse_instant(event["created_at"]) for event in known}
    cursor = max(seen.values(), default=None)
    while True:
        pause(options.interval)
        fresh = _window(client, None if cursor is None else cursor - FOLLOW_OVERLAP, filters)
        now = _now()
        for event in fresh:
            if event["id"] in seen:
                continue
            created = parse_instant(event["created_at"])
            seen[event["id"]] = created
            cursor = created if cursor is None else max(cursor, created)
            if out.json:
                out.dump(event, compact=True)
            else:
                out.line(format_row(_event_row(event, now, out.wide), widths))
        if cursor is not None:
            horizon = cursor - 2 * FOLLOW_OVERLAP  # older than any later window: forgotten
            seen = {key: created for key, created in seen.items() if created >= horizon}


# --- reconcile ---------------------------------------------------------------------------


def reconcile(client: ControlPlaneClient, options: argparse.Namespace, out: Output) -> int:
    summary = client.reconcile()
    if out.json:
        out.dump(summary)
        return 0
    counts = ", ".join(f"{name} {count}" for name, count in sorted((summary.get("actions") or {}).items()) if count)
    skipped = ", ".join(f"{name} {count}" for name, count in sorted((summary.get("skipped") or {}).items()) if count)
    out.line(
        format_fields(
            [
                ("Outcome", summary.get("outcome") + (f" ({summary['reason']})" if summary.get("reason") else "")),
                ("Started", summary.get("started_at")),
                ("Duration", f"{summary.get('duration_s', 0):.3f}s"),
                ("Nodes", summary.get("nodes")),
                ("Models planned", summary.get("models")),
                ("Models known", summary.get("known_models")),
                ("Actions", counts),
                ("Skipped", skipped),
                ("Holder", summary.get("holder")),
            ]
        )
    )
    return 0
