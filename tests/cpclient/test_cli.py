"""The operator CLI as operators run it: ``python -m cpclient`` as a subprocess (no Django in
its environment) against a real web process (gunicorn, the shipped configuration, on a fresh
database), with an operator key made by ``manage.py create_api_key`` (``ApiKey.objects.create_key``)
and nodes registered through the node API. Every command in table and JSON output, and each
exit code a script can branch on."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import uuid

import pytest
from django.conf import settings

from cpclient import ControlPlaneClient
from tests.processes import free_port, wait_for
from tests.security.edge import REGISTRATION_TOKEN, start_edge_server
from worker.control_plane import ControlPlaneClient as NodeClient

from .cli import ROOT, cli_env, command, run, table

pytestmark = pytest.mark.e2e

GiB = 2**30


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_edge_server(tmp_path_factory.mktemp("cli"), settings.DATABASES["default"])
    server.frontend_key = server.manage("create_api_key", "cli-frontend", "--role", "frontend").strip()
    yield server
    server.close()


def cli(server, *args: str, key: str | None = None, **extra: str) -> subprocess.CompletedProcess:
    return run(*args, url=server.base_url, key=server.api_key if key is None else key, **extra)


def ok(server, *args: str) -> str:
    result = cli(server, *args)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    assert result.stderr == "", result.stderr
    return result.stdout


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def register(server, name: str, labels: dict[str, str] | None = None) -> dict:
    """A node as LocalAI's worker registers it (fleet token, no worker service), then one
    heartbeat; its address is a closed port on loopback."""
    nodes = NodeClient(server.base_url, timeout=20)
    body = {
        "name": name,
        "address": f"127.0.0.1:{free_port()}",
        "labels": labels or {},
        "total_vram": 8 * GiB,
        "available_vram": 6 * GiB,
    }
    node = nodes.register(body, REGISTRATION_TOKEN)
    nodes.heartbeat(node["id"], REGISTRATION_TOKEN, {"available_vram": 5 * GiB})
    nodes.close()
    return {**node, "address": body["address"]}


def operator(server) -> ControlPlaneClient:
    return ControlPlaneClient(server.base_url, server.api_key, timeout=30)


def with_replica(server, model: str, node: dict) -> dict:
    """A replica of ``model`` on ``node``, reported through the API (the node vouches for an
    address on its own host), with the model's load info."""
    host = node["address"].rsplit(":", 1)[0]
    return operator(server).report_replica(
        node_id=node["id"],
        model=model,
        replica_index=0,
        address=f"{host}:{free_port()}",
        backend_type="echo",
        model_options={"Model": f"{model}.gguf"},
    )


def test_nodes_in_table_wide_and_json_output(server):
    gpu = register(server, unique("cli-gpu"), {"gpu": "a100", "zone": "eu"})
    cpu = register(server, unique("cli-cpu"), {"zone": "us"})
    with_replica(server, unique("cli-nodes-model"), gpu)

    rows = {row["NAME"]: row for row in table(ok(server, "nodes"))}
    assert list(table(ok(server, "nodes"))[0]) == ["NAME", "STATUS", "LABELS", "REPLICAS", "HEARTBEAT"]
    assert rows[gpu["name"]]["STATUS"] == "healthy"
    assert {"gpu=a100", "zone=eu"} <= set(rows[gpu["name"]]["LABELS"].split(","))  # and the auto-labels
    assert rows[gpu["name"]]["REPLICAS"] == "1"
    assert rows[cpu["name"]]["REPLICAS"] == "0"
    assert rows[cpu["name"]]["HEARTBEAT"].endswith("s")  # seconds ago: heartbeated just now

    listed = json.loads(ok(server, "nodes", "-o", "json"))
    status, api = server.api("GET", "/api/v1/nodes?limit=1000")
    assert status == 200 and listed == api["results"]

    wide = {row["NAME"]: row for row in table(ok(server, "-o", "wide", "nodes"))}
    assert wide[gpu["name"]]["ID"] == gpu["id"]
    assert wide[gpu["name"]]["VRAM"] == "5.0Gi/8.0Gi"
    assert wide[gpu["name"]]["ADDRESS"] == gpu["address"]

    selected = {row["NAME"] for row in table(ok(server, "nodes", "-l", "gpu=a100"))}
    assert gpu["name"] in selected and cpu["name"] not in selected
    assert {row["STATUS"] for row in table(ok(server, "nodes", "--status", "healthy"))} == {"healthy"}


