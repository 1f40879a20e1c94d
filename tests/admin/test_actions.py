"""Admin actions change state only through the registry verbs (checked by the resulting rows),
and the model form validates like the API."""

from concurrent import futures
from datetime import timedelta

import grpc
import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.messages import get_messages
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

from core.credentials import worker_command_token
from core.models import ApiKey
from proto import client as grpc_client
from proto import worker_pb2, worker_pb2_grpc
from reconciler import reconcile
from reconciler.models import ReconcilePass
from registry.models import ModelLoadInfo, ModelSchedulingConfig, Node, NodeLabel, NodeModel
from tests.factories import make_node, make_replica

pytestmark = pytest.mark.django_db

TOKEN = "fleet-token-for-admin-tests"
NODES = reverse("admin:registry_node_changelist")
REPLICAS = reverse("admin:registry_nodemodel_changelist")
MODELS = reverse("admin:registry_modelschedulingconfig_changelist")
KEYS = reverse("admin:controlplane_apikey_changelist")


def act(client, url, action, objects, **extra):
    data = {"action": action, ACTION_CHECKBOX_NAME: [str(obj.pk) for obj in objects], **extra}
    return client.post(url, data, follow=True)


def texts(response):
    return [str(message) for message in get_messages(response.wsgi_request)] or [
        str(message) for message in response.context["messages"]
    ]


def status(node):
    return Node.objects.values_list("status", flat=True).get(pk=node.pk)


# ----- nodes ---------------------------------------------------------------------------------


def test_approve_moves_a_pending_node_to_healthy(admin_client):
    node = make_node(status=Node.Status.PENDING)
    response = act(admin_client, NODES, "approve", [node])
    assert status(node) == Node.Status.HEALTHY
    assert any("approved: 1" in text for text in texts(response))


def test_approve_leaves_a_healthy_node_alone_and_says_so(admin_client):
    node = make_node()
    response = act(admin_client, NODES, "approve", [node])
    assert status(node) == Node.Status.HEALTHY
    assert any("unchanged" in text for text in texts(response))


def test_drain_then_resume_keeps_the_replica_rows(admin_client):
    node = make_node()
    make_replica(node, "llama")
    act(admin_client, NODES, "drain", [node])
    node.refresh_from_db()
    assert (node.status, node.drained_by) == (Node.Status.DRAINING, Node.DrainedBy.OPERATOR)
    assert NodeModel.objects.filter(node=node).count() == 1
    act(admin_client, NODES, "resume", [node])
    node.refresh_from_db()
    assert (node.status, node.drained_by) == (Node.Status.HEALTHY, Node.DrainedBy.NONE)
    assert NodeModel.objects.filter(node=node).count() == 1


def test_an_operators_drain_takes_over_a_drain_the_node_started(admin_client):
    node = make_node()
    assert Node.objects.mark_draining(node.pk, by=Node.DrainedBy.NODE)
    act(admin_client, NODES, "drain", [node])
    node.refresh_from_db()
    assert (node.status, node.drained_by) == (Node.Status.DRAINING, Node.DrainedBy.OPERATOR)


def test_mark_offline_deletes_replica_rows_but_not_load_info(admin_client):
    node = make_node()
    make_replica(node, "llama")
    ModelLoadInfo.objects.upsert("llama", "llama-cpp", b"\n\x05llama")
    response = act(admin_client, NODES, "mark_offline", [node])
    assert status(node) == Node.Status.OFFLINE
    assert not NodeModel.objects.filter(node=node).exists()
    assert ModelLoadInfo.objects.filter(model_name="llama").exists()
    assert texts(response) == ["marked offline: 1 node(s)."]


