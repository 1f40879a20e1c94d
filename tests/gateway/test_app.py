"""The gateway's ASGI app in process: real registry rows (through the verbs), real echo
backends on loopback gRPC, the app called as an ASGI server calls it. Both database lanes.

Each test runs the app in its own event loop (``asyncio.run``); the app's database threads use
their own connections, hence ``transaction=True``.
"""

from __future__ import annotations

import asyncio

import pytest

from core.credentials import backend_token
from core.models import ApiKey
from gateway.app import GatewayApp
from gateway.backend import Backends
from proto import backend_pb2, client
from registry.models import Lease, LoadJob, ModelLoadInfo, Node, NodeModel
from tests.factories import make_api_key, make_node, make_replica
from tests.gateway.asgi import request
from tests.processes import free_port
from worker.backends import echo

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there fleet"}]}


@pytest.fixture(autouse=True)
def _gateway_settings(settings):
    settings.GATEWAY_DB_THREADS = 2
    settings.GATEWAY_REQUEST_TIMEOUT = 20
    settings.GRPC_HEALTH_TIMEOUT = 1
    # These tests pin which replica least-in-flight picks; prefix affinity (on by default) would
    # prefer the replica a prompt maps to. The `user` field still keys a request.
    settings.GATEWAY_AFFINITY_PREFIX_CHARS = 0
    client.close_all_channels()
    yield
    client.close_all_channels()


@pytest.fixture
def key():
    return make_api_key("frontend")[1]


@pytest.fixture
def backends():
    """start(node, model, *options, loaded_as=model) -> address of an echo backend serving
    ``node``'s backend token, loaded (LoadModel) as ``loaded_as`` unless that is None."""
    servers = []

    def start(node, model="m", *options, loaded_as="", threads=1):
        address = f"127.0.0.1:{free_port()}"
        token = backend_token(node.pk)
        servers.append(echo.serve(address, token, threads=threads))
        if loaded_as is not None:
            loaded, message = client.load_model(
                address, backend_pb2.ModelOptions(Model=loaded_as or model, Options=list(options)), token=token
            )
            assert loaded, message
        return address

    yield start
    for server in servers:
        server.stop(0)


def replica(node, address, model="m", index=0, **extra):
    blob = backend_pb2.ModelOptions(Model=model).SerializeToString()
    return make_replica(node, model, index, address=address, backend_type="echo", model_opts_blob=blob, **extra)


def serve(*calls):
    """Run the requests one after the other on one app; returns their answers."""

    async def scenario():
        app = GatewayApp()
        try:
            return [await request(app, *args, **kwargs) for args, kwargs in calls]
        finally:
            await app.close()

    return asyncio.run(scenario())


def call(*args, **kwargs):
    return args, kwargs


def in_flight(model="m") -> int:
    return sum(NodeModel.objects.filter(model_name=model).values_list("in_flight", flat=True))


