"""The shipped monitoring artefacts (deploy/prometheus, deploy/grafana) agree with the code.

Every series a rule or a dashboard panel reads is one the control plane exports (the counters
and histograms of ``core.metrics``, the scrape-time gauges of ``controlplane.metrics``) or one
the rules record; every alert carries a summary, a description and a runbook line, has a unit
test that fires it (``promtool test rules``, run by ``make check``) and is in the operations
guide. promtool's own checks and the real Prometheus are ``scripts/check_monitoring`` and
``tests/e2e/test_prometheus.py``.
"""

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from controlplane.metrics import FleetCollector

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "controlplane.rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "controlplane.rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "controlplane-fleet.json"
SERIES = re.compile(r"\bcontrolplane[_:][A-Za-z0-9_:]*")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def alerts() -> list[dict]:
    return [rule for rule in rules() if "alert" in rule]


def exported_series() -> set[str]:
    """Every series name the control plane exports: its in-process metrics and the fleet gauges."""
    families = [f for f in REGISTRY.collect() if f.name.startswith("controlplane_")]
    families += list(FleetCollector().collect())
    return {family.name + suffix for family in families for suffix in SUFFIXES[family.type]}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs += [variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable]
    return exprs


@pytest.mark.django_db
def test_rules_and_dashboard_read_only_series_that_exist():
    exported = exported_series()
    assert "controlplane_reconcile_skipped_total" in exported and "controlplane_nodes" in exported
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    for where, exprs in (("rules", [rule["expr"] for rule in rules()]), ("dashboard", dashboard_exprs())):
        used = {name for expr in exprs for name in SERIES.findall(expr)}
        assert used, where
        unknown = used - exported - recorded
        assert not unknown, f"{where} read series nobody exports or records: {sorted(unknown)}"
    # the dashboard reads what the rules record (and the rules are not dead weight)
    dashboard_uses = {name for expr in dashboard_exprs() for name in SERIES.findall(expr)}
    unused = {name for name in recorded if name not in dashboard_uses and not any(
        name in rule["expr"] for rule in rules())}
    assert not unused, f"recorded but read by no alert and no panel: {sorted(unused)}"


def test_every_alert_has_a_runbook_line_and_a_test_that_fires_it():
    tested = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {case["alertname"] for test in tested for case in test.get("alert_rule_test", []) if case["exp_alerts"]}
    quiet = {case["alertname"] for test in tested for case in test.get("alert_rule_test", []) if not case["exp_alerts"]}
    operations = (ROOT / "docs" / "operations.md").read_text()
    names = [alert["alert"] for alert in alerts()]
    assert len(names) == len(set(names)) >= 6
    for alert in alerts():
        name = alert["alert"]
        annotations = alert["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations), name
        assert alert["labels"]["severity"] in ("warning", "critical"), name
        assert name in fired and name in quiet, f"{name}: promtool test must show it firing and quiet"
        assert f"`{name}`" in operations, f"{name} is not in docs/operations.md"


def test_the_dashboard_is_importable_grafana_json():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]  # chosen at import
        assert panel["targets"] and all(target["expr"].strip() for target in panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