def test_mark_offline_says_a_pending_node_stays_pending(admin_client):
    """The verb keeps a pending node pending (only Approve lets it out) and answers True: the
    action must not count it as marked offline."""
    pending = make_node(name="waiting", status=Node.Status.PENDING)
    healthy = make_node(name="serving")
    make_replica(healthy, "llama")

    response = act(admin_client, NODES, "mark_offline", [pending, healthy])

    assert (status(pending), status(healthy)) == (Node.Status.PENDING, Node.Status.OFFLINE)
    assert not NodeModel.objects.filter(node=healthy).exists()
    messages = texts(response)
    assert "marked offline: 1 node(s)." in messages
    assert any("1 pending node(s) stay pending" in text for text in messages)
    assert not any("unchanged" in text for text in messages)


def test_mark_offline_of_a_pending_node_alone_reports_no_node_marked_offline(admin_client):
    pending = make_node(status=Node.Status.PENDING)
    response = act(admin_client, NODES, "mark_offline", [pending])
    assert status(pending) == Node.Status.PENDING
    assert not any(text.startswith("marked offline: 1 node(s)") for text in texts(response))
    assert any("stay pending" in text for text in texts(response))


def test_a_view_only_operator_cannot_run_node_actions(client, django_user_model):
    from django.contrib.auth.models import Permission

    viewer = django_user_model.objects.create_user("node-viewer", password="x", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_node"))
    client.force_login(viewer)
    node = make_node(status=Node.Status.PENDING)
    act(client, NODES, "approve", [node])
    assert status(node) == Node.Status.PENDING


def test_deregister_asks_for_confirmation_then_deletes_the_node_its_labels_and_replicas(admin_client):
    node = make_node(labels={"zone": "a"})
    make_replica(node, "llama")
    confirm = admin_client.post(NODES, {"action": "delete_selected", ACTION_CHECKBOX_NAME: [str(node.pk)]})
    assert confirm.status_code == 200 and b"Are you sure" in confirm.content
    assert Node.objects.filter(pk=node.pk).exists()
    admin_client.post(NODES, {"action": "delete_selected", ACTION_CHECKBOX_NAME: [str(node.pk)], "post": "yes"})
    assert not Node.objects.filter(pk=node.pk).exists()
    assert not NodeLabel.objects.filter(node_id=node.pk).exists()
    assert not NodeModel.objects.filter(node_id=node.pk).exists()


def test_the_deregister_action_is_labelled_as_such(admin_client):
    make_node()
    response = admin_client.get(NODES)
    assert b"Deregister selected nodes" in response.content


def test_set_max_replicas_shows_a_form_then_sets_the_override(admin_client):
    node = make_node(slots=1)
    form = act(admin_client, NODES, "set_max_replicas", [node])
    assert b"Set max replicas per model" in form.content and b'name="max_replicas_per_model"' in form.content
    act(admin_client, NODES, "set_max_replicas", [node], apply="1", max_replicas_per_model="4")
    node.refresh_from_db()
    assert (node.max_replicas_per_model, node.max_replicas_per_model_manual) == (4, True)
    assert NodeLabel.objects.as_dict(node.pk)["node.replica-slots"] == "4"


def test_set_max_replicas_rejects_zero_and_changes_nothing(admin_client):
    node = make_node(slots=2)
    response = act(admin_client, NODES, "set_max_replicas", [node], apply="1", max_replicas_per_model="0")
    assert b"errorlist" in response.content
    node.refresh_from_db()
    assert node.max_replicas_per_model == 2 and not node.max_replicas_per_model_manual


def test_reset_max_replicas_goes_back_to_the_reported_value(admin_client):
    node = make_node(slots=2)
    Node.objects.set_max_replicas_per_model(node.pk, 5)
    act(admin_client, NODES, "reset_max_replicas", [node])
    node.refresh_from_db()
    assert (node.max_replicas_per_model, node.max_replicas_per_model_manual) == (2, False)


def test_labels_are_edited_on_the_node_page_through_replace(admin_client):
    node = make_node(labels={"zone": "a"})
    url = reverse("admin:registry_node_change", args=[node.pk])
    page = admin_client.get(url)
    formset = page.context["inline_admin_formsets"][0].formset
    data = {
        f"{formset.prefix}-TOTAL_FORMS": "1",
        f"{formset.prefix}-INITIAL_FORMS": "0",
        f"{formset.prefix}-MIN_NUM_FORMS": "0",
        f"{formset.prefix}-MAX_NUM_FORMS": "1000",
        f"{formset.prefix}-0-key": "gpu",
        f"{formset.prefix}-0-value": "a100",
    }
    response = admin_client.post(url, data)
    assert response.status_code == 302, response.content.decode()[:2000]
    # replace(): the posted labels are the node's labels (the zone label was not posted)
    assert NodeLabel.objects.as_dict(node.pk) == {"gpu": "a100"}


# ----- replicas: unload ------------------------------------------------------------------------


class Worker(worker_pb2_grpc.WorkerServicer):
    def __init__(self):
        self.stops = []

    def StopBackend(self, request, context):
        self.stops.append((request.model_name, request.replica_index, dict(context.invocation_metadata())))
        return worker_pb2.StopBackendResponse(stopped=True)


@pytest.fixture
def worker():
    """A real in-process Worker gRPC server; yields (servicer, address)."""
    servicer = Worker()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    grpc_client.close_all_channels()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)
    grpc_client.close_all_channels()


