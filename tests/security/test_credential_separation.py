"""Issue 12, items 0 and 11: a frontend key must not be able to steal the fleet's registration
token and take nodes over, and each credential does one job only.

The attack chain this file replays with real gRPC servers on loopback and the real REST API:
a frontend key reports a replica at an address it controls (node ids are visible to frontends),
routes to it, and waits for the reconciler's Health probe to bring it a credential; with the
registration token it would then re-register the victim's name at its own address. Every link
is closed: reports need the node's vouching, probes carry only the node's data-plane
credential, and re-registering an existing name needs that node's own token.
"""

import base64
from concurrent import futures

import grpc
import pytest
from rest_framework.test import APIClient

from core.credentials import backend_token, worker_command_token
from proto import client
from reconciler.reconcile import reconcile_once
from registry.models import Node, NodeModel
from tests.clients import REGISTRATION_TOKEN, client_for_role, client_with
from tests.factories import make_api_key
from tests.reconciler.fakes import FakeScheduler
from tests.router.conftest import BackendKnobs, FakeBackend, FakeWorker, Servers, options_blob

pytestmark = pytest.mark.django_db(transaction=True)

B64 = base64.b64encode(options_blob("llama.gguf")).decode()


@pytest.fixture
def servers():
    started = Servers()
    yield started
    started.stop_all()
    client.close_all_channels()


def frontend() -> APIClient:
    return client_for_role("frontend")


def register(name: str, address: str, *, token: str = REGISTRATION_TOKEN, node_token: str | None = None, **body):
    headers = {"HTTP_X_NODE_TOKEN": node_token} if node_token else {}
    payload = {"name": name, "address": address, "total_vram": 24 * 2**30, **body}
    return client_with(token, **headers).post("/api/node/register", payload, format="json")


def register_worker(servers: Servers, name: str = "victim") -> tuple[FakeWorker, dict]:
    """A node whose address is a real (fake) worker gRPC service, registered over REST."""
    worker = FakeWorker(servers, BackendKnobs())
    _, address = servers.start(worker.handler())
    answer = register(name, address, auth_mode="node_token", serves_worker_api=True)
    assert answer.status_code == 201, answer.json()
    worker.node_id = answer.json()["id"]
    return worker, answer.json()


def attacker_server(servers: Servers, host: str = "127.0.0.1") -> tuple[FakeBackend, str]:
    """Something the attacker runs: answers Health OK to anyone and records what it is sent."""
    backend = FakeBackend(BackendKnobs())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((backend.handler(),))
    port = server.add_insecure_port(f"{host}:0")
    server.start()
    servers.started.append(server)
    return backend, f"{host}:{port}"


def report(node_id: str, address: str):
    body = {
        "node_id": node_id,
        "model_name": "llama",
        "replica_index": 0,
        "address": address,
        "backend_type": "llama-cpp",
        "model_options_b64": B64,
    }
    return frontend().post("/api/v1/replicas", body, format="json")


def test_a_frontend_key_cannot_plant_a_replica_and_harvest_the_registration_token(servers):
    victim_worker, victim = register_worker(servers)
    attacker, attacker_address = attacker_server(servers)

    refused = report(victim["id"], attacker_address)

    assert refused.status_code == 409, refused.json()
    assert refused.json()["code"] == "replica_not_vouched"
    assert not NodeModel.objects.exists()
    # The route cannot lease it (there is nothing), and the reconciler's pass probes nothing there.
    assert frontend().post("/api/v1/models/llama/route", {}, format="json").status_code != 200
    reconcile_once(scheduler=FakeScheduler(place=False))
    assert attacker.authorizations == []
    # The worker was asked, with its command token: never the registration token.
    assert victim_worker.count("ListBackends") >= 1
    assert set(victim_worker.authorizations) == {f"Bearer {worker_command_token(victim['id'])}"}


def test_a_backend_the_worker_runs_is_accepted_and_probed_with_the_data_plane_credential(servers, settings):
    settings.ROUTE_PROBE_CACHE_SECONDS = 0  # every route probes
    victim_worker, victim = register_worker(servers)
    address, _ = victim_worker.launch("llama", 0)
    backend = victim_worker.backend("llama")

    accepted = report(victim["id"], address)
    assert accepted.status_code == 201, accepted.json()
    assert NodeModel.objects.filter(node_id=victim["id"], model_name="llama", address=address, state="loaded").exists()
    lease = frontend().post("/api/v1/models/llama/route", {}, format="json")

    assert lease.status_code == 200, lease.json()
    assert lease.json()["backend_token"] == backend_token(victim["id"])
    assert set(backend.authorizations) == {f"Bearer {backend_token(victim['id'])}"}


