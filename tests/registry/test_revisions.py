"""Config revisions: every change of a model's load info or scheduling config is numbered,
kept, and can be rolled back; replicas carry the revision they were loaded from."""

import pytest
from django.core.exceptions import ValidationError

from registry.models import Lease, ModelLoadInfo, ModelRevision, ModelSchedulingConfig, NodeModel
from tests.concurrency import THREADS, run_in_threads
from tests.factories import make_node

BLOB_A = b"\x0a\x05llama"
BLOB_B = b"\x0a\x05llama\x10\x01"


@pytest.mark.django_db
class TestRevisions:
    def test_first_load_info_is_revision_one_and_the_same_recipe_again_makes_none(self, now):
        ModelLoadInfo.objects.upsert("llama", "llama-cpp", BLOB_A, now=now)
        ModelLoadInfo.objects.upsert("llama", "llama-cpp", BLOB_A, now=now)

        head = ModelRevision.objects.head("llama")
        assert (head.number, head.backend_type, bytes(head.model_opts_blob)) == (1, "llama-cpp", BLOB_A)
        assert head.scheduling is None and head.has_load_info
        assert ModelRevision.objects.filter(model_name="llama").count() == 1

    def test_changes_of_recipe_and_config_each_make_the_next_revision(self, now):
        ModelLoadInfo.objects.upsert("llama", "llama-cpp", BLOB_A, now=now)
        ModelSchedulingConfig.objects.upsert("llama", min_replicas=2, created_by="alice")
        ModelLoadInfo.objects.upsert("llama", "llama-cpp", BLOB_B, now=now)

        revisions = list(ModelRevision.objects.filter(model_name="llama").order_by("number"))
        assert [r.number for r in revisions] == [1, 2, 3]
        assert [r.is_current for r in revisions] == [False, False, True]
        assert revisions[1].scheduling["min_replicas"] == 2 and revisions[1].created_by == "alice"
        assert revisions[1].reason == "scheduling config changed"
        assert bytes(revisions[2].model_opts_blob) == BLOB_B and revisions[2].scheduling["min_replicas"] == 2

    def test_replica_count_is_not_part_of_the_template_but_the_selector_and_recipe_are(self, now):
        ModelLoadInfo.objects.upsert("llama", "llama-cpp", BLOB_A, now=now)
        first = ModelRevision.objects.head("llama")
        ModelSchedulingConfig.objects.upsert("llama", min_replicas=3)
        scaled = ModelRevision.objects.head("llama")
        ModelSchedulingConfig.objects.upsert("llama", min_replicas=3, node_selector={"gpu": "a100"})
        moved = ModelRevision.objects.head("llama")
        ModelLoadInfo.objects.upsert("llama", "llama-cpp", BLOB_B, now=now)
        changed = ModelRevision.objects.head("llama")

        assert scaled.template_digest == first.template_digest
        assert len({first.template_digest, moved.template_digest, changed.template_digest}) == 3

    def test_an_unchanged_scheduling_upsert_makes_no_revision(self):
        ModelSchedulingConfig.objects.upsert("llama", min_replicas=1)
        ModelSchedulingConfig.objects.upsert("llama", min_replicas=1)
        assert ModelRevision.objects.filter(model_name="llama").count() == 1

    def test_an_invalid_config_makes_no_revision(self):
        with pytest.raises(ValidationError):
            ModelSchedulingConfig.objects.upsert("llama", min_replicas=3, max_replicas=1)
        assert not ModelRevision.objects.filter(model_name="llama").exists()

    def test_rollback_restores_an_old_revision_as_a_new_number(self, now):
        ModelLoadInfo.objects.upsert("llama", "llama-cpp", BLOB_A, now=now)
        ModelSchedulingConfig.objects.upsert("llama", min_replicas=1)
        ModelLoadInfo.objects.upsert("llama", "vllm", BLOB_B, now=now)
        ModelSchedulingConfig.objects.upsert("llama", min_replicas=2)

        revision = ModelRevision.objects.rollback("llama", 2, created_by="bob")

        assert (revision.number, revision.reason, revision.created_by) == (5, "rollback to revision 2", "bob")
        info = ModelLoadInfo.objects.for_model("llama")
        assert (info.backend_type, info.model_opts_blob) == ("llama-cpp", BLOB_A)
        assert ModelSchedulingConfig.objects.get(model_name="llama").min_replicas == 1
        assert revision.template_digest == ModelRevision.objects.get(model_name="llama", number=2).template_digest

    def test_rollback_to_the_current_or_an_unknown_revision_is_refused(self, now):
        ModelLoadInfo.objects.upsert("llama", "llama-cpp", BLOB_A, now=now)
        with pytest.raises(ValueError):
            ModelRevision.objects.rollback("llama", 1)
        with pytest.raises(ModelRevision.DoesNotExist):
            ModelRevision.objects.rollback("llama", 7)
        assert ModelRevision.objects.filter(model_name="llama").count() == 1

    def test_claimed_and_reported_replicas_carry_their_revision(self, now):
        node = make_node()
        ModelLoadInfo.objects.upsert("llama", "llama-cpp", BLOB_A, now=now)
        claimed = NodeModel.objects.claim_loading(node.pk, "llama", slots=4, revision=1, now=now)
        reported = NodeModel.objects.report_loaded(
            node.pk, "llama", 1, address="h:1", backend_type="llama-cpp", opts_blob=BLOB_B, now=now
        )
        given = NodeModel.objects.report_loaded(
            node.pk, "llama", 2, address="h:2", backend_type="llama-cpp", opts_blob=BLOB_B, revision=1, now=now
        )

        assert claimed.revision == 1
        assert reported.revision == 2  # its recipe became revision 2 before the row was written
        assert given.revision == 1

    def test_warm_pick_skips_a_draining_replica(self, now):
        node = make_node()
        NodeModel.objects.record_loaded(node.pk, "llama", 0, address="h:0", now=now)
        NodeModel.objects.record_loaded(node.pk, "llama", 1, address="h:1", now=now)
        draining = NodeModel.objects.get(replica_index=0)
        assert NodeModel.objects.start_draining(draining.pk, now=now)

        picks = {NodeModel.objects.warm_pick("llama", now=now).replica_index for _ in range(3)}
        leases = {Lease.objects.pick_and_grant("llama", ttl=60, now=now).replica_index for _ in range(3)}
        assert picks == leases == {1}


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
class TestRevisionsConcurrently:
    def test_concurrent_changes_make_distinct_consecutive_numbers(self, close_thread_connections):
        ModelLoadInfo.objects.upsert("llama", "llama-cpp", b"start")

        def change(i):
            if i % 2:
                return ModelLoadInfo.objects.upsert("llama", "llama-cpp", f"blob-{i}".encode())
            return ModelSchedulingConfig.objects.upsert("llama", min_replicas=i + 1)

        run_in_threads(change, close_thread_connections)

        numbers = sorted(ModelRevision.objects.filter(model_name="llama").values_list("number", flat=True))
        assert numbers == list(range(1, THREADS + 2))
        assert ModelRevision.objects.filter(model_name="llama", is_current=True).count() == 1
        # Each revision snapshots the rows as its change left them: the head is what is stored.
        head = ModelRevision.objects.head("llama")
        info = ModelLoadInfo.objects.for_model("llama")
        config = ModelSchedulingConfig.objects.get(model_name="llama")
        assert bytes(head.model_opts_blob) == info.model_opts_blob
        assert head.scheduling["min_replicas"] == config.min_replicas

    def test_concurrent_first_changes_of_a_model_retry_to_consecutive_numbers(self, close_thread_connections):
        run_in_threads(
            lambda i: ModelLoadInfo.objects.upsert("fresh", "llama-cpp", f"blob-{i}".encode()),
            close_thread_connections,
        )
        numbers = sorted(ModelRevision.objects.filter(model_name="fresh").values_list("number", flat=True))
        assert numbers == list(range(1, THREADS + 1))