@override_settings(CONTROLPLANE_REGISTRATION_TOKEN=TOKEN)
def test_unload_removes_the_row_then_stops_the_backend_on_a_real_worker(admin_client, worker):
    servicer, address = worker
    node = make_node(address=address)
    replica = make_replica(node, "llama", 1)
    response = act(admin_client, REPLICAS, "unload", [replica])
    assert not NodeModel.objects.filter(pk=replica.pk).exists()
    assert [(model, index) for model, index, _ in servicer.stops] == [("llama", 1)]
    metadata = servicer.stops[0][2]
    # The worker command credential of that node, never the registration token.
    assert metadata["x-node-id"] == str(node.pk)
    assert metadata["authorization"] == f"Bearer {worker_command_token(node.pk)}"
    assert not any("failed" in text for text in texts(response))


def test_unload_on_an_unreachable_worker_removes_the_row_and_warns(admin_client):
    node = make_node(address="127.0.0.1:9")
    replica = make_replica(node, "llama")
    response = act(admin_client, REPLICAS, "unload", [replica])
    assert response.status_code == 200
    assert not NodeModel.objects.filter(pk=replica.pk).exists()
    warnings = [m for m in response.context["messages"] if m.level_tag == "warning"]
    assert warnings and "failed" in str(warnings[0])


# ----- models ----------------------------------------------------------------------------------


def _model_form(**fields):
    return {"min_replicas": "1", "max_replicas": "2", "node_selector": "{}", "placement": "spread", **fields}


def test_a_new_model_config_is_saved_through_upsert(admin_client):
    response = admin_client.post(
        reverse("admin:registry_modelschedulingconfig_add"),
        _model_form(model_name="llama", node_selector='{"gpu": "a100"}'),
    )
    assert response.status_code == 302
    config = ModelSchedulingConfig.objects.get(model_name="llama")
    assert (config.min_replicas, config.max_replicas, config.node_selector) == (1, 2, {"gpu": "a100"})


def test_min_above_max_is_shown_on_the_form_like_the_api_says_it(admin_client):
    config = ModelSchedulingConfig.objects.upsert("llama", min_replicas=1, max_replicas=2)
    url = reverse("admin:registry_modelschedulingconfig_change", args=[config.pk])
    response = admin_client.post(url, _model_form(min_replicas="5", max_replicas="2"))
    assert response.status_code == 200
    assert "must not exceed max_replicas" in response.content.decode()
    assert response.context["adminform"].form.errors["min_replicas"]
    config.refresh_from_db()
    assert (config.min_replicas, config.max_replicas) == (1, 2)


def test_a_bad_selector_is_a_form_error(admin_client):
    response = admin_client.post(
        reverse("admin:registry_modelschedulingconfig_add"), _model_form(model_name="llama", node_selector='{"gpu": 1}')
    )
    assert response.status_code == 200
    assert "node_selector" in response.context["adminform"].form.errors
    assert not ModelSchedulingConfig.objects.exists()


