"""A stand-in for LocalAI's backend worker on the node wire, for end-to-end tests.

It speaks exactly what LocalAI's worker sends (``core/cli/workerregistry/client.go`` and
``core/services/worker/{worker,registration}.go`` of LocalAI): every call carries
``Authorization: Bearer <registration token>`` (LocalAI's worker never asks for a per-node
token), bodies are Go's ``json.Marshal`` of a ``map[string]any`` (compact, keys sorted), and
the headers are Go's ``net/http`` defaults plus ``Content-Type: application/json`` where the Go
code sets it:

1. ``POST /api/node/register`` with the registration body (retried on any non-2xx, 2 s backoff
   doubling to 30 s, at most 10 tries: ``RegisterWithRetry``);
2. every ``--heartbeat-interval`` s (a Go ticker: the first one after one interval),
   ``POST /api/node/{id}/heartbeat`` with ``available_ram``, ``total_disk``, ``available_disk``
   (``available_vram`` too when ``--total-vram`` > 0); the Go client ignores the answer;
3. on SIGTERM (``GracefulDeregister``): ``POST /api/node/{id}/drain`` (no body; anything but 200
   skips the wait), poll ``GET /api/node/{id}/models`` each second until the ``in_flight`` sum is
   0 (at most 30 s), then ``POST /api/node/{id}/deregister`` (no body; expects 200); exit 0.

Backend commands reach a LocalAI worker over NATS, which the control plane does not speak. With
``--backend-at-address`` this process also serves ``backend.Backend`` at its advertised address,
as a LocalAI worker does once its first backend runs (the first backend takes the advertised
port), and records every gRPC method called there.

Every HTTP call and every gRPC method called is printed as one JSON line on standard output
(``{"call": "heartbeat", "status": 200}``, ``{"grpc": "/controlplane.worker.v1.Worker/..."}``)
so a test can check each answer the Go client would have seen.

    python -m tests.e2e.localai_worker --frontend http://127.0.0.1:8000 --token T --name mac-1 \\
        --address 127.0.0.1:50051 --heartbeat-interval 1
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import sys
import threading
import time
from urllib.parse import urlsplit

GO_HEADERS = {"User-Agent": "Go-http-client/1.1", "Accept-Encoding": "gzip"}
GIB = 1024**3


def emit(**fields) -> None:
    print(json.dumps(fields, sort_keys=True), flush=True)


class RegistrationClient:
    """``workerregistry.RegistrationClient``: one HTTP call per method, 10 s timeout."""

    def __init__(self, frontend_url: str, token: str, timeout: float = 10.0):
        parts = urlsplit(frontend_url.rstrip("/"))
        self.host, self.port = parts.hostname, parts.port or 80
        self.token = token
        self.timeout = timeout

    def _call(self, name: str, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        headers = dict(GO_HEADERS)
        payload = None
        if body is not None:
            payload = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
            headers["Content-Type"] = "application/json"
        if self.token:  # setAuth: only when a token is configured
            headers["Authorization"] = f"Bearer {self.token}"
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            # http.client sends Content-Length: 0 for a POST without a body, as Go does.
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            raw = response.read()
            if response.getheader("Content-Encoding") == "gzip":
                import gzip

                raw = gzip.decompress(raw)
        except OSError as exc:
            emit(call=name, status=0, error=str(exc))
            raise
        finally:
            connection.close()
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = None
        emit(call=name, status=response.status, body=answer)
        return response.status, answer

    def register(self, body: dict) -> dict:
        status, answer = self._call("register", "POST", "/api/node/register", body)
        if status < 200 or status >= 300:
            raise RuntimeError(f"registration failed with status {status}")
        return answer

    def register_with_retry(self, body: dict, max_retries: int = 10) -> dict:
        backoff = 2.0
        for attempt in range(1, max_retries + 1):
            try:
                return self.register(body)
            except (RuntimeError, OSError):
                if attempt == max_retries:
                    raise
            time.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
        raise AssertionError("unreachable")

    def heartbeat(self, node_id: str, body: dict) -> None:
        try:
            self._call("heartbeat", "POST", f"/api/node/{node_id}/heartbeat", body)
        except OSError:
            pass  # the Go client logs and carries on

    def drain(self, node_id: str) -> bool:
        status, _ = self._call("drain", "POST", f"/api/node/{node_id}/drain")
        return status == 200

    def wait_for_drain(self, node_id: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                _, models = self._call("models", "GET", f"/api/node/{node_id}/models")
            except OSError:
                time.sleep(1)
                continue
            # Go decodes []struct{InFlight int `json:"in_flight"`}; anything else decodes to nothing.
            rows = models if isinstance(models, list) else []
            if sum(int(row.get("in_flight") or 0) for row in rows if isinstance(row, dict)) == 0:
                return
            time.sleep(1)

    def deregister(self, node_id: str) -> bool:
        status, _ = self._call("deregister", "POST", f"/api/node/{node_id}/deregister")
        return status == 200

    def graceful_deregister(self, node_id: str) -> None:
        if self.drain(node_id):
            self.wait_for_drain(node_id)
        self.deregister(node_id)


def registration_body(args) -> dict:
    """``Config.registrationBody()`` on a worker with unified memory and a models disk."""
    return {
        "name": args.name,
        "address": args.address,
        "http_address": args.http_address or args.address,
        "total_vram": args.total_vram,
        "available_vram": args.total_vram,
        "gpu_vendor": args.gpu_vendor,
        "gpu_compute_capability": "",
        "capability": args.capability,
        "max_replicas_per_model": 1,
        "total_disk": args.total_disk,
        "available_disk": args.available_disk,
        "total_ram": args.total_ram,
        "available_ram": args.total_ram // 2,
        "token": args.token,
        "labels": {"node.replica-slots": "1"},
    }


def heartbeat_body(args) -> dict:
    """``Config.heartbeatBody()``: available_vram only when a GPU total is known."""
    body = {"available_ram": args.total_ram // 2, "total_disk": args.total_disk, "available_disk": args.available_disk}
    if args.total_vram > 0:
        body["available_vram"] = args.total_vram // 2
    return body


def serve_backend_at(address: str):
    """``backend.Backend`` (Health only) at ``address``; every method called is emitted."""
    from concurrent import futures

    import grpc

    from proto import backend_pb2, backend_pb2_grpc

    class Recorder(grpc.GenericRpcHandler):
        def service(self, handler_call_details):
            emit(grpc=handler_call_details.method)
            return None

    class Backend(backend_pb2_grpc.BackendServicer):
        def Health(self, request, context):
            return backend_pb2.Reply(message=b"OK")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((Recorder(),))
    backend_pb2_grpc.add_BackendServicer_to_server(Backend(), server)
    server.add_insecure_port(address)
    server.start()
    return server


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frontend", required=True)
    parser.add_argument("--token", default="")
    parser.add_argument("--name", required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--http-address", default="")
    parser.add_argument("--heartbeat-interval", type=float, default=10.0)
    parser.add_argument("--gpu-vendor", default="apple")
    parser.add_argument("--capability", default="metal")
    parser.add_argument("--total-vram", type=int, default=0)
    parser.add_argument("--total-ram", type=int, default=64 * GIB)
    parser.add_argument("--total-disk", type=int, default=2048 * GIB)
    parser.add_argument("--available-disk", type=int, default=900 * GIB)
    parser.add_argument("--backend-at-address", action="store_true")
    args = parser.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server = serve_backend_at(args.address) if args.backend_at_address else None

    client = RegistrationClient(args.frontend, args.token)
    node_id = client.register_with_retry(registration_body(args))["id"]
    emit(registered=node_id)
    while not stop.wait(args.heartbeat_interval):
        client.heartbeat(node_id, heartbeat_body(args))
    client.graceful_deregister(node_id)
    if server is not None:
        server.stop(grace=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