def test_models_list_and_describe_model_with_conditions_replicas_and_events(server):
    model = f"org/{unique('cli-model')}.gguf"  # slashes and dots: quoted into the paths
    node = register(server, unique("cli-host"))
    with_replica(server, model, node)
    ok(server, "scale", model, "--min", "1")
    summary = ok(server, "reconcile")  # the pass writes the model's conditions and events
    assert "Outcome:" in summary and "ok" in summary.splitlines()[0]

    rows = {row["NAME"]: row for row in table(ok(server, "models"))}
    assert list(next(iter(rows.values()))) == ["NAME", "DESIRED", "READY", "CONDITIONS"]
    assert rows[model]["DESIRED"] == "1"
    assert rows[model]["READY"] == "1"
    assert rows[model]["CONDITIONS"] == "Available"
    wide = {row["NAME"]: row for row in table(ok(server, "models", "-o", "wide", "--name", model))}
    assert list(wide) == [model]
    assert wide[model]["CONDITIONS"].startswith("Available(")
    assert wide[model]["LOAD-INFO"] == "model"
    listed = json.loads(ok(server, "models", "-o", "json", "--name", model))
    assert [entry["model_name"] for entry in listed] == [model]
    assert listed[0]["ready_replicas"] == 1

    ok(server, "scale", model, "--min", "2")  # one node, one slot: below the floor from now on
    ok(server, "reconcile")
    described = ok(server, "describe", "model", model)
    head, _, rest = described.partition("Conditions:")
    fields = dict(line.split(":", 1) for line in head.splitlines())
    assert fields["Name"].strip() == model
    assert fields["Min replicas"].strip() == "2"
    assert fields["Load info"].strip() == "model"
    conditions, _, rest = rest.partition("Replicas:")
    condition_rows = {row["TYPE"]: row for row in table(conditions)}
    assert condition_rows["Available"]["STATUS"] == "false", described
    replicas, _, events = rest.partition("Events:")
    (replica,) = table(replicas)
    assert replica["NODE"] == node["name"]
    assert replica["STATE"] == "loaded"
    assert replica["IN-FLIGHT"] == "0"
    assert {row["KIND"] for row in table(events)} >= {"model_unavailable"}, described

    document = json.loads(ok(server, "describe", "model", model, "-o", "json"))
    assert document["model"]["model_name"] == model
    assert [r["node_name"] for r in document["replicas"]] == [node["name"]]
    assert "model_unavailable" in {event["kind"] for event in document["events"]}


def test_describe_node_by_name_and_by_id(server):
    labels = {"rack": "r7"}
    node = register(server, unique("cli-describe"), labels)
    model = unique("cli-describe-model")
    with_replica(server, model, node)

    text = ok(server, "describe", "node", node["name"])
    fields = dict(line.split(":", 1) for line in text.split("\nReplicas:")[0].splitlines())
    assert fields["ID"].strip() == node["id"]
    assert fields["Status"].strip() == "healthy"
    assert "rack=r7" in fields["Labels"].strip().split(",")
    assert fields["VRAM"].strip() == "5.0Gi available of 8.0Gi"
    replicas = table(text.split("\nReplicas:")[1].split("Events:")[0])
    assert [(row["MODEL"], row["STATE"]) for row in replicas] == [(model, "loaded")]

    document = json.loads(ok(server, "describe", "node", node["id"], "-o", "json"))
    assert document["node"]["name"] == node["name"]
    assert [replica["model_name"] for replica in document["replicas"]] == [model]


def test_drain_and_resume_through_every_alias(server):
    node = register(server, unique("cli-drain"))
    assert ok(server, "drain", node["name"]).strip() == f"node/{node['name']} drained (status draining)"
    status, stored = server.api("GET", f"/api/v1/nodes/{node['id']}")
    assert (stored["status"], stored["drained_by"]) == ("draining", "operator")
    assert json.loads(ok(server, "drain", node["id"], "-o", "json"))["status"] == "draining"  # harmless again

    assert ok(server, "uncordon", node["name"]).strip() == f"node/{node['name']} resumed (status healthy)"
    ok(server, "drain", node["name"])
    assert "resumed" in ok(server, "undrain", node["name"])
    ok(server, "drain", node["name"])
    assert json.loads(ok(server, "resume", node["name"], "-o", "json"))["status"] == "healthy"
    assert server.api("GET", f"/api/v1/nodes/{node['id']}")[1]["status"] == "healthy"