def test_editing_a_config_keeps_the_circuit_breaker_columns(admin_client, now):
    config = ModelSchedulingConfig.objects.upsert("llama", min_replicas=1)
    # The reconciler's verb: a tripped breaker (cooldown until now + 1 min), then two more
    # passes without capacity.
    cooldown = timedelta(minutes=1)
    assert ModelSchedulingConfig.objects.record_unsatisfiable("llama", threshold=1, cooldown=cooldown, now=now)
    for _ in range(2):
        ModelSchedulingConfig.objects.record_unsatisfiable("llama", threshold=5, cooldown=cooldown, now=now)
    url = reverse("admin:registry_modelschedulingconfig_change", args=[config.pk])
    assert admin_client.post(url, _model_form(min_replicas="2", max_replicas="0")).status_code == 302
    config.refresh_from_db()
    assert (config.min_replicas, config.max_replicas) == (2, 0)
    assert (config.unsatisfiable_ticks, config.unsatisfiable_until) == (2, now + cooldown)


def test_reconcile_now_runs_one_pass_and_shows_its_summary(admin_client, monkeypatch):
    from reconciler.reconcile import PassSummary

    calls = []

    def fake_reconcile_once(**kwargs):
        calls.append(kwargs)
        summary = PassSummary(started_at=timezone.now())
        summary.count("replicas_added", 2)
        return summary

    monkeypatch.setattr(reconcile, "reconcile_once", fake_reconcile_once)
    config = ModelSchedulingConfig.objects.upsert("llama", min_replicas=1)
    change = reverse("admin:registry_modelschedulingconfig_change", args=[config.pk])
    response = admin_client.post(
        reverse("admin:registry_modelschedulingconfig_reconcile"), {"next": change}, follow=True
    )
    assert len(calls) == 1
    assert response.redirect_chain[-1][0] == change
    assert any("reconcile pass: ok: 2 replicas_added" in text for text in texts(response))


def test_reconcile_now_for_real_records_a_pass(admin_client):
    make_node()
    response = act(
        admin_client, MODELS, "reconcile_now", [ModelSchedulingConfig.objects.upsert("llama", min_replicas=0)]
    )
    assert ReconcilePass.objects.exists()
    assert any(text.startswith("reconcile pass:") for text in texts(response))


def test_the_dashboards_reconcile_button_runs_a_real_pass_and_comes_back(admin_client):
    make_node()
    dashboard = reverse("admin:fleet_dashboard")
    page = admin_client.get(dashboard).content.decode()
    assert reverse("admin:registry_modelschedulingconfig_reconcile") in page and "No reconcile pass" in page

    response = admin_client.post(
        reverse("admin:registry_modelschedulingconfig_reconcile"), {"next": dashboard}, follow=True
    )

    assert response.redirect_chain[-1][0] == dashboard
    recorded = ReconcilePass.objects.get()
    assert recorded.outcome == ReconcilePass.Outcome.OK
    assert any(text.startswith("reconcile pass: ok") for text in texts(response))
    assert response.context["last_pass"] == recorded


def test_reconcile_now_never_redirects_off_site(admin_client):
    response = admin_client.post(reverse("admin:registry_modelschedulingconfig_reconcile"), {"next": "//evil.example"})
    assert response["Location"] == MODELS
    assert ReconcilePass.objects.count() == 1


def test_reconcile_now_refuses_get(admin_client, monkeypatch):
    monkeypatch.setattr(reconcile, "reconcile_once", lambda **kw: pytest.fail("GET must not reconcile"))
    assert admin_client.get(reverse("admin:registry_modelschedulingconfig_reconcile")).status_code == 302
    assert not ReconcilePass.objects.exists()


def test_deleting_a_config_goes_through_remove(admin_client):
    config = ModelSchedulingConfig.objects.upsert("llama", min_replicas=1)
    admin_client.post(reverse("admin:registry_modelschedulingconfig_delete", args=[config.pk]), {"post": "yes"})
    assert not ModelSchedulingConfig.objects.exists()


