"""Two web machines behind nginx (Debian's package), as deploy/nginx/controlplane.conf ships it.

The shipped file is what runs: the test copies it, substitutes its example addresses and
listen ports with loopback ports (each substitution must match exactly once, so an edit of the
shipped addresses fails here instead of silently testing something else) and wraps it in a
minimal main configuration (pid, logs and temporary files in the test's directory, ``daemon
off``, an access log that records each request's upstream attempts).

Two "machines": two gunicorn processes with the shipped server configuration, each with its own
port, ``CONTROLPLANE_VAR_DIR`` and metrics directory, one database, one shared
``DJANGO_SECRET_KEY`` (as README "Production" says). Workers register and heartbeat (every
second) through nginx, two frontends route through it (``cpclient``, no retries inside a call,
one call every 0.1 s each), and a reconcile loop keeps a model at two replicas. Then one web
process is SIGKILLed mid-traffic, stays down longer than nginx's ``fail_timeout`` (so nginx
tries it again while it is dead), and is started again.

Measured, and asserted:

* heartbeats, from nginx's access log (every heartbeat that reached nginx, with each upstream
  it tried): no node has two failed heartbeats in a row (the worker's next tick is the retry);
  in practice none fails, since nginx passes a heartbeat whose web process died to the other
  one (``non_idempotent`` on the heartbeat location);
* routes, from each frontend's own record of its calls: no frontend sees two failed route
  calls in a row, i.e. every failed call succeeds when retried once; and from nginx's log,
  every failed route call is one that was in flight on the killed process at the kill (nginx's
  503 ``upstream_unavailable`` after an attempt that failed with no answer);
* the model's replica rows are the same rows (ids) after the kill as before, all loaded;
* the killed machine comes back: nginx sends it requests again, answered 200.
"""

import os
import re
import signal
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass

import pytest

from tests.e2e.harness import ROOT, Fleet, Process, Traffic, fast_settings, wait_for
from tests.processes import free_port
from tests.tools import binary

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

SHIPPED = ROOT / "deploy" / "nginx" / "controlplane.conf"
# The example addresses of the shipped file and what the test puts in their place.
WEB_UPSTREAMS = ("10.0.0.11:8000", "10.0.0.12:8000")
GATEWAY_UPSTREAMS = ("10.0.0.11:8080", "10.0.0.12:8080")
ACCESS_FORMAT = "$msec $request_method $uri $status [$upstream_addr] [$upstream_status]"
ACCESS_LINE = re.compile(r"^(\S+) (\S+) (\S+) (\d+) \[([^\]]*)\] \[([^\]]*)\]$")


