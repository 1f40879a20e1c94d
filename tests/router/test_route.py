"""route() and schedule_and_load() against real gRPC servers (in-process fake workers and
backends): warm path order and probes, cold loads through a load job, failed loads, eviction,
load info written by the load path."""

from datetime import timedelta

import grpc
import pytest
from django.utils import timezone

from core.credentials import backend_token, worker_command_token
from proto import backend_pb2
from registry import router
from registry.models import Lease, LoadFailure, LoadJob, ModelLoadInfo, ModelSchedulingConfig, Node, NodeModel
from tests.factories import GIB, make_node, make_replica, make_scheduling

from .conftest import options_blob

pytestmark = pytest.mark.django_db

BLOB = options_blob("llama.gguf", ContextSize=4096)


def live_replica(fleet, node, model="llama", index=0, *, minutes_ago=0, probed=True, **fields):
    """A loaded replica row whose address is a live fake backend."""
    backend, address = fleet.backend_server()
    now = timezone.now()
    row = make_replica(
        node,
        model,
        index,
        address=address,
        last_used=now - timedelta(minutes=minutes_ago),
        last_probe_at=now if probed else now - timedelta(minutes=5),
        **fields,
    )
    return row, backend


# --- cold path ---------------------------------------------------------------------------------


def test_a_cold_route_loads_the_model_once_and_leases_the_new_replica(fleet):
    gpu = fleet.add_node("gpu-1")

    result = router.route("llama", backend_type="llama-cpp", opts_blob=BLOB)

    assert result.ready and result.node_name == "gpu-1"
    replica = NodeModel.objects.get()
    assert (replica.node_id, replica.state, replica.in_flight) == (gpu.node.pk, "loaded", 1)
    assert result.lease.replica_id == replica.pk and result.lease.address == replica.address
    assert gpu.worker.count("StartBackend") == 1
    start = gpu.worker.calls[0][1]
    assert (start.model_name, start.backend_type, start.replica_index) == ("llama", "llama-cpp", 0)
    assert gpu.worker.load_requests == [BLOB]  # the stored bytes, untouched
    job = LoadJob.objects.get()
    assert (job.state, job.node_id, job.replica_id, job.attempts) == ("succeeded", gpu.node.pk, replica.pk, 1)


def test_a_successful_load_writes_both_load_info_copies_and_they_survive_losing_every_replica(fleet):
    gpu = fleet.add_node("gpu-1")
    router.route("llama", backend_type="llama-cpp", opts_blob=BLOB)
    replica = NodeModel.objects.get()
    assert (replica.backend_type, bytes(replica.model_opts_blob)) == ("llama-cpp", BLOB)

    Node.objects.mark_offline(gpu.node.pk)  # LocalAI's restart bug: every replica row goes

    assert not NodeModel.objects.exists()
    info = ModelLoadInfo.objects.for_model("llama")
    assert (info.source, info.backend_type, info.model_opts_blob) == ("model", "llama-cpp", BLOB)


def test_the_reconciler_path_loads_from_stored_load_info(fleet):
    gpu = fleet.add_node("gpu-1")
    ModelLoadInfo.objects.upsert("llama", "vllm", BLOB)

    replica = router.schedule_and_load("llama", [gpu.node.pk])

    assert (replica.state, replica.node_id) == ("loaded", gpu.node.pk)
    assert gpu.worker.calls[0][1].backend_type == "vllm"
    assert gpu.worker.load_requests == [BLOB]


def test_a_reused_backend_that_proves_it_holds_the_model_is_adopted_not_loaded_twice(fleet):
    """The takeover case: a runner died after its LoadModel reached the backend; the backend
    finished loading, the worker hands the same process back, and it proves which model it holds
    (TokenizeString with ModelIdentity answers OK)."""
    gpu = fleet.add_node("gpu-1")
    ModelLoadInfo.objects.upsert("llama", "vllm", BLOB)
    router.schedule_and_load("llama", [gpu.node.pk])
    NodeModel.objects.remove_replica(gpu.node.pk, "llama", 0)  # the row is gone, the process lives on

    replica = router.schedule_and_load("llama", [gpu.node.pk])

    assert replica.state == "loaded"
    assert gpu.worker.count("StartBackend") == 2
    assert gpu.worker.load_requests == [BLOB]  # one LoadModel in all
    assert gpu.worker.backend("llama").tokenize_identities == ["llama.gguf"]  # the proof named the model