def test_an_api_refusal_exits_1_with_the_problems_title_detail_and_code(server):
    node = register(server, unique("cli-offline"))
    nodes = NodeClient(server.base_url, timeout=20)
    nodes.deregister(node["id"], REGISTRATION_TOKEN)  # offline: an operator cannot drain it
    nodes.close()
    refused = cli(server, "drain", node["name"])
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert "error: " in refused.stderr and "HTTP 409, code invalid_transition" in refused.stderr

    invalid = cli(server, "scale", unique("cli-bad"), "--min", "3", "--max", "1")
    assert invalid.returncode == 1
    assert "error: Invalid request (HTTP 400, code validation_error): " in invalid.stderr
    assert "max_replicas" in invalid.stderr or "min_replicas" in invalid.stderr


def test_scale_keeps_what_it_is_not_told_to_change(server):
    model = unique("cli-scale")
    assert ok(server, "scale", model, "--min", "2").strip() == f"model/{model} scaled (min 2, max unlimited)"
    assert ok(server, "scale", model, "--min", "2", "--max", "4").strip() == f"model/{model} scaled (min 2, max 4)"
    status, _ = server.api(
        "PUT",
        f"/api/v1/models/{model}/scheduling",
        {"min_replicas": 2, "max_replicas": 4, "node_selector": {"gpu": "a100"}},
    )
    assert status == 200
    config = json.loads(ok(server, "scale", model, "--min", "1", "-o", "json"))
    assert (config["min_replicas"], config["max_replicas"], config["node_selector"]) == (1, 4, {"gpu": "a100"})
    status, stored = server.api("GET", f"/api/v1/models/{model}/scheduling")
    assert (stored["min_replicas"], stored["max_replicas"], stored["node_selector"]) == (1, 4, {"gpu": "a100"})


def test_events_list_and_follow_until_ctrl_c(server):
    model = unique("cli-events")
    follow = subprocess.Popen(
        command("events", "--follow", "--interval", "0.2", "--model", model),
        cwd=ROOT,
        env=cli_env(server.base_url, server.api_key),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(follow.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any(line.startswith("AGE") for line in lines), 30, what="the follow's header")
        time.sleep(0.5)  # a poll or two with nothing new
        assert len(lines) == 1
        ok(server, "scale", model, "--min", "1")  # no load info: the pass records it
        ok(server, "reconcile")
        wait_for(lambda: any("no_load_info" in line for line in lines), 30, what="the new event printed")
        follow.send_signal(signal.SIGINT)
        assert follow.wait(15) == 0
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    reader.join(5)
    assert follow.stderr.read() == ""
    header = lines[0]
    event_line = next(line for line in lines if "no_load_info" in line)
    assert event_line.index("no_load_info") == header.index("KIND")  # the follow keeps the columns
    assert model in event_line

    listed = table(ok(server, "events", "--model", model))
    assert "no_load_info" in {row["KIND"] for row in listed}
    assert {row["MODEL"] for row in listed} == {model}
    documents = json.loads(ok(server, "events", "--model", model, "-o", "json", "--limit", "1"))
    assert len(documents) == 1 and documents[0]["model_name"] == model
    assert ok(server, "events", "--model", unique("cli-quiet")).strip() == "No events found."


def test_exit_codes_scripts_can_branch_on(server):
    wrong_key = cli(server, "nodes", key="cpk_" + "0" * 40)
    assert wrong_key.returncode == 4 and "HTTP 401" in wrong_key.stderr
    frontend = cli(server, "nodes", key=server.frontend_key)
    assert frontend.returncode == 4 and "HTTP 403" in frontend.stderr
    no_key = cli(server, "nodes", key="")
    assert no_key.returncode == 4 and "CONTROLPLANE_API_KEY" in no_key.stderr

    missing_model = cli(server, "describe", "model", unique("cli-nowhere"))
    assert missing_model.returncode == 3 and "code not_found" in missing_model.stderr
    missing_node = cli(server, "drain", unique("cli-nowhere"))
    assert missing_node.returncode == 3 and "No node named" in missing_node.stderr

    down = run("nodes", url=f"http://127.0.0.1:{free_port()}", key=server.api_key)
    assert down.returncode == 5 and "cannot connect" in down.stderr

    for args in (("nodes", "--bogus"), ("scale", "m"), ("scale", "m", "--min", "-1"), ("-o", "yaml", "nodes"), ()):
        usage = cli(server, *args)
        assert usage.returncode == 2, args
        assert "usage:" in usage.stderr, args


def test_flags_override_the_environment(server):
    result = run(
        "nodes",
        "--url",
        server.base_url,
        "--api-key",
        server.api_key,
        url=f"http://127.0.0.1:{free_port()}",
        key="cpk_wrong",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("NAME")