def test_credentials_are_checked_and_refusals_are_openai_errors(key):
    _, operator = make_api_key("operator")
    revoked, revoked_plain = make_api_key("frontend")
    ApiKey.objects.revoke(revoked.pk)
    missing, wrong, gone, malformed, operator_ok = serve(
        call("GET", "/v1/models"),
        call("GET", "/v1/models", key="cpk_wrong_wrong_wrong"),
        call("GET", "/v1/models", key=revoked_plain),
        call("GET", "/v1/models", headers={"authorization": f"Basic {key}"}),
        call("GET", "/v1/models", key=operator),
    )
    assert (missing.status, missing.error["code"]) == (401, "missing_api_key")
    assert missing.headers["www-authenticate"] == 'Bearer realm="gateway"'
    for answer in (wrong, gone, malformed):
        assert answer.status == 401
        assert answer.error == {
            "message": "Incorrect or revoked API key.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    assert operator_ok.status == 200 and operator_ok.json() == {"object": "list", "data": []}
    assert len(missing.headers["x-request-id"]) == 32


def test_bad_requests(key, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2000
    not_json, not_object, too_big, bad_field, nowhere, wrong_method, request_id = serve(
        call("POST", "/v1/chat/completions", b"{nope", key=key),
        call("POST", "/v1/completions", [1, 2], key=key),
        call("POST", "/v1/completions", {"model": "m", "prompt": "x" * 3000}, key=key),
        call("POST", "/v1/chat/completions", {**CHAT, "top_p": 2}, key=key),
        call("GET", "/v2/models", key=key),
        call("DELETE", "/v1/models", key=key),
        call("GET", "/v1/models", key=key, headers={"x-request-id": "trace-me.1"}),
    )
    assert (not_json.status, not_json.error["code"]) == (400, "invalid_json")
    assert (not_object.status, not_object.error["code"]) == (400, "invalid_json")
    assert (too_big.status, too_big.error["code"]) == (413, "payload_too_large")
    assert (bad_field.status, bad_field.error["param"]) == (400, "top_p")
    assert (nowhere.status, nowhere.error["code"]) == (404, "unknown_url")
    assert (wrong_method.status, wrong_method.headers["allow"]) == (405, "GET")
    assert request_id.headers["x-request-id"] == "trace-me.1"


def test_unknown_models_are_404_model_not_found_with_and_without_nodes(key):
    (no_nodes,) = serve(call("POST", "/v1/chat/completions", {**CHAT, "model": "nobody"}, key=key))
    make_node()
    with_nodes, listed = serve(
        call("POST", "/v1/embeddings", {"model": "nobody", "input": "x"}, key=key),
        call("GET", "/v1/models/nobody", key=key),
    )
    for answer in (no_nodes, with_nodes, listed):
        assert answer.status == 404
        assert answer.error["code"] == "model_not_found" and answer.error["param"] == "model"


def test_chat_completion_and_embeddings_through_a_leased_replica(key, backends):
    node = make_node()
    address = backends(node)
    replica(node, address)
    chat, completion, embedded, models = serve(
        call("POST", "/v1/chat/completions", CHAT, key=key),
        call("POST", "/v1/completions", {"model": "m", "prompt": "one two", "max_tokens": 1}, key=key),
        call("POST", "/v1/embeddings", {"model": "m", "input": ["a b", "c"]}, key=key),
        call("GET", "/v1/models", key=key),
    )
    assert chat.status == 200, chat.body
    body = chat.json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello there fleet"}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert body["id"].startswith("chatcmpl-") and body["model"] == "m"
    assert completion.json()["choices"][0]["text"] == "one"
    assert completion.json()["choices"][0]["finish_reason"] == "length"
    data = embedded.json()["data"]
    assert [item["embedding"] for item in data] == [pytest.approx(echo.embed("a b")), pytest.approx(echo.embed("c"))]
    assert models.json()["data"] == [
        {
            "id": "m",
            "object": "model",
            "created": 0,
            "owned_by": "controlplane",
            "ready_replicas": 1,
            "has_load_info": False,
        }
    ]
    # Every request's lease was released.
    assert in_flight() == 0
    assert Lease.objects.count() == 3 and not Lease.objects.live().exists()


def test_a_streamed_chat_ends_with_done_and_usage(key, backends):
    node = make_node()
    replica(node, backends(node))
    (answer,) = serve(
        call(
            "POST", "/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}}, key=key
        )
    )
    assert answer.status == 200 and answer.headers["content-type"] == "text/event-stream"
    *chunks, done = answer.events
    assert done == "[DONE]"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "hello there fleet"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert in_flight() == 0


def test_a_client_that_hangs_up_mid_stream_releases_its_lease_at_once(key, backends):
    node = make_node()
    row = replica(node, backends(node, "m", "echo.tokens_per_second=10"))
    words = " ".join(f"w{i}" for i in range(100))  # ten seconds of tokens
    body = {"model": "m", "prompt": words, "stream": True}

    async def scenario():
        app = GatewayApp()
        try:
            started = asyncio.get_running_loop().time()
            answer = await request(app, "POST", "/v1/completions", body, key=key, hang_up_after_events=2)
            return answer, asyncio.get_running_loop().time() - started
        finally:
            await app.close()

    answer, took = asyncio.run(scenario())
    assert answer.status == 200 and len(answer.events) == 2
    assert took < 5  # the app returned at the hang-up, not when the stream would have ended
    row.refresh_from_db()
    assert row.in_flight == 0
    assert not Lease.objects.live().exists()


def test_an_unreachable_replica_is_removed_and_the_request_routed_once_more(key, backends, caplog):
    node = make_node(slots=2)
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: its backend died after its last probe
    gone = replica(node, dead, index=0, last_probe_at=Node.objects.get(pk=node.pk).last_heartbeat)
    live = replica(node, backends(node), index=1, in_flight=1)  # busier: the dead one is picked first
    (answer,) = serve(call("POST", "/v1/chat/completions", CHAT, key=key))
    assert answer.status == 200, answer.body
    assert not NodeModel.objects.filter(pk=gone.pk).exists()
    # The gateway's call found it dead (the router's probe was skipped: confirmed recently).
    assert [r for r in caplog.records if r.name == "gateway.serving" and dead in r.getMessage()]
    live.refresh_from_db()
    assert live.in_flight == 1 and not Lease.objects.live().exists()


def test_a_replica_answering_for_another_model_is_removed_too(key, backends):
    node = make_node(slots=2)
    recycled = replica(node, backends(node, loaded_as="someone-else"), index=0)
    live = replica(node, backends(node), index=1, in_flight=1)
    (answer,) = serve(call("POST", "/v1/completions", {"model": "m", "prompt": "hi"}, key=key))
    assert answer.status == 200 and answer.json()["choices"][0]["text"] == "hi"
    assert not NodeModel.objects.filter(pk=recycled.pk).exists()
    assert NodeModel.objects.filter(pk=live.pk).exists()


def test_a_backend_error_is_a_502_with_the_backends_message(key, backends):
    node = make_node()
    replica(node, backends(node, loaded_as=None))  # Health says OK; Predict: "model not loaded"
    answer, streamed = serve(
        call("POST", "/v1/chat/completions", CHAT, key=key),
        call("POST", "/v1/chat/completions", {**CHAT, "stream": True}, key=key),
    )
    for failed in (answer, streamed):
        assert failed.status == 502
        assert failed.error["code"] == "backend_error" and failed.error["type"] == "server_error"
        assert "FAILED_PRECONDITION" in failed.error["message"] and "model not loaded" in failed.error["message"]
    assert in_flight() == 0 and not Lease.objects.live().exists()


def test_a_cold_model_waits_for_its_load_job_then_503_with_retry_after(key, settings):
    settings.GATEWAY_LOAD_WAIT_SECONDS = 0.3
    settings.CONTROLPLANE_LOAD_JOB_RUNNER = "qcluster"  # queued for a qcluster this test does not run
    node = make_node()
    assert Node.objects.record_worker_api(node.pk, available=True)
    blob = backend_pb2.ModelOptions(Model="cold").SerializeToString()
    ModelLoadInfo.objects.upsert("cold", "echo", blob)
    (answer,) = serve(call("POST", "/v1/completions", {"model": "cold", "prompt": "x"}, key=key))
    assert answer.status == 503
    assert answer.error["code"] == "model_loading" and answer.error["type"] == "server_error"
    assert answer.headers["retry-after"] == str(settings.ROUTE_RETRY_AFTER_SECONDS)
    assert LoadJob.objects.filter(model_name="cold", state=LoadJob.State.PENDING).count() == 1


def test_metrics_answer_allowed_peers_and_operator_keys(key, backends):
    _, operator = make_api_key("operator")
    node = make_node()
    replica(node, backends(node))
    served, local, frontend, remote = serve(
        call("POST", "/v1/chat/completions", CHAT, key=key),
        call("GET", "/metrics"),
        call("GET", "/metrics", key=key, peer="192.0.2.7"),
        call("GET", "/metrics", key=operator, peer="192.0.2.7"),
    )
    assert served.status == 200
    assert local.status == 200 and remote.status == 200
    assert (frontend.status, frontend.error["code"]) == (403, "metrics_forbidden")
    text = local.body.decode()
    assert 'controlplane_gateway_requests_total{endpoint="chat_completions",model="m",outcome="ok"}' in text
    assert 'controlplane_gateway_tokens_total{direction="out",model="m"}' in text
    assert "controlplane_gateway_time_to_first_token_seconds_bucket" in text


# --- coalescing: every reply already waiting goes out in one send() ----------------------------


def test_replies_waiting_for_a_slow_client_go_out_together_complete_and_in_order(key, backends):
    node = make_node()
    replica(node, backends(node))  # unthrottled: replies arrive faster than the client takes them
    words = [f"w{i}" for i in range(300)]
    body = {"model": "m", "prompt": " ".join(words), "stream": True, "stream_options": {"include_usage": True}}

    async def scenario():
        app = GatewayApp()
        try:
            return await request(app, "POST", "/v1/completions", body, key=key, send_delay=0.02)
        finally:
            await app.close()

    answer = asyncio.run(scenario())
    assert answer.status == 200, answer.body
    *chunks, done = answer.events
    assert done == "[DONE]" and answer.body.endswith(b"data: [DONE]\n\n")
    texts = [chunk["choices"][0]["text"] for chunk in chunks[:-2]]
    # Still one event per reply (as OpenAI's clients expect), in the backend's order.
    assert len(texts) == len(words) and "".join(texts).split() == words
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == len(words)
    # Fewer writes than events: the replies that waited while a write was slow were framed together.
    assert answer.body_messages < len(answer.events)
    assert in_flight() == 0 and not Lease.objects.live().exists()


def test_a_client_that_hangs_up_in_the_middle_of_a_batch_releases_its_lease(key, backends):
    node = make_node()
    row = replica(node, backends(node))
    body = {"model": "m", "prompt": " ".join(f"w{i}" for i in range(5000)), "stream": True}

    async def scenario():
        app = GatewayApp()
        try:
            return await request(app, "POST", "/v1/completions", body, key=key, hang_up_after_events=3)
        finally:
            await app.close()

    answer = asyncio.run(scenario())
    assert answer.status == 200 and len(answer.events) >= 3 and "[DONE]" not in answer.events
    row.refresh_from_db()
    assert row.in_flight == 0
    assert not Lease.objects.live().exists()


def test_the_backend_stream_comes_in_batches_of_every_reply_already_read(backends):
    node = make_node()
    address = backends(node)
    words = [f"w{i}" for i in range(200)]
    options = backend_pb2.PredictOptions(Prompt=" ".join(words), ModelIdentity="m")

    async def scenario():
        backends_ = Backends()
        batches = []
        try:
            stream = backends_.predict_stream(address, options, token=backend_token(node.pk), timeout=20)
            async for batch in stream:
                batches.append(batch)
                await asyncio.sleep(0.05)  # a busy consumer: the reader goes on meanwhile
        finally:
            await backends_.close()
        return batches

    batches = asyncio.run(scenario())
    assert all(replies for replies, _ in batches)  # never an empty batch
    assert [last for _, last in batches] == [False] * (len(batches) - 1) + [True]
    replies = [reply for batch, _ in batches for reply in batch]
    assert "".join(reply.message.decode() for reply in replies).split() == words
    assert len(batches) < len(replies)


def test_the_stream_interval_gathers_replies_and_the_openai_package_reads_every_event(key, backends, settings):
    """Replies read within ``GATEWAY_STREAM_INTERVAL`` of the previous write go out in one
    write, still one server-sent event each: the official client, reading those writes as
    they came (httpx's ASGI transport hands over each body chunk the app sent), sees exactly
    one chunk per token, the finishing chunk, the usage chunk, and nothing else."""
    import httpx
    import openai

    settings.GATEWAY_STREAM_INTERVAL = 0.05  # far longer than an unthrottled backend takes
    node = make_node()
    replica(node, backends(node))
    words = [f"w{i}" for i in range(300)]
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": " ".join(words)}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def scenario():
        app = GatewayApp()
        try:
            raw = await request(app, "POST", "/v1/chat/completions", body, key=key)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport) as http:
                client_ = openai.AsyncOpenAI(base_url="http://gateway/v1", api_key=key, http_client=http, max_retries=0)
                stream = await client_.chat.completions.create(**body)
                chunks = [chunk async for chunk in stream]
            return raw, chunks
        finally:
            await app.close()

    raw, chunks = asyncio.run(scenario())
    assert raw.status == 200 and raw.events[-1] == "[DONE]"
    assert raw.body_messages < len(raw.events) / 10  # gathered: a handful of writes for 303 events
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    pieces = [chunk.choices[0].delta.content for chunk in chunks[1:-2]]
    assert [piece.strip() for piece in pieces] == words  # one event per token, in order
    assert "".join(pieces) == " ".join(words)
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-2].choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(words)
    # The same events as the raw body's, chunk for chunk.
    assert len(chunks) == len(raw.events) - 1
    assert [c.choices[0].delta.content if c.choices else None for c in chunks] == [
        e["choices"][0]["delta"].get("content") if e["choices"] else None for e in raw.events[:-1]
    ]
    assert in_flight() == 0 and not Lease.objects.live().exists()


