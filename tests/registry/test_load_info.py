"""The per-model load-info fix (LocalAI PR #9981): per-model load info outlives every replica row."""

from datetime import timedelta

import pytest

from registry.models import ModelLoadInfo, Node, NodeModel
from tests.factories import make_node, make_replica

pytestmark = pytest.mark.django_db

BLOB_A = b"\x0a\x05llama\x10\x80\x10"  # Model="llama", ContextSize=2048
BLOB_B = b"\x0a\x05llama\x10\x80\x20"  # Model="llama", ContextSize=4096


def test_per_model_row_survives_removing_every_replica_row(now):
    node = make_node()
    make_replica(node, "llama", 0, backend_type="llama-cpp", model_opts_blob=BLOB_A)
    make_replica(node, "llama", 1, backend_type="llama-cpp", model_opts_blob=BLOB_A)
    ModelLoadInfo.objects.upsert("llama", "llama-cpp", BLOB_A, now=now)

    NodeModel.objects.remove_replica(node.pk, "llama", 0)
    NodeModel.objects.remove_replica(node.pk, "llama", 1)

    assert not NodeModel.objects.for_model("llama").exists()
    info = ModelLoadInfo.objects.for_model("llama")
    assert (info.backend_type, info.model_opts_blob, info.source) == ("llama-cpp", BLOB_A, "model")


def test_mark_offline_clears_replica_rows_but_not_load_info(now):
    node = make_node()
    make_replica(node, "llama", 0)
    ModelLoadInfo.objects.upsert("llama", "llama-cpp", BLOB_A, now=now)

    assert Node.objects.mark_offline(node.pk)

    node.refresh_from_db()
    assert node.status == Node.Status.OFFLINE
    assert not NodeModel.objects.filter(node=node).exists()
    assert ModelLoadInfo.objects.for_model("llama").model_opts_blob == BLOB_A


def test_second_upsert_replaces_backend_type_and_blob_and_refreshes_updated_at(now):
    ModelLoadInfo.objects.upsert("llama", "llama-cpp", BLOB_A, now=now)
    ModelLoadInfo.objects.upsert("llama", "vllm", BLOB_B, now=now + timedelta(minutes=1))

    assert ModelLoadInfo.objects.filter(model_name="llama").count() == 1
    info = ModelLoadInfo.objects.for_model("llama")
    assert (info.backend_type, info.model_opts_blob) == ("vllm", BLOB_B)
    assert info.updated_at == now + timedelta(minutes=1)


def test_legacy_fallback_reads_first_loaded_replica_row_with_a_blob(now):
    node = make_node()
    make_replica(node, "llama", 0, state=NodeModel.State.LOADING, backend_type="x", model_opts_blob=b"loading")
    make_replica(node, "llama", 1, backend_type="", model_opts_blob=b"")
    make_replica(node, "llama", 2, backend_type="llama-cpp", model_opts_blob=BLOB_A)

    info = ModelLoadInfo.objects.for_model("llama")

    assert info.source == ModelLoadInfo.Source.REPLICA
    assert (info.backend_type, info.model_opts_blob) == ("llama-cpp", BLOB_A)
    assert info.pk is None  # built from the replica row, never written


def test_per_model_row_wins_over_replica_rows(now):
    node = make_node()
    make_replica(node, "llama", 0, backend_type="old", model_opts_blob=BLOB_B)
    ModelLoadInfo.objects.upsert("llama", "llama-cpp", BLOB_A, now=now)

    assert ModelLoadInfo.objects.for_model("llama").backend_type == "llama-cpp"


def test_not_found_when_neither_source_exists():
    node = make_node()
    make_replica(node, "llama", 0)  # a loaded row without a blob does not count

    with pytest.raises(ModelLoadInfo.DoesNotExist):
        ModelLoadInfo.objects.for_model("llama")


@pytest.mark.parametrize("name", ["", "   "])
def test_empty_model_name_is_rejected(name):
    with pytest.raises(ValueError):
        ModelLoadInfo.objects.upsert(name, "llama-cpp", BLOB_A)
    assert not ModelLoadInfo.objects.exists()


def test_no_removal_path_touches_load_info(now):
    node = make_node(slots=3)
    for index in range(3):
        make_replica(node, "llama", index)
    ModelLoadInfo.objects.upsert("llama", "llama-cpp", BLOB_A, now=now)

    NodeModel.objects.remove_replica(node.pk, "llama", 2)
    NodeModel.objects.forget_node_replicas(node.pk)
    Node.objects.register(name=node.name, address=node.address, presented_node_token=node.token)
    Node.objects.mark_draining(node.pk, by=Node.DrainedBy.OPERATOR)
    Node.objects.mark_offline(node.pk)
    Node.objects.deregister(node.pk)

    assert ModelLoadInfo.objects.for_model("llama").model_opts_blob == BLOB_A


def test_upsert_of_the_current_recipe_is_two_statements(django_assert_num_queries, now):
    """The common path (every frontend load stores the recipe it used): one read of the current
    revision's digest, one upsert. Only a changed recipe takes the revision path."""
    ModelLoadInfo.objects.upsert("llama", "llama-cpp", BLOB_A, now=now)
    ModelLoadInfo.objects.upsert("phi", "vllm", BLOB_B, now=now)
    with django_assert_num_queries(2):
        ModelLoadInfo.objects.upsert("llama", "llama-cpp", BLOB_A, now=now)
    with django_assert_num_queries(2):
        ModelLoadInfo.objects.upsert("phi", "vllm", BLOB_B, now=now)