def test_a_reused_backend_without_a_model_is_loaded_although_its_status_says_ready(fleet):
    """A runner died after StartBackend and before LoadModel: the process is up, idle and empty,
    and answers Status READY as LocalAI's backends do. Adopting it would route every request to a
    backend that fails them with FAILED_PRECONDITION."""
    from proto import backend_pb2, client

    gpu = fleet.add_node("gpu-1")
    ModelLoadInfo.objects.upsert("llama", "vllm", BLOB)
    started = client.start_backend(
        gpu.address, "llama", "vllm", 0, node_id=str(gpu.node.pk), token=worker_command_token(gpu.node.pk)
    )  # running, empty
    assert client.status(started.address, token=backend_token(gpu.node.pk)).state == backend_pb2.StatusResponse.READY

    replica = router.schedule_and_load("llama", [gpu.node.pk])

    assert replica.state == "loaded"
    assert gpu.worker.calls[-1][1].replica_index == 0
    assert gpu.worker.load_requests == [BLOB]


def test_a_reused_backend_holding_another_model_is_loaded_with_this_one(fleet):
    """The process of this (model, replica) loaded other options (the load info changed since):
    the identity check answers NOT_FOUND, so the new options are loaded into it."""
    from proto import client

    gpu = fleet.add_node("gpu-1")
    old = options_blob("llama-old.gguf")
    started = client.start_backend(
        gpu.address, "llama", "vllm", 0, node_id=str(gpu.node.pk), token=worker_command_token(gpu.node.pk)
    )
    assert client.load_model(started.address, old, token=backend_token(gpu.node.pk)) == (
        True,
        "loaded",
    )  # a loader that died before recording it
    ModelLoadInfo.objects.upsert("llama", "vllm", BLOB)

    replica = router.schedule_and_load("llama", [gpu.node.pk])

    assert replica.state == "loaded"
    assert gpu.worker.load_requests == [old, BLOB]
    assert gpu.worker.backend("llama").identity == "llama.gguf"


def test_a_reused_backend_that_cannot_prove_anything_is_loaded_again(fleet):
    """A backend without TokenizeString (UNIMPLEMENTED) can never prove what it holds: loading
    again costs a reload, adopting an empty process would fail every request."""
    gpu = fleet.add_node("gpu-1", tokenize=False)
    ModelLoadInfo.objects.upsert("llama", "vllm", BLOB)
    router.schedule_and_load("llama", [gpu.node.pk])
    NodeModel.objects.remove_replica(gpu.node.pk, "llama", 0)

    replica = router.schedule_and_load("llama", [gpu.node.pk])

    assert replica.state == "loaded"
    assert gpu.worker.load_requests == [BLOB, BLOB]


def test_options_without_a_model_name_are_never_adopted(fleet):
    """No ``Model`` = no identity to prove (a backend skips the check for an empty identity, so an
    OK would prove nothing): the reused process is loaded again, without asking it."""
    gpu = fleet.add_node("gpu-1")
    nameless = options_blob("", ContextSize=4096)
    ModelLoadInfo.objects.upsert("llama", "vllm", nameless)
    router.schedule_and_load("llama", [gpu.node.pk])
    NodeModel.objects.remove_replica(gpu.node.pk, "llama", 0)

    router.schedule_and_load("llama", [gpu.node.pk])

    assert gpu.worker.load_requests == [nameless, nameless]
    assert gpu.worker.backend("llama").tokenize_identities == []


def test_without_options_or_load_info_nothing_is_attempted(fleet):
    gpu = fleet.add_node("gpu-1")

    with pytest.raises(router.NoLoadInfo) as raised:
        router.route("llama")
    with pytest.raises(router.NoLoadInfo):
        router.schedule_and_load("llama")

    assert raised.value.code == "no_load_info" and raised.value.status == 409
    assert not LoadJob.objects.exists() and gpu.worker.calls == []


def test_options_given_to_route_are_stored_even_when_a_warm_replica_answers(fleet):
    gpu = fleet.add_node("gpu-1")
    live_replica(fleet, gpu.node)

    router.route("llama", backend_type="vllm", opts_blob=BLOB)

    info = ModelLoadInfo.objects.for_model("llama")
    assert (info.backend_type, info.model_opts_blob) == ("vllm", BLOB)


def test_garbage_options_are_refused_before_anything_is_stored(fleet):
    fleet.add_node("gpu-1")
    from proto.codec import InvalidModelOptions

    with pytest.raises(InvalidModelOptions):
        router.route("llama", backend_type="x", opts_blob=b"\xff\xff\xff")
    assert not ModelLoadInfo.objects.exists()