def substitute(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert text.count(old) == 1, f"{SHIPPED.name}: expected {old!r} exactly once"
        text = text.replace(old, new)
    return text


class Nginx:
    """The shipped configuration, ports substituted, run by the ``nginx`` binary in the
    foreground on a throwaway prefix."""

    def __init__(self, fleet: Fleet, web_ports: tuple[int, int], gateway_ports: tuple[int, int]):
        executable = binary("nginx", "nginx")
        self.prefix = fleet.workdir / "nginx"
        self.prefix.mkdir()
        self.port, self.gateway_port = free_port(), free_port()
        site = substitute(SHIPPED.read_text(), {
            **{f"server {old} ": f"server 127.0.0.1:{port} " for old, port in zip(WEB_UPSTREAMS, web_ports, strict=True)},
            **{f"server {old} ": f"server 127.0.0.1:{port} "
               for old, port in zip(GATEWAY_UPSTREAMS, gateway_ports, strict=True)},
            "listen 80;": f"listen 127.0.0.1:{self.port};",
            "listen 8080;": f"listen 127.0.0.1:{self.gateway_port};",
        })
        (self.prefix / "controlplane.conf").write_text(site)
        self.access_log = self.prefix / "access.log"
        temp = "\n".join(f"    {kind}_temp_path {self.prefix / kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        # As root (CI), nginx's workers would switch to `nobody`, who cannot enter pytest's
        # private temporary directory: keep them as the user running the test.
        user = "user root root;\n" if os.getuid() == 0 else ""
        (self.prefix / "nginx.conf").write_text(
            f"{user}daemon off;\nworker_processes 1;\npid {self.prefix / 'nginx.pid'};\n"
            f"error_log {self.prefix / 'error.log'} warn;\n"
            "events { worker_connections 512; }\n"
            "http {\n"
            f"    log_format upstreams '{ACCESS_FORMAT}';\n"
            f"    access_log {self.access_log} upstreams;\n"
            f"{temp}\n"
            f"    include {self.prefix / 'controlplane.conf'};\n"
            "}\n"
        )
        argv = [executable, "-p", str(self.prefix), "-e", str(self.prefix / "error.log"),
                "-c", str(self.prefix / "nginx.conf")]
        import subprocess

        checked = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr
        self.process = fleet.spawn("nginx", argv)
        wait_for(self._listening, timeout=20, what="nginx listening")

    def _listening(self) -> bool:
        assert self.process.alive(), (self.prefix / "error.log").read_text()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.port}/livez", timeout=2).close()
            return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def requests(self) -> list[dict]:
        """The access log: one dict per request, ``attempts`` the upstreams tried in order as
        (address, status) pairs (status ``502`` for an attempt whose connection failed)."""
        entries = []
        for line in self.access_log.read_text().splitlines():
            match = ACCESS_LINE.match(line)
            assert match, line
            at, method, uri, status, addresses, statuses = match.groups()
            addresses = [a.strip() for a in addresses.split(",")] if addresses not in ("", "-") else []
            statuses = [s.strip() for s in statuses.split(",")] if statuses not in ("", "-") else []
            entries.append({"at": float(at), "method": method, "uri": uri, "status": int(status),
                            "attempts": list(zip(addresses, statuses, strict=False))})
        return entries


@dataclass
class Machine:
    """One web machine: its own port, var directory and metrics directory."""

    name: str
    port: int
    env: dict
    process: Process | None = None

    def start(self, fleet: Fleet) -> None:
        self.process = fleet.spawn(self.name, Fleet.web_command(self.port, workers=1), **self.env)

        def answers():
            assert self.process.alive(), self.process.log()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/livez", timeout=2).close()
                return True
            except OSError:
                return False

        wait_for(answers, timeout=30, what=f"{self.name} up")


def two_machines(fleet: Fleet) -> tuple[Machine, Machine]:
    secret = "lb-secret-" + uuid.uuid4().hex
    machines = []
    for name in ("web-a", "web-b"):
        var = fleet.workdir / f"{name}-var"
        (var / "prometheus").mkdir(parents=True)
        machines.append(Machine(name, free_port(), {
            "CONTROLPLANE_VAR_DIR": str(var), "PROMETHEUS_MULTIPROC_DIR": str(var / "prometheus"),
            "DJANGO_SECRET_KEY": secret,
        }))
    return machines[0], machines[1]


def failed_twice_in_a_row(outcomes: list[bool]) -> bool:
    return any(not a and not b for a, b in zip(outcomes, outcomes[1:], strict=False))


def test_a_sigkilled_web_machine_behind_nginx_costs_no_heartbeat_and_no_route_fails_twice(fleet, report):
    fleet.settings_env.update(fast_settings(CONTROLPLANE_LOAD_JOB_RUNNER="thread"))
    web_a, web_b = two_machines(fleet)
    for machine in (web_a, web_b):
        machine.start(fleet)
    nginx = Nginx(fleet, (web_a.port, web_b.port), (free_port(), free_port()))
    fleet.web_port = nginx.port  # workers and frontends reach the control plane through nginx only

    for name in ("lb-1", "lb-2"):
        fleet.start_worker(name, slots=2, heartbeat=1.0)
    fleet.wait_nodes({"lb-1", "lb-2"})
    fleet.start_reconciler(1.0)
    fleet.set_floor("lb-echo", 2)
    fleet.wait_converged("lb-echo", 2, 60)
    replicas_before = {row["id"] for row in fleet.replica_rows("lb-echo")}

    frontends = [Traffic(fleet, "lb-echo", period=0.1, probe=False) for _ in range(2)]
    for frontend in frontends:
        frontend.start()
    time.sleep(4)
    killed_at = time.time()
    fleet.stop(web_a.process, signal.SIGKILL)
    time.sleep(8)  # past the upstream's fail_timeout (5 s): nginx tries the dead machine again
    restarted_at = time.time()
    web_a.start(fleet)
    time.sleep(4)
    for frontend in frontends:
        frontend.stop()
    ended_at = time.time()

    entries = nginx.requests()
    address_a, address_b = f"127.0.0.1:{web_a.port}", f"127.0.0.1:{web_b.port}"

    # heartbeats: per node, in the order nginx logged them
    heartbeats: dict[str, list[dict]] = {}
    for entry in entries:
        if entry["method"] == "POST" and entry["uri"].endswith("/heartbeat"):
            heartbeats.setdefault(entry["uri"], []).append(entry)
    assert len(heartbeats) == 2, heartbeats.keys()
    during = [e for beats in heartbeats.values() for e in beats if killed_at <= e["at"] <= ended_at]
    failed_heartbeats = [e for e in during if e["status"] != 200]
    retried_heartbeats = [e for e in during if len(e["attempts"]) > 1]
    for uri, beats in heartbeats.items():
        assert not failed_twice_in_a_row([e["status"] == 200 for e in beats]), (uri, beats)
    assert len(during) >= 2 * 10, len(during)  # both workers kept heartbeating through it

    # routes: each frontend's own record
    route_failures = []
    for frontend in frontends:
        outcomes = [status == 200 for _, status, *_ in frontend.records]
        assert not failed_twice_in_a_row(outcomes), frontend.records
        route_failures += [status for _, status, *_ in frontend.records if status != 200]
    routes = sum(len(frontend.records) for frontend in frontends)
    assert routes > 100, routes
    retried_routes = [e for e in entries if e["uri"].endswith("/route") and len(e["attempts"]) > 1]
    # a failed route call is one the killed process had taken: nginx's 503 upstream_unavailable
    # after its attempt on web-a failed (upstream status 502), at the kill
    failed_routes = [e for e in entries if e["uri"].endswith("/route") and e["status"] != 200]
    assert len(failed_routes) == len(route_failures), (failed_routes, route_failures)
    assert all(e["status"] == 503 and e["attempts"] == [(address_a, "502")] and abs(e["at"] - killed_at) < 2
               for e in failed_routes), failed_routes

    # both machines served before the kill; nginx tried the dead one (and went on to the live
    # one) while it was down; the machine that came back serves again
    served = {address: [e for e in entries if e["attempts"] and e["attempts"][-1] == (address, "200")]
              for address in (address_a, address_b)}
    assert any(e["at"] < killed_at for e in served[address_a]) and served[address_b]
    tried_dead = [e for e in entries if killed_at <= e["at"] < restarted_at
                  and any(address == address_a for address, _ in e["attempts"])]
    assert tried_dead, "nginx never tried the dead machine"
    assert all(e["attempts"][-1][0] == address_b for e in tried_dead if e["status"] == 200)
    wait_for(lambda: any(e["at"] > restarted_at and e["attempts"] and e["attempts"][-1] == (address_a, "200")
                         for e in nginx.requests()), timeout=20, what="web-a answering through nginx again")

    # the model's replicas stayed: the rows from before the kill are all there, loaded (the
    # traffic may have added one above the floor), nodes healthy throughout
    rows = {row["id"]: row for row in fleet.replica_rows("lb-echo")}
    assert replicas_before <= rows.keys(), rows
    assert all(rows[replica]["state"] == "loaded" for replica in replicas_before), rows
    assert {node["status"] for node in fleet.nodes().values()} == {"healthy"}
    assert fleet.events("node_offline") == [] and fleet.events("replica_removed") == []

    # nginx's own answers are problem documents; /metrics is not served through it
    status, body = _raw(f"http://127.0.0.1:{nginx.port}/metrics")
    assert status == 404
    status, body = _raw(f"http://127.0.0.1:{nginx.port}/api/v1/models/x/route", data=b"x" * (3 * 1024 * 1024))
    assert status == 413 and b'"code": "payload_too_large"' in body, (status, body[:300])

    report(
        f"e2e nginx: web-a SIGKILLed for {restarted_at - killed_at:.1f}s under traffic: "
        f"{len(during)} heartbeats through nginx, {len(failed_heartbeats)} failed, "
        f"{len(retried_heartbeats)} passed on to web-b by nginx; {routes} route calls, "
        f"{len(route_failures)} failed (nginx's 503 upstream_unavailable: in flight on web-a when it was killed), "
        "none twice in a row, "
        f"{len(retried_routes)} passed on by nginx; {len(tried_dead)} requests tried the dead machine first"
    )


def _raw(url: str, data: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()



def test_the_gateway_streams_through_nginx_unbuffered_past_a_dead_gateway(fleet, report):
    """The shipped gateway server: one of its two upstreams is a gateway, the other a port
    nothing listens on (a dead gateway machine). A streamed completion of 40 tokens at 20 per
    second (two seconds) comes through nginx chunk by chunk: its first token arrives well before
    the stream ends, and every request reaches the live gateway (a refused connection is passed
    on, not answered 502). Two things keep nginx from buffering a stream: the shipped
    ``proxy_buffering off`` and the gateway's own ``X-Accel-Buffering: no`` header on every
    stream; either suffices (with ``proxy_buffering on`` this test passes too), so this shows
    the shipped pair streams, not which one does it."""
    import openai

    fleet.settings_env.update(fast_settings(CONTROLPLANE_LOAD_JOB_RUNNER="thread"))
    fleet.start_web(workers=1)
    fleet.start_worker("lb-gw", slots=1)
    fleet.wait_nodes({"lb-gw"})
    fleet.start_reconciler(1.0)
    slow = {"backend_type": "echo", "model_options": {"Model": "lb-slow", "Options": ["echo.tokens_per_second=20"]}}
    status, body = fleet.api("PUT", "/api/v1/models/lb-slow/load-info", slow)
    assert status in (200, 201), body
    status, body = fleet.api("PUT", "/api/v1/models/lb-slow/scheduling",
                             {"min_replicas": 1, "max_replicas": 0, "node_selector": {}})
    assert status in (200, 201), body
    fleet.wait_converged("lb-slow", 1, 60)
    web_port = fleet.web_port
    fleet.start_gateway()
    nginx = Nginx(fleet, (web_port, free_port()), (fleet.gateway_port, free_port()))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{nginx.gateway_port}/v1", api_key=fleet.api_key,
                           max_retries=0, timeout=60)

    words = " ".join(f"w{index}" for index in range(40))
    for _ in range(3):  # round robin: at least one of these is offered to the dead upstream first
        began = time.monotonic()
        arrivals = [time.monotonic() - began for chunk in client.completions.create(
            model="lb-slow", prompt=words, stream=True) if chunk.choices and chunk.choices[0].text]
        assert len(arrivals) == 40, arrivals
        assert arrivals[0] < arrivals[-1] / 2, (arrivals[0], arrivals[-1])
    streamed = [e for e in nginx.requests() if e["uri"] == "/v1/completions"]
    assert [e["status"] for e in streamed] == [200, 200, 200], streamed
    assert any(len(e["attempts"]) == 2 for e in streamed), streamed  # one passed on from the dead port
    report(f"e2e nginx gateway: 3 streams of 40 tokens at 20/s through nginx, first token after "
           f"{arrivals[0]:.2f}s of {arrivals[-1]:.2f}s; {sum(len(e['attempts']) == 2 for e in streamed)} "
           "passed on from the dead gateway port")