def _batches(address, node, options, interval, *, pause=0.0):
    """(seconds since the call, replies, last) for each batch of ``Backends.predict_stream``;
    ``pause``: seconds the consumer is busy after the first batch."""

    async def scenario():
        backends_ = Backends()
        loop = asyncio.get_running_loop()
        seen = []
        try:
            started = loop.time()
            stream = backends_.predict_stream(
                address, options, token=backend_token(node.pk), timeout=20, interval=interval
            )
            async for replies, last in stream:
                seen.append((loop.time() - started, replies, last))
                if len(seen) == 1:
                    await asyncio.sleep(pause)
        finally:
            await backends_.close()
        return seen

    return asyncio.run(scenario())


def test_batches_are_at_least_the_interval_apart_and_complete(backends):
    node = make_node()
    address = backends(node, "m", "echo.tokens_per_second=200")  # 5 ms apart
    words = [f"w{i}" for i in range(60)]
    options = backend_pb2.PredictOptions(Prompt=" ".join(words), ModelIdentity="m")

    batches = _batches(address, node, options, 0.05)
    times = [at for at, _, _ in batches]
    # A batch is handed over no sooner than the interval after the one before (the end of the
    # stream excepted: it is not waited for).
    gaps = [later - earlier for earlier, later in zip(times[:-2], times[1:-1], strict=True)]
    assert all(gap >= 0.05 - 0.002 for gap in gaps), gaps
    assert "".join(reply.message.decode() for _, replies, _ in batches for reply in replies).split() == words
    assert len(batches) < len(words)  # replies were gathered
    # Only the final batch may say the stream is over (it may not: the end can also come
    # after the last replies were handed over, as the iteration's end).
    assert not any(last for _, _, last in batches[:-1])