def test_a_selector_that_matches_no_healthy_node_is_a_typed_error(fleet):
    fleet.add_node("gpu-1", labels={"zone": "a"})
    make_scheduling("llama", node_selector={"zone": "b"})

    with pytest.raises(router.NoMatchingNodes) as raised:
        router.route("llama", backend_type="x", opts_blob=BLOB)
    assert raised.value.code == "no_matching_nodes"


def test_no_healthy_node_at_all_is_no_matching_nodes(fleet):
    gpu = fleet.add_node("gpu-1")
    Node.objects.mark_unhealthy(gpu.node.pk)

    with pytest.raises(router.NoMatchingNodes):
        router.route("llama", backend_type="x", opts_blob=BLOB)


def test_the_selector_decides_where_a_model_is_loaded(fleet):
    fleet.add_node("gpu-a", labels={"zone": "a"})
    zone_b = fleet.add_node("gpu-b", labels={"zone": "b"})
    make_scheduling("llama", node_selector={"zone": "b"})

    result = router.route("llama", backend_type="x", opts_blob=BLOB)

    assert result.lease.node_id == zone_b.node.pk


def test_capacity_exhausted_when_every_slot_holds_a_row_of_the_model(fleet):
    gpu = fleet.add_node("gpu-1", slots=1)
    make_replica(gpu.node, "llama", 0, state=NodeModel.State.LOADING)  # another loader's row

    with pytest.raises(router.CapacityExhausted) as raised:
        router.route("llama", backend_type="x", opts_blob=BLOB)

    assert raised.value.code == "capacity_exhausted"
    assert LoadJob.objects.get().error_code == "capacity_exhausted"
    assert gpu.worker.calls == []


def test_after_its_wait_budget_a_caller_gets_the_pending_job_and_the_job_is_queued(fleet, settings):
    from django_q.models import OrmQ

    settings.CONTROLPLANE_LOAD_JOB_RUNNER = "qcluster"
    fleet.add_node("gpu-1")

    result = router.route("llama", backend_type="x", opts_blob=BLOB, wait=0.2)

    assert not result.ready
    assert result.load_job.state == "pending"
    assert OrmQ.objects.count() == 1
    # A second caller attaches to the same job and does not queue another.
    again = router.route("llama", wait=0)
    assert again.load_job.pk == result.load_job.pk
    assert OrmQ.objects.count() == 1


# --- failed loads --------------------------------------------------------------------------------


def test_a_failed_load_leaves_no_loading_row_no_reservation_and_the_retry_goes_elsewhere(fleet):
    blob = options_blob("llama.gguf", vram=4 * GIB)
    first = fleet.add_node("gpu-a", load_success=False, load_message="out of memory")
    second = fleet.add_node("gpu-b")

    with pytest.raises(router.LoadFailed) as raised:
        router.route("llama", backend_type="x", opts_blob=blob)

    assert raised.value.code == "load_failed" and "out of memory" in raised.value.message
    assert first.worker.load_requests == [blob]
    assert not NodeModel.objects.exists()
    assert list(Node.objects.values_list("reserved_vram", flat=True)) == [0, 0]
    assert first.worker.count("StopBackend") == 1  # the failed backend process is stopped
    failure = LoadFailure.objects.get()
    assert (failure.node_id, failure.failures) == (first.node.pk, 1)
    assert LoadJob.objects.get().state == "failed"

    result = router.route("llama")

    assert result.lease.node_id == second.node.pk
    assert second.worker.load_requests == [blob]
    assert first.worker.count("StartBackend") == 1  # not retried on the failing node


def test_a_start_backend_error_is_a_load_failure_with_cleanup(fleet):
    gpu = fleet.add_node("gpu-1")
    gpu.worker.start_error = grpc.StatusCode.INTERNAL

    with pytest.raises(router.LoadFailed):
        router.schedule_and_load("llama", backend_type="x", opts_blob=BLOB)

    assert not NodeModel.objects.exists()
    assert LoadFailure.objects.filter(node=gpu.node).exists()


def test_an_unreachable_worker_is_a_load_failure(fleet, closed_address):
    fleet.add_node("gpu-1")
    make_node(name="gpu-1", address=closed_address)  # re-registered where nothing answers any more

    with pytest.raises(router.LoadFailed):
        router.schedule_and_load("llama", backend_type="x", opts_blob=BLOB)
    assert not NodeModel.objects.exists()


