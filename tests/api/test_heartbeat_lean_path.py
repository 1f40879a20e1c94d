"""The heartbeat's lean path (``registry/api/heartbeat.py``) answers what the DRF view answers.

Each request goes twice: through the WSGI application gunicorn serves (``controlplane.wsgi``:
the lean path, handing on what it does not answer) and through Django's test client (the full
request cycle and the DRF view only). Status, body and headers must be the same, for ordinary
heartbeats and for every refused one (problems with their codes, credentials before the body).
An ordinary heartbeat must be answered without Django's request cycle, with one statement (the
first of a node in the process; the next ones are coalesced: ``tests/registry/
test_heartbeat_coalescing.py``).

Transactional tests: the lean path manages database connections as Django's request cycle
does (closing one left in a transaction), so the test's own connection must be in autocommit,
as a web thread's is.
"""

import io
import json
import sys
import uuid

import psycopg
import pytest
from django.core.signals import request_started
from django.core.wsgi import get_wsgi_application
from django.db import connection
from django.test.utils import CaptureQueriesContext
from prometheus_client import REGISTRY

from controlplane.httpserver import served_application
from registry.heartbeat_cache import node_tokens
from registry.heartbeat_flush import flush
from registry.models import Node
from tests.clients import REGISTRATION_TOKEN, client_with
from tests.factories import GIB, make_node

pytestmark = [pytest.mark.django_db(transaction=True)]

application = served_application(get_wsgi_application())  # what controlplane.wsgi serves


@pytest.fixture(autouse=True)
def _coalescing(transactional_db):
    """The token cache and the heartbeat buffer are the process's: each test starts without
    another's entries, and what it acknowledged is written while its database exists."""
    node_tokens.clear()
    yield
    flush()
    node_tokens.clear()


def wsgi_post(path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """POST through the served WSGI application, as gunicorn calls it."""
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": path,
        "RAW_URI": path,
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_SOFTWARE": "gunicorn/23.0.0",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "testserver",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.version": (1, 0),
    }
    for name, value in headers.items():
        key = name.upper().replace("-", "_")
        environ[key if key in ("CONTENT_TYPE",) else f"HTTP_{key}"] = value
    answer = {}

    def start_response(status, response_headers, exc_info=None):
        answer["status"] = int(status.split()[0])
        answer["headers"] = dict(response_headers)

    chunks = application(environ, start_response)
    content = b"".join(chunks)
    if hasattr(chunks, "close"):
        chunks.close()
    return answer["status"], answer["headers"], content