def test_a_node_without_a_worker_service_vouches_only_for_its_own_host_and_is_never_sent_the_registration_token(
    servers, settings
):
    settings.ROUTE_PROBE_CACHE_SECONDS = 0  # every route probes
    """A LocalAI worker (fleet_token, no worker service) cannot be asked: a report is accepted only
    on the host it registered, and whatever answers there gets that node's data-plane credential,
    which opens that node's backends and nothing else."""
    answer = register("localai-1", "127.0.0.1:1", serves_worker_api=False)
    assert answer.status_code == 201, answer.json()
    node_id = answer.json()["id"]
    _, elsewhere = attacker_server(servers, host="127.0.0.2")
    attacker, same_host = attacker_server(servers)

    refused = report(node_id, elsewhere)
    assert (refused.status_code, refused.json()["code"]) == (409, "replica_not_vouched")
    assert report(node_id, same_host).status_code == 201
    assert NodeModel.objects.get().address == same_host
    assert frontend().post("/api/v1/models/llama/route", {}, format="json").status_code == 200

    assert attacker.authorizations, "the route probes the replica"
    assert set(attacker.authorizations) == {f"Bearer {backend_token(node_id)}"}
    assert not any(REGISTRATION_TOKEN in (value or "") for value in attacker.authorizations)


def test_vouching_by_host_reads_the_host_of_a_grpcs_address():
    """A node serving TLS registers ``grpcs://HOST:PORT`` (docs/tls.md): its host is still HOST."""
    node_id = register("localai-tls", "grpcs://127.0.0.1:1", serves_worker_api=False).json()["id"]
    refused = report(node_id, "grpcs://127.0.0.2:50100")
    assert (refused.status_code, refused.json()["code"]) == (409, "replica_not_vouched")
    assert report(node_id, "grpcs://127.0.0.1:50100").status_code == 201
    assert NodeModel.objects.get().address == "grpcs://127.0.0.1:50100"


def test_re_registering_a_name_with_only_the_fleet_token_cannot_take_the_node_over(servers):
    victim_worker, victim = register_worker(servers)
    node = Node.objects.get(pk=victim["id"])

    for takeover in (
        register("victim", "10.6.6.6:50051", auth_mode="node_token", serves_worker_api=True),
        register("victim", "10.6.6.6:50051", auth_mode="node_token", node_token="cpn_guessed"),
        register("victim", "10.6.6.6:50051", auth_mode="node_token", node_token=backend_token(victim["id"])),
    ):
        assert takeover.status_code == 409, takeover.json()
        assert takeover.json()["code"] == "node_credential_required"
        assert "node_token" not in takeover.json()
    fleet_mode = register("victim", "10.6.6.6:50051")  # LocalAI style: no per-node token asked
    assert (fleet_mode.status_code, fleet_mode.json()["code"]) == (409, "node_token_required")

    # Nothing changed: the victim's address and token are as before.
    node.refresh_from_db()
    assert node.address != "10.6.6.6:50051"
    heartbeat = client_with(victim["node_token"]).post(f"/api/node/{victim['id']}/heartbeat", {}, format="json")
    assert heartbeat.status_code == 200

    # The node itself (a restarted worker that kept its token) comes back under the same id.
    again = register("victim", node.address, auth_mode="node_token", node_token=victim["node_token"])
    assert again.status_code == 201, again.json()
    assert again.json()["id"] == victim["id"]


@pytest.mark.parametrize("kind", ["backend", "worker_command", "frontend_key"])
def test_no_other_credential_registers_a_node_or_drives_one(kind):
    node = register("n1", "127.0.0.1:1", auth_mode="node_token").json()
    token = {
        "backend": backend_token(node["id"]),
        "worker_command": worker_command_token(node["id"]),
        "frontend_key": make_api_key("frontend")[1],
    }[kind]

    assert register("n2", "127.0.0.1:2", token=token).status_code == 401
    assert client_with(token).post(f"/api/node/{node['id']}/heartbeat", {}, format="json").status_code == 401
    assert not Node.objects.filter(name="n2").exists()


def test_the_registration_answer_hands_each_credential_to_its_holder_only():
    answer = register("n1", "127.0.0.1:1", auth_mode="node_token")
    body = answer.json()
    assert answer["Cache-Control"] == "no-store"
    assert body["worker_token"] == worker_command_token(body["id"])
    assert body["backend_token"] == backend_token(body["id"])
    tokens = {REGISTRATION_TOKEN, body["node_token"], body["worker_token"], body["backend_token"]}
    assert len(tokens) == 4  # four different secrets
    other = register("n2", "127.0.0.1:2", auth_mode="node_token").json()
    assert other["backend_token"] != body["backend_token"]  # one leaked backend token opens one node
    # A LocalAI (fleet_token) node gets no gRPC credential: its backends are LocalAI's.
    localai = register("n3", "127.0.0.1:3").json()
    assert not {"node_token", "worker_token", "backend_token"} & set(localai)