def test_a_row_removed_during_the_load_is_not_marked_loaded(fleet, monkeypatch):
    gpu = fleet.add_node("gpu-1")
    original = router.client.load_model

    def load_then_lose_the_node(*args, **kwargs):
        answer = original(*args, **kwargs)
        Node.objects.mark_offline(gpu.node.pk)  # e.g. the worker restarted meanwhile
        return answer

    monkeypatch.setattr(router.client, "load_model", load_then_lose_the_node)

    with pytest.raises(router.LoadFailed, match="removed during the load"):
        router.schedule_and_load("llama", backend_type="x", opts_blob=BLOB)
    assert not NodeModel.objects.exists()


# --- placement strategy ------------------------------------------------------------------------


@pytest.mark.parametrize(("strategy", "expected"), [("spread", "gpu-b"), ("binpack", "gpu-a")])
def test_spread_places_a_second_replica_on_another_node_and_binpack_next_to_the_first(fleet, strategy, expected):
    a = fleet.add_node("gpu-a", slots=2)
    fleet.add_node("gpu-b", slots=2)
    ModelSchedulingConfig.objects.upsert("llama", placement=strategy)
    router.schedule_and_load("llama", [a.node.pk], backend_type="x", opts_blob=BLOB)

    second = router.schedule_and_load("llama", backend_type="x", opts_blob=BLOB)

    assert second.node.name == expected


def test_a_second_replica_on_the_same_node_takes_the_next_index(fleet):
    gpu = fleet.add_node("gpu-1", slots=3)
    make_replica(gpu.node, "llama", 0, address="127.0.0.1:1")

    replica = router.schedule_and_load("llama", backend_type="x", opts_blob=BLOB)

    assert replica.replica_index == 1
    assert gpu.worker.calls[0][1].replica_index == 1


# --- warm path ----------------------------------------------------------------------------------


def test_the_warm_path_prefers_the_least_busy_then_the_least_recently_used_replica(fleet):
    a, b = fleet.add_node("gpu-a"), fleet.add_node("gpu-b")
    old, _ = live_replica(fleet, a.node, minutes_ago=10)
    new, _ = live_replica(fleet, b.node, minutes_ago=1)

    first = router.route("llama")
    second = router.route("llama")  # `old` now has a request in flight

    assert (first.lease.replica_id, second.lease.replica_id) == (old.pk, new.pk)
    assert (first.node_name, second.node_name) == ("gpu-a", "gpu-b")


def test_released_leases_make_the_warm_path_round_robin(fleet):
    a, b = fleet.add_node("gpu-a"), fleet.add_node("gpu-b")
    live_replica(fleet, a.node, minutes_ago=10)
    live_replica(fleet, b.node, minutes_ago=5)

    picks = []
    for _ in range(4):
        result = router.route("llama")
        picks.append(result.node_name)
        Lease.objects.release(result.lease.pk)

    assert picks == ["gpu-a", "gpu-b", "gpu-a", "gpu-b"]
    assert list(NodeModel.objects.values_list("in_flight", flat=True)) == [0, 0]


def test_a_recently_confirmed_replica_is_not_probed_again(fleet):
    gpu = fleet.add_node("gpu-1")
    _, backend = live_replica(fleet, gpu.node, probed=True)

    router.route("llama")

    assert backend.health_calls == 0


def test_a_confirmed_replica_is_probed_again_once_its_node_stops_heartbeating(fleet, settings):
    """A dead worker stops heartbeating at once; its replicas lose the probe cache after two
    heartbeat intervals instead of being routed to until the cache or the reaper catches up."""
    settings.HEARTBEAT_INTERVAL = 10
    gpu = fleet.add_node("gpu-1")
    _, backend = live_replica(fleet, gpu.node, probed=True)
    Node.objects.heartbeat(gpu.node.pk, now=timezone.now() - timedelta(seconds=21))  # its last one

    router.route("llama")

    assert backend.health_calls == 1


def test_a_replica_not_confirmed_for_30_seconds_is_probed_and_the_cache_refreshed(fleet):
    gpu = fleet.add_node("gpu-1")
    row, backend = live_replica(fleet, gpu.node, probed=False)

    router.route("llama")
    router.route("llama")

    assert backend.health_calls == 1
    row.refresh_from_db()
    assert timezone.now() - row.last_probe_at < timedelta(seconds=5)


