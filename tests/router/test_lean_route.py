"""The warm route's and release's lean path (``registry/api/lean_route.py``) answers what the
DRF views answer.

Each request goes through the WSGI application gunicorn serves (``controlplane.wsgi``: the lean
paths, handing on what they do not answer) and through Django's test client (the full request
cycle and the DRF view only). Status, headers and body must be the same (a lease's id and expiry
aside: each call grants its own), for ordinary routes and releases and for every refused one
(problems with their codes). An ordinary warm route or release must be answered without
Django's request cycle, with its one statement; a cold route must make the statements it makes
without the lean path; through threads, in-flight must equal the live leases.

Transactional tests: the lean path manages database connections as Django's request cycle does,
so the test's own connection must be in autocommit, as a web thread's is.
"""

import json
import threading
import uuid

import psycopg
import pytest
from django.db import connection
from django.db.models import Count, F, OuterRef, Subquery
from django.db.models.functions import Coalesce
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client import REGISTRY

from registry.models import Lease, NodeModel
from tests.api import test_heartbeat_lean_path as heartbeat_tests
from tests.api.test_heartbeat_lean_path import comparable, django_post, wsgi_post
from tests.concurrency import run_in_threads
from tests.factories import make_api_key, make_replica

from .conftest import options_blob

pytestmark = [pytest.mark.django_db(transaction=True)]

cycles = heartbeat_tests.cycles  # the fixture counting Django request cycles

JSON = {"Content-Type": "application/json", "Accept": "application/json, application/problem+json"}
# What differs between two grants: the lease, and which of the two replicas the pick chose.
MASKED = ("lease_id", "expires_at", "released_at", "address", "replica_index")


@pytest.fixture
def replicas(fleet):
    """Two warm replicas of ``llama`` (recently probed, their recipe on the row)."""
    gpu = fleet.add_node("gpu-lean", slots=2)
    rows = []
    for index in range(2):
        _, address = fleet.backend_server()
        blob = options_blob("llama.gguf")
        rows.append(
            make_replica(gpu.node, "llama", index, address=address, model_opts_blob=blob, last_probe_at=timezone.now())
        )
    return rows


@pytest.fixture
def key(replicas):
    """A frontend key that has routed and released once, as every key of a running frontend
    has: this process's caches know it and the node's name, so a warm route reads nothing."""
    token = make_api_key("frontend")[1]
    lease_id = json.loads(wsgi_post(route_path(), b"", bearer(token))[2])["lease_id"]
    wsgi_post(release_path(lease_id), b"", bearer(token))
    return token


def bearer(token: str | None) -> dict:
    return {**JSON, "Authorization": f"Bearer {token}"} if token else dict(JSON)


def masked(status, headers, content):
    status, headers, body = comparable(status, headers, content)
    if status == 200:
        body = {name: ("..." if name in MASKED else value) for name, value in body.items()}
    return status, headers, body


def route_path(model: str = "llama") -> str:
    return f"/api/v1/models/{model}/route"


def release_path(lease_id) -> str:
    return f"/api/v1/leases/{lease_id}/release"


def statements(queries) -> list[str]:
    return [query["sql"].split()[0].upper() for query in queries]


def replicas_off_count() -> list:
    """Replicas whose in-flight differs from their live leases, read in one statement (one
    snapshot, so it holds while other threads route and release)."""
    live = (
        Lease.objects.filter(replica_id=OuterRef("pk"), released_at__isnull=True)
        .order_by()
        .values("replica_id")
        .annotate(count=Count("pk"))
        .values("count")
    )
    counted = NodeModel.objects.annotate(live=Coalesce(Subquery(live), 0))
    return list(counted.exclude(in_flight=F("live")).values_list("replica_index", "in_flight", "live"))


def assert_in_flight_equals_live_leases():
    assert replicas_off_count() == []


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{}",
        b'{"wait_seconds": 30.0}',
        b'{"wait_seconds": 0, "affinity_key": "session-7"}',
        b'{"affinity_key": null}',
    ],
)
def test_an_ordinary_warm_route_skips_the_request_cycle_and_answers_as_the_view_does(replicas, key, cycles, body):
    with CaptureQueriesContext(connection) as queries:
        lean = wsgi_post(route_path(), body, bearer(key))
    assert cycles.count == 0  # answered below Django's request cycle
    if connection.vendor == "postgresql":
        assert statements(queries) == ["WITH"]  # the pick, and no health-check SELECT before it
    full = django_post(route_path(), body, bearer(key))
    assert lean[0] == 200, lean
    assert masked(*lean) == masked(*full)
    answer = json.loads(lean[2])
    lease = Lease.objects.get(pk=answer["lease_id"])
    assert lease.released_at is None and answer["node_name"] == "gpu-lean"
    assert_in_flight_equals_live_leases()