def test_the_end_of_a_stream_is_not_held_back_by_the_interval(backends):
    node = make_node()
    address = backends(node)  # unthrottled: done in a few milliseconds
    options = backend_pb2.PredictOptions(Prompt=" ".join(f"w{i}" for i in range(50)), ModelIdentity="m")

    batches = _batches(address, node, options, 30.0)
    assert batches[-1][2] is True
    assert batches[-1][0] < 10  # not the 30 s interval: the stream's end woke the wait
    assert sum(len(replies) for _, replies, _ in batches) == 50


def test_what_is_left_when_the_stream_ended_comes_as_one_last_batch(backends):
    node = make_node()
    address = backends(node)
    options = backend_pb2.PredictOptions(Prompt=" ".join(f"w{i}" for i in range(50)), ModelIdentity="m")

    # The consumer is busy for a second after the first batch: the rest has been read (and
    # the stream has ended) by the time it asks again.
    *_, (_, rest, last) = batches = _batches(address, node, options, 0.0, pause=1.0)
    assert len(batches) <= 2 and last is True
    assert b"".join(reply.message for _, replies, _ in batches for reply in replies).split() == [
        f"w{i}".encode() for i in range(50)
    ]
    assert rest


# --- the database threads' sessions ------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("synchronous", [False, True])
def test_the_database_threads_commit_asynchronously_unless_told_otherwise(settings, synchronous):
    from django.db import connection

    from gateway.serving import Database

    settings.GATEWAY_SYNCHRONOUS_COMMIT = synchronous

    def setting():
        with connection.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            return cursor.fetchone()[0]

    async def scenario():
        database = Database(2)
        try:
            return await asyncio.gather(*(database.run(setting) for _ in range(4)))
        finally:
            await asyncio.get_running_loop().run_in_executor(None, database.shutdown)

    assert set(asyncio.run(scenario())) == {"on" if synchronous else "off"}
    assert setting() == "on"  # this thread's connection (not the gateway's) is left as it was


