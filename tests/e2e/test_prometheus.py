"""A real Prometheus (Debian's ``prometheus`` binary) scrapes the control plane and evaluates the
shipped rules (deploy/prometheus/controlplane.rules.yml).

The host runs as ``make run`` runs it: gunicorn with two worker processes and a qcluster (its
leader process runs the passes, its worker process the cold load), all writing their metrics
to one ``PROMETHEUS_MULTIPROC_DIR``; Prometheus scrapes the web port every second, as one
target. The checks: what Prometheus stores is the sum over every process's file (each gunicorn
worker's requests, read from its own file, add up to what was sent; the qcluster's passes and
load job), the fleet gauges and the recording rules have the fleet's values, and every shipped
rule evaluates without error.
"""

import json
import shutil
import signal
import tempfile
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.harness import ROOT, fast_settings, wait_for
from tests.e2e.test_qcluster_leader import parent_of
from tests.processes import free_port
from tests.tools import binary

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

RULES = ROOT / "deploy" / "prometheus" / "controlplane.rules.yml"


class Prometheus:
    def __init__(self, fleet, executable: str, rules: Path):
        self.port = free_port()
        directory = fleet.workdir / "prometheus-server"
        directory.mkdir()
        config = directory / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{
                "job_name": "controlplane",
                "static_configs": [{"targets": [f"127.0.0.1:{fleet.web_port}"]}],
            }],
        }))
        self.process = fleet.spawn("prometheus", [
            executable, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
        ])
        wait_for(self._ready, timeout=60, what="prometheus ready")

    def _get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
            return json.loads(response.read()) if response.headers.get_content_type() == "application/json" else None

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> dict[str, float]:
        """Instant query: {labels as text: value}."""
        body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert body["status"] == "success", body
        return {
            ",".join(f"{k}={v}" for k, v in sorted(item["metric"].items())): float(item["value"][1])
            for item in body["data"]["result"]
        }

    def scalar(self, expr: str) -> float | None:
        values = list(self.query(expr).values())
        assert len(values) <= 1, (expr, values)
        return values[0] if values else None

    def rules(self) -> list[dict]:
        body = self._get("/api/v1/rules")
        return [rule for group in body["data"]["groups"] for rule in group["rules"]]


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and parent_of(int(entry.name)) == pid:
            found.append(int(entry.name))
    return found