def test_an_ordinary_release_skips_the_request_cycle_and_answers_as_the_view_does(replicas, key, cycles):
    leases = [json.loads(wsgi_post(route_path(), b"", bearer(key))[2])["lease_id"] for _ in range(2)]
    with CaptureQueriesContext(connection) as queries:
        lean = wsgi_post(release_path(leases[0]), b"", bearer(key))
    assert cycles.count == 0
    if connection.vendor == "postgresql":
        assert statements(queries) == ["WITH"]
    full = django_post(release_path(leases[1]), b"", bearer(key))
    assert lean[0] == 200 and json.loads(lean[2])["released"] is True
    assert masked(*lean) == masked(*full)
    # Released before: 200 with released false, on both paths.
    again = wsgi_post(release_path(leases[0]), b"", bearer(key))
    assert json.loads(again[2])["released"] is False
    assert comparable(*again) == comparable(*django_post(release_path(leases[0]), b"", bearer(key)))
    assert_in_flight_equals_live_leases()
    assert NodeModel.objects.filter(in_flight__gt=0).count() == 0


def test_request_id_counters_and_the_node_header(replicas, key, settings):
    settings.CONTROLPLANE_NODE_HEADER = True

    def answered(route: str) -> float:
        labels = {"route": route, "method": "POST", "status": "2xx"}
        return REGISTRY.get_sample_value("controlplane_http_requests_total", labels) or 0.0

    routes, releases = answered("model-route"), answered("lease-release")
    status, headers, content = wsgi_post(route_path(), b"", {**bearer(key), "X-Request-ID": "trace-7"})
    assert status == 200 and headers["X-Request-ID"] == "trace-7"
    assert headers["X-Control-Plane-Node"] == "gpu-lean"
    full = django_post(route_path(), b"", bearer(key))
    assert masked(status, headers, content) == masked(*full)
    status, headers, _ = wsgi_post(release_path(json.loads(content)["lease_id"]), b"", bearer(key))
    assert status == 200 and len(headers["X-Request-ID"]) == 32  # none sent: a new one
    # Counted under the same name by both: the lean path and the middleware of the test client's.
    assert answered("model-route") == routes + 2
    assert answered("lease-release") == releases + 1


