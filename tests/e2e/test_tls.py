"""TLS where traffic crosses machines, end to end: real processes on loopback, PostgreSQL,
certificates from a throwaway CA made by the test (docs/tls.md).

1. gRPC: a reference worker serving TLS and requiring client certificates (mutual TLS)
   registers as ``grpcs://``; the reconciler loads a model on it (StartBackend, LoadModel) and
   probes it, the router routes to it, a frontend (``cpclient`` in a process of its own,
   configured from the environment only) and the gateway call its TLS backend; a frontend
   without the client certificate is refused.
2. HTTPS behind the proxy: gunicorn with the README's production settings redirects plain HTTP
   to HTTPS, except the probes and scrapes a load balancer and Prometheus send directly
   (``/livez``, ``/readyz``, ``/metrics``); requests the proxy marks ``X-Forwarded-Proto:
   https`` are served with HSTS and secure cookies, worker registration and heartbeats included.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import openai
import pytest

from tests.e2e.harness import ROOT, TOKEN, fast_settings, wait_for
from tests.tls_certs import make_ca

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

FRONTEND = textwrap.dedent(
    """
    import os, sys
    from cpclient import ControlPlaneClient
    frontend = ControlPlaneClient(os.environ["CONTROLPLANE_URL"], os.environ["CONTROLPLANE_API_KEY"], timeout=30)
    with frontend.lease("tiny") as lease:
        print(lease.address)
        print(lease.predict("routed over tls", timeout=10).message.decode())
    """
)


def run_frontend(fleet, **env) -> subprocess.CompletedProcess:
    """cpclient as a frontend process of its own: no Django, TLS from the environment only."""
    environment = {key: value for key, value in fleet.env().items() if not key.startswith(("DJANGO", "CONTROLPLANE"))}
    environment.update(CONTROLPLANE_URL=fleet.base_url, CONTROLPLANE_API_KEY=fleet.api_key, PYTHONPATH=str(ROOT), **env)
    return subprocess.run(
        [sys.executable, "-c", FRONTEND], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60
    )


def test_a_tls_worker_is_loaded_probed_and_routed_to_over_mutual_tls(fleet, tmp_path):
    ca = make_ca(tmp_path, "fleet-ca")
    worker_leaf, control_plane_leaf = ca.issue("worker"), ca.issue("control-plane")
    tls_env = {
        "CONTROLPLANE_GRPC_TLS_CA": ca.cert,
        "CONTROLPLANE_GRPC_TLS_CERT": control_plane_leaf.cert,
        "CONTROLPLANE_GRPC_TLS_KEY": control_plane_leaf.key,
    }
    fleet.settings_env.update(fast_settings(CONTROLPLANE_LOAD_JOB_RUNNER="thread"), **tls_env)
    fleet.start_web(workers=1)
    worker = fleet.start_worker(
        "tls-a",
        extra=["--tls-cert", worker_leaf.cert, "--tls-key", worker_leaf.key,
               "--tls-client-ca", ca.cert, "--tls-ca", ca.cert],
    )
    node = fleet.wait_nodes({"tls-a"})["tls-a"]
    assert node["address"] == f"grpcs://127.0.0.1:{worker.port}"

    fleet.start_reconciler(1.0)
    fleet.set_floor("tiny", 1)
    fleet.wait_converged("tiny", 1, 60)
    [row] = fleet.replica_rows("tiny")
    assert row["address"].startswith("grpcs://127.0.0.1:"), row
    # The reconciler keeps probing the replica over TLS (Health), and it stays confirmed.
    probed = "SELECT last_probe_at, probe_failures FROM registry_nodemodel WHERE model_name = 'tiny'"
    first = fleet.sql(probed)[0][0]
    wait_for(lambda: fleet.sql(probed)[0][0] not in (None, first), timeout=20, what="the replica probed again")
    assert fleet.sql(probed)[0][1] == 0
    assert fleet.nodes()["tls-a"]["worker_api"] == "available"  # ListBackends over TLS answers

    # A frontend with the CA and the client certificate is routed to the replica and calls it.
    done = run_frontend(fleet, **tls_env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == [row["address"], "routed over tls"], done.stdout
    # Without the client certificate the backend refuses it, and says why.
    refused = run_frontend(fleet, CONTROLPLANE_GRPC_TLS_CA=ca.cert)
    assert refused.returncode != 0
    assert "no client certificate was presented" in refused.stderr, refused.stderr[-2000:]
    # Trusting another CA: the handshake fails on the worker's certificate.
    stranger = make_ca(tmp_path, "stranger-ca")
    refused = run_frontend(fleet, **{**tls_env, "CONTROLPLANE_GRPC_TLS_CA": stranger.cert})
    assert refused.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr, refused.stderr[-2000:]

    # The gateway (grpc.aio) dials the same TLS backend.
    fleet.start_gateway()
    gateway = openai.OpenAI(base_url=fleet.gateway_url, api_key=fleet.api_key, max_retries=0, timeout=30)
    completion = gateway.completions.create(model="tiny", prompt="through the gateway over tls")
    assert completion.choices[0].text == "through the gateway over tls"
    assert TOKEN not in worker.log()


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def _http(fleet, method, path, *, proxied, body=None, headers=None):
    """(status, headers, body) of a request straight to gunicorn; ``proxied`` adds what the TLS
    proxy adds (X-Forwarded-Proto: https, the public Host)."""
    request = urllib.request.Request(
        fleet.base_url + path, data=None if body is None else json.dumps(body).encode(), method=method
    )
    request.add_header("Host", "cp.example.com")
    if proxied:
        request.add_header("X-Forwarded-Proto", "https")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with _OPENER.open(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_https_behind_the_proxy_redirects_plain_http_but_not_probes_or_workers(fleet):
    fleet.settings_env.update(
        DJANGO_ALLOWED_HOSTS="cp.example.com,127.0.0.1",
        DJANGO_SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto",
        DJANGO_SECURE_SSL_REDIRECT="true",
        DJANGO_SECURE_HSTS_SECONDS="31536000",
        DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS="true",
        DJANGO_SECURE_HSTS_PRELOAD="true",
        DJANGO_SESSION_COOKIE_SECURE="true",
        DJANGO_CSRF_COOKIE_SECURE="true",
        DJANGO_CSRF_TRUSTED_ORIGINS="https://cp.example.com",
        READYZ_REQUIRE_RECONCILER="false",
    )
    fleet.start_web(workers=1)
    # A load balancer's health checks and Prometheus reach the web process directly, in plain HTTP.
    assert _http(fleet, "GET", "/livez", proxied=False)[0] == 200
    assert _http(fleet, "GET", "/readyz", proxied=False)[0] == 200
    assert _http(fleet, "GET", "/metrics", proxied=False)[0] == 200
    # Anything else in plain HTTP is sent to HTTPS.
    status, headers, _ = _http(fleet, "GET", "/api/v1/nodes", proxied=False)
    assert status == 301 and headers["Location"] == "https://cp.example.com/api/v1/nodes"

    # Through the proxy: served, with HSTS.
    auth = {"Authorization": f"Bearer {fleet.api_key}"}
    status, headers, _ = _http(fleet, "GET", "/api/v1/nodes", proxied=True, headers=auth)
    assert status == 200
    assert headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains; preload"
    # The admin's cookies are secure-only.
    status, headers, _ = _http(fleet, "GET", "/admin/login/", proxied=True)
    assert status == 200
    assert all("Secure" in cookie for cookie in headers.get_all("Set-Cookie")), headers.get_all("Set-Cookie")

    # A worker behind the proxy: registration and heartbeats are answered.
    registration = {"name": "behind-proxy", "address": "grpcs://10.0.0.7:50051", "auth_mode": "node_token"}
    status, _, body = _http(
        fleet, "POST", "/api/node/register", proxied=True, body=registration,
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert status == 201, body
    node = json.loads(body)
    status, _, body = _http(
        fleet, "POST", f"/api/node/{node['id']}/heartbeat", proxied=True, body={},
        headers={"Authorization": f"Bearer {node['node_token']}"},
    )
    assert status == 200, body