def test_an_unreachable_replica_is_removed_and_the_request_rerouted(fleet, closed_address):
    a, b = fleet.add_node("gpu-a"), fleet.add_node("gpu-b")
    now = timezone.now()
    dead = make_replica(
        a.node,
        "llama",
        0,
        address=closed_address,
        last_used=now - timedelta(hours=1),
        last_probe_at=now - timedelta(hours=1),
    )
    alive, _ = live_replica(fleet, b.node, probed=False)

    result = router.route("llama")

    assert result.lease.replica_id == alive.pk
    assert not NodeModel.objects.filter(pk=dead.pk).exists()
    assert Lease.objects.live().count() == 1  # the lease on the dead replica was released
    assert NodeModel.objects.get(pk=alive.pk).in_flight == 1


def test_when_every_replica_is_unreachable_the_model_is_loaded_fresh(fleet, closed_address):
    gpu = fleet.add_node("gpu-1")
    old = timezone.now() - timedelta(hours=1)
    make_replica(gpu.node, "llama", 0, address=closed_address, last_probe_at=old)
    ModelLoadInfo.objects.upsert("llama", "x", BLOB)

    result = router.route("llama")

    assert result.ready and result.lease.address != closed_address
    assert gpu.worker.count("StartBackend") == 1


def test_a_busy_replica_counts_as_alive_but_is_not_marked_confirmed(fleet):
    gpu = fleet.add_node("gpu-1")
    row, backend = live_replica(fleet, gpu.node, probed=False)
    backend.knobs.health = "busy"  # Health blocks past the 0.5 s probe deadline

    result = router.route("llama")

    assert result.lease.replica_id == row.pk
    assert backend.health_calls == 1
    assert NodeModel.objects.get(pk=row.pk).last_probe_at == row.last_probe_at


def test_replicas_on_unhealthy_or_draining_nodes_are_not_routed_to(fleet):
    a, b = fleet.add_node("gpu-a"), fleet.add_node("gpu-b")
    live_replica(fleet, a.node, minutes_ago=10)
    on_b, _ = live_replica(fleet, b.node)
    Node.objects.mark_draining(a.node.pk, by=Node.DrainedBy.OPERATOR)

    assert router.route("llama").lease.replica_id == on_b.pk


# --- eviction ------------------------------------------------------------------------------------


def evictable_fleet(fleet):
    """One node with 10 GiB; `phi` loaded through the router holds 6 GiB of it."""
    gpu = fleet.add_node("gpu-1", total_vram=10 * GIB)
    phi = router.route("phi", backend_type="x", opts_blob=options_blob("phi.gguf", vram=6 * GIB))
    Lease.objects.release(phi.lease.pk)
    return gpu


def test_eviction_frees_the_least_recently_used_idle_replica(fleet):
    gpu = fleet.add_node("gpu-1", slots=1, total_vram=12 * GIB)
    for name, minutes in (("phi", 30), ("qwen", 5)):  # loaded, and last used, that long ago
        router.schedule_and_load(
            name, backend_type="x", opts_blob=options_blob(vram=4 * GIB), now=timezone.now() - timedelta(minutes=minutes)
        )

    result = router.route("llama", backend_type="x", opts_blob=options_blob(vram=6 * GIB))

    assert result.ready
    assert set(NodeModel.objects.values_list("model_name", flat=True)) == {"qwen", "llama"}
    assert [(r.model_name, r.replica_index) for name, r in gpu.worker.calls if name == "StopBackend"] == [("phi", 0)]
    gpu.node.refresh_from_db()
    assert gpu.node.reserved_vram == 10 * GIB  # qwen 4 + llama 6; phi's 4 came back


def test_eviction_never_takes_an_autoscaled_model_below_its_floor(fleet):
    evictable_fleet(fleet)
    make_scheduling("phi", min_replicas=0, max_replicas=2)  # autoscaled: floor max(0, 1) = 1

    with pytest.raises(router.AllReplicasBusy) as raised:
        router.route("llama", backend_type="x", opts_blob=options_blob(vram=6 * GIB))

    assert raised.value.code == "all_replicas_busy"
    assert NodeModel.objects.filter(model_name="phi").exists()
    assert not NodeModel.objects.filter(model_name="llama").exists()


def test_all_replicas_busy_when_the_only_candidate_victim_has_a_request_in_flight(fleet):
    gpu = evictable_fleet(fleet)
    busy = router.route("phi")  # holds a lease: in_flight 1

    with pytest.raises(router.AllReplicasBusy):
        router.schedule_and_load("llama", backend_type="x", opts_blob=options_blob(vram=6 * GIB))

    assert NodeModel.objects.get(model_name="phi").in_flight == 1
    assert gpu.worker.count("StopBackend") == 0
    Lease.objects.release(busy.lease.pk)

    # Once idle it may go.
    assert router.schedule_and_load("llama", backend_type="x", opts_blob=options_blob(vram=6 * GIB)).state == "loaded"