def test_deleting_selected_configs_goes_through_remove(admin_client):
    configs = [ModelSchedulingConfig.objects.upsert(name, min_replicas=1) for name in ("llama", "whisper")]
    act(admin_client, MODELS, "delete_selected", configs, post="yes")
    assert not ModelSchedulingConfig.objects.exists()


# ----- API keys --------------------------------------------------------------------------------


def test_the_plaintext_key_is_shown_once_at_creation_and_never_again(admin_client):
    response = admin_client.post(reverse("admin:controlplane_apikey_add"), {"name": "frontend-a", "role": "frontend"})
    assert response.status_code == 200
    key = ApiKey.objects.get(name="frontend-a")
    plaintext = response.context["plaintext"]
    html = response.content.decode()
    assert html.count(plaintext) == 1
    assert ApiKey.objects.authenticate(plaintext) == key
    assert "no-store" in response["Cache-Control"]
    for url in (KEYS, reverse("admin:controlplane_apikey_change", args=[key.pk])):
        page = admin_client.get(url).content.decode()
        assert plaintext not in page and plaintext[len(key.prefix) :] not in page
        assert key.prefix in page
    # not kept in the session or a cookie either
    assert plaintext not in str(dict(admin_client.session)) and plaintext not in str(admin_client.cookies)


def test_revoke_action_revokes_the_key(admin_client):
    key, plaintext = ApiKey.objects.create_key("frontend-b", "frontend")
    act(admin_client, KEYS, "revoke", [key])
    key.refresh_from_db()
    assert key.revoked_at is not None
    assert ApiKey.objects.authenticate(plaintext) is None


def test_api_keys_cannot_be_deleted_only_revoked(admin_client):
    key, plaintext = ApiKey.objects.create_key("frontend-c", "frontend")
    url = reverse("admin:controlplane_apikey_delete", args=[key.pk])
    assert admin_client.get(url).status_code == 403
    assert admin_client.post(url, {"post": "yes"}).status_code == 403
    assert ApiKey.objects.authenticate(plaintext) == key


def test_renaming_a_key_keeps_its_role_and_secret(admin_client):
    key, plaintext = ApiKey.objects.create_key("frontend-d", "frontend")
    url = reverse("admin:controlplane_apikey_change", args=[key.pk])
    assert admin_client.post(url, {"name": "frontend-renamed", "role": "operator"}).status_code == 302
    key.refresh_from_db()
    assert (key.name, key.role) == ("frontend-renamed", "frontend")
    assert ApiKey.objects.authenticate(plaintext) == key


def test_the_model_page_lists_revisions_and_rolls_back_to_one(admin_client):
    from registry.models import ModelRevision

    ModelLoadInfo.objects.upsert("llama", "llama-cpp", b"\n\x05llama")
    config = ModelSchedulingConfig.objects.upsert("llama", min_replicas=1)
    change = reverse("admin:registry_modelschedulingconfig_change", args=[config.pk])
    assert admin_client.post(change, _model_form(min_replicas="2", max_replicas="0")).status_code == 302
    page = admin_client.get(change).content.decode()
    assert "Roll back to 2" in page and "Roll back to 3" not in page and "(current)" in page
    assert ModelRevision.objects.head("llama").created_by == "admin"

    rollback = reverse("admin:registry_modelschedulingconfig_rollback", args=[config.pk])
    response = admin_client.post(rollback, {"revision": "2"}, follow=True)

    assert response.redirect_chain[-1][0] == change
    assert any("rolled back to revision 2 as revision 4" in text for text in texts(response))
    assert ModelSchedulingConfig.objects.get(model_name="llama").min_replicas == 1
    refused = admin_client.post(rollback, {"revision": "99"}, follow=True)
    assert any(text.startswith("rollback refused") for text in texts(refused))
    assert ModelRevision.objects.head("llama").number == 4