REFUSED = {
    # name: (path kind, credential, body, extra headers, status, code)
    "no credential": ("route", None, b"", {}, 401, "not_authenticated"),
    "unknown key": ("route", "cpk_not-a-key", b"", {}, 401, "invalid_token"),
    "malformed bearer": ("route", "two words", b"", {}, 401, "invalid_token"),
    "a node's kind of token": ("route", "cpn_whatever", b"", {}, 401, "invalid_token"),
    "unreadable body": ("route", "key", b"{not json", {}, 400, "parse_error"),
    "not an object": ("route", "key", b"[1]", {}, 400, "validation_error"),
    "unknown field": ("route", "key", b'{"colour": "red"}', {}, 400, "validation_error"),
    "wait too long": ("route", "key", b'{"wait_seconds": 301}', {}, 400, "validation_error"),
    "wait not a number": ("route", "key", b'{"wait_seconds": "soon"}', {}, 400, "validation_error"),
    "control character in the key": ("route", "key", b'{"affinity_key": "a\\u0001b"}', {}, 400, "validation_error"),
    "lone surrogate in the key": ("route", "key", b'{"affinity_key": "a\\ud800b"}', {}, 400, "parse_error"),
    "key too long": ("route", "key", json.dumps({"affinity_key": "k" * 1000}).encode(), {}, 400, "validation_error"),
    "bad options": ("route", "key", b'{"model_options_b64": "%%%"}', {}, 400, "validation_error"),
    "options not a ModelOptions": (
        "route",
        "key",
        b'{"model_options": {"NoSuchField": 1}}',
        {},
        400,
        "invalid_model_options",
    ),
    "bad model name": ("route:a/../b", "key", b"", {}, 400, "validation_error"),
    "not JSON": ("route", "key", b"{}", {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    "HTML only": ("route", "key", b"", {"Accept": "text/html"}, 406, "not_acceptable"),
    "foreign host": ("route", "key", b"", {"Host": "evil.example"}, 400, "bad_request"),
    "never loaded": ("route:unknown-model", "key", b"", {}, 409, "no_load_info"),
    "release without credential": ("release", None, b"", {}, 401, "not_authenticated"),
    "release with an unknown key": ("release", "cpk_not-a-key", b"", {}, 401, "invalid_token"),
    "release of an unknown lease": ("release:unknown", "key", b"", {}, 404, "not_found"),
}


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
def test_a_refused_route_or_release_gets_the_views_problem_and_leases_nothing(replicas, key, case):
    target, credential, body, extra, status, code = REFUSED[case]
    kind, _, argument = target.partition(":")
    if kind == "route":
        path = route_path(argument or "llama")
    else:
        path = release_path(
            uuid.uuid4() if argument else json.loads(wsgi_post(route_path(), b"", bearer(key))[2])["lease_id"]
        )
    headers = {**bearer(key if credential == "key" else credential), **extra}
    before = sorted(NodeModel.objects.values_list("pk", "in_flight"))
    leases = Lease.objects.count()
    lean = wsgi_post(path, body, headers)
    assert lean[0] == status, lean
    assert lean[1]["Content-Type"] == "application/problem+json"
    assert json.loads(lean[2])["code"] == code
    assert sorted(NodeModel.objects.values_list("pk", "in_flight")) == before
    assert Lease.objects.count() == leases
    assert comparable(*lean) == comparable(*django_post(path, body, headers))


def test_a_release_with_a_body_is_left_to_the_view(replicas, key, cycles):
    lease_id = json.loads(wsgi_post(route_path(), b"", bearer(key))[2])["lease_id"]
    status, _, content = wsgi_post(release_path(lease_id), b'{"ignored": true}', bearer(key))
    assert status == 200 and json.loads(content)["released"] is True
    assert cycles.count == 1  # the view answered (it never reads a release's body)


def test_a_cold_route_picks_once_whichever_path_answers(fleet, key, cycles):
    """No replica: the lean path's warm pick misses, the view goes on from there (load info,
    then the problem) without a second pick."""

    def picks(answer) -> int:
        with CaptureQueriesContext(connection) as queries:
            response = answer()
        assert response[0] == 409 and json.loads(response[2])["code"] == "no_load_info"
        return sum(1 for query in queries if "SKIP LOCKED" in query["sql"] or "warm_pick" in query["sql"])

    lean = picks(lambda: wsgi_post(route_path("cold-model"), b"", bearer(key)))
    assert cycles.count == 1
    full = picks(lambda: django_post(route_path("cold-model"), b"", bearer(key)))
    assert lean == full


@pytest.mark.postgres
def test_a_dead_kept_connection_costs_no_failed_route(replicas, key):
    assert wsgi_post(route_path(), b"", bearer(key))[0] == 200
    backend = connection.connection.info.backend_pid  # the connection the lean path keeps
    settings_dict = connection.settings_dict
    with psycopg.connect(
        host=settings_dict["HOST"] or None,
        port=settings_dict["PORT"] or None,
        user=settings_dict["USER"],
        dbname=settings_dict["NAME"],
        autocommit=True,
    ) as admin:
        admin.execute("SELECT pg_terminate_backend(%s, 5000)", (backend,))
    with CaptureQueriesContext(connection) as queries:
        status, _, content = wsgi_post(route_path(), b"", bearer(key))
    assert status == 200, content
    assert statements(queries) == ["WITH"]  # found closed before sending: one pick, on a new connection
    assert connection.connection.info.backend_pid != backend
    assert_in_flight_equals_live_leases()


@pytest.mark.postgres
def test_threads_routing_and_releasing_through_the_served_application_keep_in_flight_equal_to_leases(
    replicas, key, close_thread_connections
):
    """Eight threads, each routing and releasing through the WSGI application (the lean paths,
    their own connections), some releasing twice, while the test checks in-flight against the
    live leases; at the end nothing is held."""
    granted = []
    lock = threading.Lock()
    running = threading.Event()
    running.set()
    mismatches = []

    def check_while_running():
        try:
            while running.is_set():
                mismatches.extend(replicas_off_count())
        finally:
            close_thread_connections()

    checker = threading.Thread(target=check_while_running)
    checker.start()

    def frontend(index: int) -> int:
        done = 0
        for round_ in range(15):
            status, _, content = wsgi_post(
                route_path(), json.dumps({"affinity_key": f"s{index % 3}"}).encode(), bearer(key)
            )
            assert status == 200, content
            lease_id = json.loads(content)["lease_id"]
            with lock:
                granted.append(lease_id)
            status, _, content = wsgi_post(release_path(lease_id), b"", bearer(key))
            assert status == 200 and json.loads(content)["released"] is True, content
            if round_ % 5 == 0:
                assert json.loads(wsgi_post(release_path(lease_id), b"", bearer(key))[2])["released"] is False
            done += 1
        return done

    try:
        assert run_in_threads(frontend, close_thread_connections) == [15] * 8
    finally:
        running.clear()
        checker.join(timeout=30)
    assert mismatches == []
    assert len(set(granted)) == 8 * 15
    assert Lease.objects.filter(pk__in=granted, released_at__isnull=False).count() == 8 * 15
    assert_in_flight_equals_live_leases()
    assert sum(NodeModel.objects.values_list("in_flight", flat=True)) == 0


def test_a_model_name_with_slashes_and_non_ascii_routes_on_the_lean_path(fleet, key, cycles):
    """The path's bytes as gunicorn hands them over (PEP 3333: UTF-8 bytes as a latin-1 string)
    name the same model as the percent-encoded path Django's test client sends."""
    gpu = fleet.add_node("gpu-unicode")
    _, address = fleet.backend_server()
    make_replica(
        gpu.node,
        "org/café",
        0,
        address=address,
        model_opts_blob=options_blob("café.gguf"),
        last_probe_at=timezone.now(),
    )
    lean = wsgi_post(route_path("org/café").encode().decode("latin-1"), b"", bearer(key))
    assert cycles.count == 0
    assert lean[0] == 200 and json.loads(lean[2])["model_name"] == "org/café"
    assert masked(*lean) == masked(*django_post(route_path("org/caf%C3%A9"), b"", bearer(key)))
