"""/metrics: the series after API requests and a reconcile pass, bounded labels, access rules,
the scrape-time fleet gauges' constant query count, and multiprocess mode."""

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from controlplane.metrics import FleetCollector
from core.metrics import observe_grpc_call
from reconciler.reconcile import reconcile_once
from registry.models import ModelLoadInfo, Node
from tests.factories import make_api_key, make_node, make_replica, make_scheduling
from tests.ops.helpers import value
from tests.reconciler.fakes import FakeProber, FakeScheduler
from tests.router.conftest import options_blob

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parents[2]


def scrape(client, **extra) -> str:
    response = client.get("/metrics", REMOTE_ADDR="127.0.0.1", **extra)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    return response.content.decode()


def test_it_counts_api_requests_by_route_name_not_path(client):
    _, secret = make_api_key("operator")
    auth = {"HTTP_AUTHORIZATION": f"Bearer {secret}"}
    before = (
        value(scrape(client), "controlplane_http_requests_total", route="model-detail", method="GET", status="4xx") or 0
    )
    client.get("/api/v1/models/some-model-a", **auth)
    client.get("/api/v1/models/some-model-b", **auth)
    client.get("/api/v1/nodes", **auth)
    text = scrape(client)
    assert (
        value(text, "controlplane_http_requests_total", route="model-detail", method="GET", status="4xx") == before + 2
    )
    assert value(text, "controlplane_http_requests_total", route="node-list", method="GET", status="2xx") >= 1
    assert value(text, "controlplane_http_request_duration_seconds_count", route="node-list", method="GET") >= 1
    # no raw path, model name or node id ever becomes a label value
    assert "some-model-a" not in text


def test_unknown_paths_and_methods_collapse_into_bounded_labels(client):
    client.get("/no/such/path/123")
    client.generic("BREW", "/livez")
    text = scrape(client)
    assert value(text, "controlplane_http_requests_total", route="unmatched", method="GET", status="4xx") >= 1
    assert value(text, "controlplane_http_requests_total", route="livez", method="other", status="2xx") >= 1
    assert 'method="BREW"' not in text
    assert "/no/such/path" not in text


def test_fleet_gauges_and_reconcile_series_after_a_pass(client):
    now = timezone.now()
    for name in ("ops-a", "ops-b"):
        make_node(name=name, slots=2, now=now)
    make_node(name="ops-gone", status=Node.Status.OFFLINE, now=now - timedelta(hours=1))
    make_scheduling("ops-model", min_replicas=2)
    ModelLoadInfo.objects.upsert("ops-model", "echo", options_blob("ops-model"))
    before = value(scrape(client), "controlplane_reconcile_passes_total", outcome="ok") or 0

    summary = reconcile_once(now=now, scheduler=FakeScheduler(), prober=FakeProber())

    assert summary.outcome == "ok", summary.reason
    text = scrape(client)
    assert value(text, "controlplane_reconcile_passes_total", outcome="ok") == before + 1
    assert value(text, "controlplane_reconcile_pass_duration_seconds_count") >= 1
    assert value(text, "controlplane_reconcile_actions_total", action="replicas_added") >= 2
    assert value(text, "controlplane_reconcile_last_success_timestamp_seconds") == pytest.approx(
        now.timestamp(), abs=60
    )
    assert value(text, "controlplane_model_replicas_desired", model="ops-model") == 2
    assert value(text, "controlplane_model_replicas_ready", model="ops-model") == 2
    assert value(text, "controlplane_nodes", status="healthy") == 2
    assert value(text, "controlplane_nodes", status="offline") == 1
    assert value(text, "controlplane_node_heartbeat_age_seconds_count") == 2
    assert value(text, "controlplane_node_heartbeat_age_max_seconds") < 60
    assert value(text, "controlplane_fleet_metrics_up") == 1


