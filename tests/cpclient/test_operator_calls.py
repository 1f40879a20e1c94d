"""``cpclient.ControlPlaneClient``'s operator calls against the real app (pytest-django's
live_server, both database lanes): full lists over several pages, nodes by name or id, drains,
``scale`` keeping what it is not told to change, events by time; nodes registered through the
node API, the key made by ``ApiKey.objects.create_key``."""

import pytest

from cpclient import AuthenticationError, ConflictError, ControlPlaneClient, NotFoundError, PermissionError_
from cpclient import operator as operator_calls
from tests.clients import REGISTRATION_TOKEN
from tests.factories import make_api_key
from tests.processes import free_port
from worker.control_plane import ControlPlaneClient as NodeClient


@pytest.fixture
def cp(live_server, transactional_db, registration_settings):
    _, secret = make_api_key("operator")
    return ControlPlaneClient(live_server.url, secret, timeout=20, max_retries=0)


def register(live_server, name: str, **labels: str) -> dict:
    nodes = NodeClient(live_server.url, timeout=20)
    try:
        return nodes.register(
            {"name": name, "address": f"127.0.0.1:{free_port()}", "labels": labels}, REGISTRATION_TOKEN
        )
    finally:
        nodes.close()


def test_lists_read_every_page(cp, live_server, monkeypatch):
    monkeypatch.setattr(operator_calls, "PAGE", 2)
    made = [register(live_server, f"page-{index}", pool="p") for index in range(5)]
    for index in range(3):
        cp.scale(f"paged-{index}", min_replicas=0, max_replicas=1)
    assert [node["name"] for node in cp.list_nodes()] == [node["name"] for node in made]
    assert [node["name"] for node in cp.list_nodes(label="pool=p")] == [node["name"] for node in made]
    assert cp.list_nodes(label="pool=q") == []
    assert [model["model_name"] for model in cp.list_models(name="paged")] == ["paged-0", "paged-1", "paged-2"]
    assert [model["model_name"] for model in cp.list_models(configured=True)] == ["paged-0", "paged-1", "paged-2"]


def test_nodes_by_name_or_id_and_their_transitions(cp, live_server):
    node = register(live_server, "by-name")
    assert cp.find_node("by-name")["id"] == node["id"]
    assert cp.find_node(node["id"])["name"] == "by-name"
    with pytest.raises(NotFoundError, match="No node named 'nowhere'"):
        cp.find_node("nowhere")
    with pytest.raises(NotFoundError):
        cp.find_node("00000000-0000-0000-0000-000000000000")

    assert (cp.drain_node(node["id"])["status"], cp.get_node(node["id"])["drained_by"]) == ("draining", "operator")
    assert cp.resume_node(node["id"])["status"] == "healthy"


def test_a_pending_node_is_approved_not_drained(cp, live_server, settings):
    settings.CONTROLPLANE_AUTO_APPROVE = False
    node = register(live_server, "waiting")
    assert cp.find_node("waiting")["status"] == "pending"
    with pytest.raises(ConflictError) as refused:
        cp.drain_node(node["id"])
    assert (refused.value.status, refused.value.code) == (409, "invalid_transition")
    assert cp.approve_node(node["id"])["status"] == "healthy"


def test_scale_keeps_the_selector_and_an_unnamed_ceiling(cp):
    cp.put_scheduling("kept", min_replicas=1, max_replicas=5, node_selector={"gpu": "a100"})
    config = cp.scale("kept", min_replicas=3)
    assert (config["min_replicas"], config["max_replicas"], config["node_selector"]) == (3, 5, {"gpu": "a100"})
    assert cp.scale("kept", min_replicas=3, max_replicas=0)["max_replicas"] == 0
    assert cp.get_scheduling("kept")["min_replicas"] == 3
    fresh = cp.scale("org/fresh.gguf", min_replicas=2)  # no config yet: the defaults
    assert (fresh["model_name"], fresh["max_replicas"], fresh["node_selector"]) == ("org/fresh.gguf", 0, {})


def test_events_newest_first_or_oldest_since_an_instant(cp):
    cp.scale("evented", min_replicas=1)  # no load info: the pass records it
    assert cp.reconcile()["outcome"] == "ok"
    newest = cp.list_events(model="evented", limit=50)
    assert newest and {event["model_name"] for event in newest} == {"evented"}
    assert [event["created_at"] for event in newest] == sorted((event["created_at"] for event in newest), reverse=True)
    oldest = cp.list_events(model="evented", oldest_first=True, since=newest[-1]["created_at"])
    assert [event["id"] for event in oldest] == [event["id"] for event in reversed(newest)]
    later = cp.list_events(model="evented", since="9999-01-01T00:00:00+00:00")
    assert later == []
    assert cp.list_replicas(model="evented") == []


def test_a_frontend_key_is_refused_and_a_wrong_key_unauthenticated(live_server, transactional_db):
    _, frontend = make_api_key("frontend")
    with pytest.raises(PermissionError_):
        ControlPlaneClient(live_server.url, frontend, max_retries=0).list_nodes()
    with pytest.raises(AuthenticationError):
        ControlPlaneClient(live_server.url, "cpk_wrong", max_retries=0).list_models()
    reader = ControlPlaneClient(live_server.url, frontend, max_retries=0)  # a frontend key reads these
    assert reader.list_models() == [] and reader.list_events(limit=1) == []