def test_a_model_without_a_vram_estimate_never_triggers_eviction(fleet):
    gpu = evictable_fleet(fleet)
    gpu.node.refresh_from_db()
    assert Node.objects.reserve_vram(gpu.node.pk, gpu.node.free_vram)  # another load takes the rest

    replica = router.schedule_and_load("llama", backend_type="x", opts_blob=options_blob())

    assert replica.state == "loaded"
    assert NodeModel.objects.filter(model_name="phi").exists()


def test_evicting_a_replica_of_unknown_size_stops_after_one_and_asks_for_a_retry(fleet):
    gpu = fleet.add_node("gpu-1", total_vram=10 * GIB)
    for name in ("phi", "qwen"):  # loaded without a VRAM hint: sizes unknown
        router.schedule_and_load(name, backend_type="x", opts_blob=options_blob())
    Node.objects.heartbeat(gpu.node.pk, available_vram=2 * GIB)  # what they really use

    with pytest.raises(router.AllReplicasBusy, match="next heartbeat"):
        router.schedule_and_load("llama", backend_type="x", opts_blob=options_blob(vram=6 * GIB))

    assert NodeModel.objects.count() == 1  # one went, not both
    assert gpu.worker.count("StopBackend") == 1
    Node.objects.heartbeat(gpu.node.pk, available_vram=7 * GIB)  # the worker reports the freed VRAM
    assert router.schedule_and_load("llama", backend_type="x", opts_blob=options_blob(vram=6 * GIB)).state == "loaded"


def test_options_without_a_backend_type_keep_the_stored_one(fleet):
    gpu = fleet.add_node("gpu-1")
    live_replica(fleet, gpu.node)
    ModelLoadInfo.objects.upsert("llama", "vllm", options_blob("old"))

    router.route("llama", opts_blob=BLOB)

    info = ModelLoadInfo.objects.for_model("llama")
    assert (info.backend_type, info.model_opts_blob) == ("vllm", BLOB)


# --- model identity ------------------------------------------------------------------------------


def test_the_lease_names_the_model_the_replica_was_loaded_with_as_its_identity(fleet):
    gpu = fleet.add_node("gpu-1")

    cold = router.route("llama", backend_type="llama-cpp", opts_blob=BLOB)
    warm = router.route("llama")

    (loaded,) = gpu.worker.load_requests
    assert cold.model_identity == warm.model_identity == backend_pb2.ModelOptions.FromString(loaded).Model
    assert cold.model_identity == "llama.gguf"


def test_new_options_do_not_change_the_identity_of_a_replica_loaded_with_the_old_ones(fleet):
    """The model's load info is the recipe of the NEXT load; a running replica keeps answering
    for the Model it was loaded with, so that is what the frontend must send."""
    fleet.add_node("gpu-1")
    router.route("llama", backend_type="llama-cpp", opts_blob=BLOB)

    result = router.route("llama", opts_blob=options_blob("llama-q8.gguf"))

    assert ModelLoadInfo.objects.for_model("llama").model_opts_blob == options_blob("llama-q8.gguf")
    assert result.model_identity == "llama.gguf"


def test_a_replica_without_its_own_recipe_takes_the_identity_from_the_models_load_info(fleet):
    gpu = fleet.add_node("gpu-1")
    live_replica(fleet, gpu.node)  # no per-replica blob (e.g. a row older than them)
    assert router.route("llama").model_identity == ""

    ModelLoadInfo.objects.upsert("llama", "llama-cpp", options_blob("from-load-info.gguf"))

    assert router.route("llama").model_identity == "from-load-info.gguf"


@pytest.mark.parametrize(
    ("blob", "identity"),
    [(options_blob(""), ""), (b"", ""), (b"\xff\xff", ""), (options_blob("m.gguf", ContextSize=8), "m.gguf")],
    ids=["empty-Model", "empty-blob", "garbage", "Model"],
)
def test_the_identity_is_read_from_the_row_without_a_query(django_assert_num_queries, blob, identity):
    row = NodeModel(model_name="llama", model_opts_blob=blob)

    with django_assert_num_queries(0):
        assert router.model_identity(row) == identity