def test_what_a_pass_left_undone_is_counted_by_reason(client):
    make_node(name="ops-skip", slots=2, now=timezone.now())
    make_scheduling("ops-model-without-recipe", min_replicas=1)  # no ModelLoadInfo: nothing to load
    before = value(scrape(client), "controlplane_reconcile_skipped_total", reason="no_load_info") or 0

    summary = reconcile_once(scheduler=FakeScheduler(), prober=FakeProber())

    assert summary.skipped["no_load_info"] >= 1, summary
    text = scrape(client)
    assert value(text, "controlplane_reconcile_skipped_total", reason="no_load_info") == (
        before + summary.skipped["no_load_info"]
    )


def test_per_model_gauges_only_for_configured_models(client):
    node = make_node(name="ops-c")
    make_replica(node, "unconfigured-model")
    text = scrape(client)
    assert "unconfigured-model" not in text


def test_fleet_gauges_take_a_constant_number_of_queries(django_assert_num_queries):
    for index in range(6):
        node = make_node(name=f"ops-q{index}", slots=4)
        make_scheduling(f"ops-q-model-{index}", min_replicas=1)
        make_replica(node, f"ops-q-model-{index}")
    with django_assert_num_queries(5):
        families = list(FleetCollector().collect())
    assert any(family.name == "controlplane_model_replicas_ready" for family in families)


def test_grpc_calls_are_counted_through_the_proto_client_hook(client):
    from proto import client as grpc_client

    assert grpc_client.call_observer is observe_grpc_call
    result = grpc_client.probe("127.0.0.1:1", timeout=0.5)
    assert result.outcome.name == "UNREACHABLE"
    text = scrape(client)
    assert value(text, "controlplane_grpc_calls_total", method="/backend.Backend/Health", code="UNAVAILABLE") >= 1


def test_metrics_refuse_other_addresses_without_an_operator_key(client, settings):
    settings.METRICS_ALLOW = "127.0.0.0/8"
    denied = client.get("/metrics", REMOTE_ADDR="10.1.2.3")
    assert denied.status_code == 403
    assert denied["Content-Type"] == "application/problem+json"
    assert denied.json()["code"] == "metrics_forbidden"
    _, frontend = make_api_key("frontend")
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3", HTTP_AUTHORIZATION=f"Bearer {frontend}").status_code == 403
    _, operator = make_api_key("operator")
    allowed = client.get("/metrics", REMOTE_ADDR="10.1.2.3", HTTP_AUTHORIZATION=f"Bearer {operator}")
    assert allowed.status_code == 200
    settings.METRICS_ALLOW = "10.0.0.0/8"
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 200


def test_operational_paths_are_not_in_the_openapi_schema(client):
    schema = client.get("/api/schema/?format=json").json()
    assert not {"/metrics", "/livez", "/readyz"} & set(schema["paths"])


_CHILD = """
import django, os, sys
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
django.setup()
from controlplane import metrics
from core.metrics import observe_eviction, observe_load_job
if sys.argv[1] == "count":
    observe_load_job("started")
    observe_eviction()
else:
    from prometheus_client import generate_latest
    sys.stdout.write(generate_latest(metrics.scrape_registry()).decode())
"""


def test_multiprocess_mode_sums_every_process(tmp_path):
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        "CONTROLPLANE_VAR_DIR": str(tmp_path / "var"),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'unmigrated.sqlite3'}",
    }
    for _ in range(2):
        subprocess.run([sys.executable, "-c", _CHILD, "count"], cwd=ROOT, env=env, check=True, timeout=60)
    assert len(list(multiproc.glob("*.db"))) >= 2  # one file per process
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, "scrape"],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
    )
    text = result.stdout
    assert value(text, "controlplane_load_jobs_total", event="started") == 2
    assert value(text, "controlplane_evictions_total") == 2
    # the fleet gauges degrade (no tables in that database) instead of failing the scrape
    assert value(text, "controlplane_fleet_metrics_up") == 0


def test_gunicorn_child_exit_marks_the_process_dead(tmp_path, monkeypatch):
    import runpy

    calls = []
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr("prometheus_client.multiprocess.mark_process_dead", lambda pid: calls.append(pid))
    config = runpy.run_path(str(ROOT / "controlplane" / "gunicorn.conf.py"))
    config["child_exit"](None, type("Worker", (), {"pid": 4242})())
    assert calls == [4242]
    assert config["wsgi_app"] == "controlplane.wsgi"