@pytest.mark.django_db(transaction=True)  # migrating backwards (SQLite: outside a transaction)
def test_the_migration_gives_every_existing_model_revision_one_and_stamps_its_replicas():
    from django.core.management import call_command
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    before = [("registry", "0005_placement_budget_disk_spread")]
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    old = executor.loader.project_state(before).apps
    node = old.get_model("registry", "Node").objects.create(name="gpu-a")
    old.get_model("registry", "ModelLoadInfo").objects.create(
        model_name="llama", backend_type="llama-cpp", model_opts_blob=BLOB_A, updated_at="2026-11-26T12:00:00Z"
    )
    old.get_model("registry", "ModelSchedulingConfig").objects.create(model_name="phi", min_replicas=2)
    old.get_model("registry", "NodeModel").objects.create(node_id=node.pk, model_name="llama", state="loaded")

    call_command("migrate", verbosity=0)

    llama, phi = ModelRevision.objects.head("llama"), ModelRevision.objects.head("phi")
    assert (llama.number, bytes(llama.model_opts_blob), llama.scheduling) == (1, BLOB_A, None)
    assert (phi.number, phi.has_load_info, phi.scheduling["min_replicas"]) == (1, False, 2)
    assert NodeModel.objects.get(model_name="llama").revision == 1
    # The digests are the manager's: the same recipe stored again makes no revision.
    ModelLoadInfo.objects.upsert("llama", "llama-cpp", BLOB_A)
    assert ModelRevision.objects.filter(model_name="llama").count() == 1


@pytest.mark.django_db
def test_removing_the_config_is_a_revision_and_a_rollback_brings_it_back():
    ModelSchedulingConfig.objects.upsert("llama", min_replicas=2)
    assert ModelSchedulingConfig.objects.remove("llama")
    assert not ModelSchedulingConfig.objects.remove("llama")  # nothing left: no revision either

    head = ModelRevision.objects.head("llama")
    assert (head.number, head.scheduling, head.reason) == (2, None, "scheduling config removed")
    ModelRevision.objects.rollback("llama", 1)
    assert ModelSchedulingConfig.objects.get(model_name="llama").min_replicas == 2