def django_post(path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """The same request through Django's request cycle and the DRF view only."""
    extra = {}
    for name, value in headers.items():
        key = name.upper().replace("-", "_")
        if key != "CONTENT_TYPE":
            extra[f"HTTP_{key}"] = value
    response = client_with().generic("POST", path, body, content_type=headers.get("Content-Type", ""), **extra)
    return response.status_code, dict(response.items()), response.content


class Started:
    """Counts Django request cycles (``request_started``)."""

    def __init__(self):
        self.count = 0

    def __call__(self, **kwargs):
        self.count += 1


@pytest.fixture
def cycles():
    counter = Started()
    request_started.connect(counter)
    yield counter
    request_started.disconnect(counter)


@pytest.fixture
def nodes(registration_settings):
    return make_node(name="lean-1"), make_node(name="lean-2")


def url(node_or_id) -> str:
    return f"/api/node/{getattr(node_or_id, 'pk', node_or_id)}/heartbeat"


JSON = {"Content-Type": "application/json"}
BODY = json.dumps({"available_vram": 3 * GIB, "gpu_compute_capability": "8.6", "capability": {"x": 1}}).encode()


def comparable(status, headers, content):
    headers = {name: value for name, value in headers.items() if name not in ("X-Request-ID", "Date")}
    return status, headers, json.loads(content) if content else None


def test_an_ordinary_heartbeat_skips_the_request_cycle_and_answers_as_the_view_does(nodes, cycles):
    node = nodes[0]
    headers = {**JSON, "Authorization": f"Bearer {node.token}"}
    with CaptureQueriesContext(connection) as queries:
        lean = wsgi_post(url(node), BODY, headers)
    assert cycles.count == 0  # answered below Django's request cycle
    assert [query["sql"].split()[0] for query in queries] == ["UPDATE"]  # no health-check SELECT either
    full = django_post(url(node), BODY, headers)
    assert comparable(*lean) == comparable(*full)
    assert lean[0] == 200 and json.loads(lean[2]) == {"status": "healthy", "address": node.address}
    assert Node.objects.get(pk=node.pk).available_vram == 3 * GIB


def test_a_fleet_token_node_heartbeats_on_the_lean_path_too(registration_settings, cycles):
    localai = make_node(name="localai-lean", auth_mode=Node.AuthMode.FLEET_TOKEN)
    headers = {**JSON, "Authorization": f"Bearer {REGISTRATION_TOKEN}"}
    lean = wsgi_post(url(localai), json.dumps({"available_ram": GIB}).encode(), headers)
    assert cycles.count == 0
    assert comparable(*lean) == comparable(
        *django_post(url(localai), json.dumps({"available_ram": GIB}).encode(), headers)
    )
    assert Node.objects.get(pk=localai.pk).available_ram == GIB


def test_request_id_and_counters(nodes):
    node = nodes[0]
    headers = {**JSON, "Authorization": f"Bearer {node.token}"}

    def answered() -> float:
        labels = {"route": "node-heartbeat", "method": "POST", "status": "2xx"}
        return REGISTRY.get_sample_value("controlplane_http_requests_total", labels) or 0.0

    before = answered()
    status, response_headers, _ = wsgi_post(url(node), b"{}", {**headers, "X-Request-ID": "trace-42"})
    assert status == 200 and response_headers["X-Request-ID"] == "trace-42"
    status, response_headers, _ = wsgi_post(url(node), b"", {"Authorization": f"Bearer {node.token}"})
    assert status == 200 and len(response_headers["X-Request-ID"]) == 32  # none sent: a new one
    assert answered() == before + 2


REFUSED = {
    # name: (node, token, body, extra headers, status, code)
    "no credential": ("own", None, BODY, {}, 401, "not_authenticated"),
    "no credential, bad body": ("own", None, b'{"available_vram": -1}', {}, 401, "not_authenticated"),
    "unknown token": ("own", "cpn_not-a-token", BODY, {}, 401, "invalid_token"),
    "unknown token, unreadable body": ("own", "cpn_not-a-token", b"{not json", {}, 401, "invalid_token"),
    "another node's token": ("own", "other", BODY, {}, 403, "node_token_mismatch"),
    "unknown node": ("nobody", "own", BODY, {}, 403, "node_token_mismatch"),
    "fleet token on a node-token node": ("own", "fleet", BODY, {}, 403, "fleet_token_not_accepted"),
    "malformed bearer": ("own", "two words", BODY, {}, 401, "invalid_token"),
    "negative figure": ("own", "own", b'{"available_vram": -1}', {}, 400, "validation_error"),
    "string figure": ("own", "own", b'{"total_disk": "big"}', {}, 400, "validation_error"),
    "boolean figure": ("own", "own", b'{"available_ram": true}', {}, 400, "validation_error"),
    "too large figure": ("own", "own", b'{"available_disk": 9223372036854775808}', {}, 400, "validation_error"),
    "not an object": ("own", "own", b"[1, 2]", {}, 400, "validation_error"),
    "null body": ("own", "own", b"null", {}, 400, "validation_error"),
    "unreadable body": ("own", "own", b"{not json", {}, 400, "parse_error"),
    "infinite number": ("own", "own", b'{"available_vram": 1e999}', {}, 400, "parse_error"),
    "not JSON": ("own", "own", BODY, {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    "HTML only": ("own", "own", BODY, {"Accept": "text/html"}, 406, "not_acceptable"),
    "foreign host": ("own", "own", BODY, {"Host": "evil.example"}, 400, "bad_request"),
}


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
def test_a_refused_heartbeat_gets_the_views_problem_and_writes_nothing(nodes, case):
    own, other = nodes
    target, credential, body, extra, status, code = REFUSED[case]
    tokens = {"own": own.token, "other": other.token, "fleet": REGISTRATION_TOKEN, None: None}
    token = tokens.get(credential, credential)
    headers = {**JSON, **extra}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    path = url(own if target == "own" else uuid.uuid4())
    before = sorted(Node.objects.values_list("pk", "last_heartbeat"))
    lean = wsgi_post(path, body, headers)
    assert lean[0] == status, lean
    assert lean[1]["Content-Type"] == "application/problem+json"
    assert json.loads(lean[2])["code"] == code
    assert sorted(Node.objects.values_list("pk", "last_heartbeat")) == before
    assert comparable(*lean) == comparable(*django_post(path, body, headers))


@pytest.mark.postgres
def test_a_dead_kept_connection_costs_no_failed_heartbeat(nodes):
    node, other = nodes
    headers = {**JSON, "Authorization": f"Bearer {node.token}"}
    assert wsgi_post(url(node), BODY, headers)[0] == 200
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
    # The other node's first heartbeat in this process is written before its answer (the
    # node's own next one would be coalesced, written by the flusher thread on its connection).
    status, _, content = wsgi_post(url(other), BODY, {**JSON, "Authorization": f"Bearer {other.token}"})
    assert status == 200, content
    assert connection.connection.info.backend_pid != backend