def counted_by_process(multiproc: Path, pid: int, name: str, **labels) -> float:
    """``name{labels}`` as counted by process ``pid`` alone: its own counter file, read by
    prometheus-client's multiprocess collector on a directory holding only that file."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    source = multiproc / f"counter_{pid}.db"
    if not source.exists():
        return 0.0
    with tempfile.TemporaryDirectory() as alone:
        shutil.copy(source, alone)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=alone)
        return registry.get_sample_value(name, labels) or 0.0


def test_prometheus_scrapes_two_gunicorn_workers_and_a_qcluster_summed(fleet, report):
    executable = binary("prometheus", "prometheus")
    multiproc = fleet.workdir / "multiproc"
    multiproc.mkdir()
    fleet.settings_env.update(fast_settings(PROMETHEUS_MULTIPROC_DIR=str(multiproc), Q_WORKERS="1"))
    web = fleet.start_web(workers=2)
    fleet.start_worker("prom-a", slots=2)
    fleet.wait_nodes({"prom-a"})
    qcluster = fleet.start_qcluster()
    prometheus = Prometheus(fleet, executable, RULES)

    # a cold load through the qcluster's worker process, a floor kept by its leader's passes
    cold = {"backend_type": "echo", "model_options": {"Model": "prom-cold"}}
    status, body = fleet.api("POST", "/api/v1/models/prom-cold/route", {**cold, "wait_seconds": 30})
    assert status in (200, 202), body
    fleet.set_floor("prom-floor", 1)
    fleet.wait_converged("prom-floor", 1, 60)

    # requests spread over both gunicorn workers (a fresh connection each, 8 at a time)
    workers = children(web.popen.pid)
    assert len(workers) == 2, workers

    def per_worker() -> dict[int, float]:
        return {pid: counted_by_process(multiproc, pid, "controlplane_http_requests_total",
                                        route="model-detail", method="GET", status="4xx") for pid in workers}

    sent = 0
    with ThreadPoolExecutor(8) as pool:
        for _ in range(10):
            statuses = list(pool.map(lambda _: fleet.api("GET", "/api/v1/models/prom-missing")[0], range(40)))
            assert statuses == [404] * 40
            sent += 40
            if all(per_worker().values()):
                break
    counts = per_worker()
    assert all(counts.values()) and sum(counts.values()) == sent, (counts, sent)

    def stored(expr, expected):
        return lambda: prometheus.scalar(expr) == expected

    requests = 'sum(controlplane_http_requests_total{route="model-detail",status="4xx"})'
    wait_for(stored(requests, sent), timeout=20, what=f"prometheus: {sent} requests, summed over both workers")

    # the qcluster's processes: the cold load (its worker process) and the passes (its leader)
    wait_for(stored('sum(controlplane_load_jobs_total{event="succeeded"})', 1.0), timeout=20,
             what="prometheus: the load job counted by the qcluster's worker process")
    assert fleet.stop(qcluster, signal.SIGTERM, timeout=20) == 0
    (ok_passes,) = fleet.sql("SELECT count(*) FROM reconciler_reconcilepass WHERE outcome = 'ok'")[0]
    passes = 'sum(controlplane_reconcile_passes_total{outcome="ok"})'
    wait_for(stored(passes, float(ok_passes)), timeout=20,
             what=f"prometheus: the {ok_passes} passes of the stopped qcluster's leader")
    assert prometheus.scalar("sum(controlplane_grpc_calls_total)") > 0

    # fleet gauges (read from the database at scrape time) and the recording rules
    assert prometheus.scalar('controlplane:nodes:max{status="healthy"}') == 1
    assert prometheus.scalar('controlplane:model_replicas_desired:max{model="prom-floor"}') == 1
    assert prometheus.scalar('controlplane:model_replicas_ready:max{model="prom-floor"}') == 1
    assert prometheus.scalar("controlplane:reconcile_last_success:age_seconds") < 60
    # the route name the rules use is real; a recording rule needs two scrapes of the series
    # and one rule evaluation after them, so it is waited for, not read once
    wait_for(
        lambda: (prometheus.scalar("controlplane:heartbeats:rate5m") or 0) > 0,
        timeout=30,
        what="prometheus: controlplane:heartbeats:rate5m above 0",
    )
    wait_for(
        lambda: (prometheus.scalar("controlplane:heartbeat_duration_seconds:p99_5m") or 0) > 0,
        timeout=30,
        what="prometheus: controlplane:heartbeat_duration_seconds:p99_5m above 0",
    )
    wait_for(lambda: prometheus.scalar("controlplane:reconcile_passes:rate5m") is not None, timeout=20,
             what="a recorded pass rate")

    # every shipped rule loaded and evaluated cleanly; nothing fires on this healthy fleet
    rules = prometheus.rules()
    assert len(rules) == RULES.read_text().count("- record:") + RULES.read_text().count("- alert:")
    assert [r["name"] for r in rules if r["health"] != "ok"] == [], [r.get("lastError") for r in rules]
    firing = [r["name"] for r in rules if r.get("type") == "alerting" and r["state"] == "firing"]
    assert firing == [], firing
    report(
        f"e2e prometheus: {sent} requests counted by 2 gunicorn workers ({sorted(counts.values())}) "
        f"and {ok_passes} passes by the qcluster's leader, stored summed by a real Prometheus "
        f"({len(rules)} rules loaded and healthy)"
    )