def test_a_key_verified_moments_ago_is_answered_without_a_database_thread(key, settings):
    from gateway.serving import Database, Serving

    settings.API_KEY_CACHE_SECONDS = 60

    async def scenario():
        database = Database(1)
        serving = Serving(database)
        first = await serving.authenticate(key)  # read in a database thread, then cached
        await asyncio.get_running_loop().run_in_executor(None, database.shutdown)
        # No thread left to run anything: only the event loop can answer now.
        return first, await serving.authenticate(key)

    first, again = asyncio.run(scenario())
    assert first is not None and again is not None and again.pk == first.pk


def test_a_user_keeps_to_one_replica_and_many_users_spread(key, backends):
    nodes = [make_node(name="aff-a"), make_node(name="aff-b")]
    for node in nodes:
        replica(node, backends(node))
    same = [call("POST", "/v1/chat/completions", {**CHAT, "user": "alice"}, key=key) for _ in range(6)]
    many = [call("POST", "/v1/chat/completions", {**CHAT, "user": f"user-{i}"}, key=key) for i in range(16)]
    answers = serve(*same, *many)
    assert all(answer.status == 200 for answer in answers), [a.body for a in answers if a.status != 200]
    leases = list(Lease.objects.order_by("created_at").values_list("node_id", flat=True))
    assert len(set(leases[:6])) == 1  # one user, one replica (the load stays even: one at a time)
    assert len(set(leases[6:])) == 2  # sixteen users over two replicas: both serve
    assert in_flight() == 0
