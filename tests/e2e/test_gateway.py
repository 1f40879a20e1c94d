"""The OpenAI-compatible gateway end to end, driven by the official ``openai`` package (a client
nobody here wrote): real processes on loopback, PostgreSQL, one fleet for the module.

web (gunicorn) + qcluster (reconciler, cold-load jobs) + the gateway (``manage.py gateway``) +
two reference workers whose backends are the built-in ``echo`` backend (it answers a chat with
the last user message and a completion with the prompt, token by token, and counts tokens as
LocalAI's backends do). The worker-kill scenario runs last: it leaves the fleet a worker short.
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.request

import openai
import pytest
from django.conf import settings

from tests.e2e.harness import Fleet, fast_settings, wait_for
from worker.backends.echo import embed

# One fleet for the module: its tests run in one xdist worker, in file order.
pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.xdist_group("gateway-e2e")]

SLOW = {"backend_type": "echo", "model_options": {"Model": "slow", "Options": ["echo.tokens_per_second=20"]}}
STEADY = {"backend_type": "echo", "model_options": {"Model": "steady", "Options": ["echo.tokens_per_second=100"]}}
WORDS = " ".join(f"w{index}" for index in range(60))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    database = settings.DATABASES["default"]
    if not database["ENGINE"].endswith("postgresql"):
        pytest.skip("end-to-end tests run on the PostgreSQL lane")
    workdir = tmp_path_factory.mktemp("gateway-fleet")
    (workdir / "var").mkdir()
    fleet = Fleet(admin_url=database, workdir=workdir)
    fleet.settings_env.update(fast_settings(CONTROLPLANE_GATEWAY_LOAD_WAIT_SECONDS="30"))
    failed = True
    try:
        fleet.create_database()
        fleet.start_web(workers=1)
        fleet.start_qcluster()
        fleet.workers = {name: fleet.start_worker(name, slots=2) for name in ("gw-a", "gw-b")}
        fleet.wait_nodes(set(fleet.workers))
        fleet.set_floor("tiny", 2)
        fleet.start_gateway()
        fleet.wait_converged("tiny", 2, 60)
        failed = False
        yield fleet
    finally:
        if failed:
            print(fleet.logs())
        fleet.close()


@pytest.fixture
def openai_client(fleet, request):
    yield openai.OpenAI(base_url=fleet.gateway_url, api_key=fleet.api_key, max_retries=0, timeout=60)
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(fleet.logs())


def live_leases(fleet) -> int:
    return fleet.sql("SELECT count(*) FROM registry_lease WHERE released_at IS NULL")[0][0]


def in_flight(fleet) -> int:
    return fleet.sql("SELECT coalesce(sum(in_flight), 0) FROM registry_nodemodel")[0][0]


def test_models_lists_what_can_be_routed_to(fleet, openai_client):
    models = {model.id: model for model in openai_client.models.list()}
    assert "tiny" in models, models
    assert models["tiny"].object == "model"
    assert models["tiny"].model_extra["ready_replicas"] == 2
    assert openai_client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("no-such-model")


def test_chat_and_completion_whole_and_streamed(fleet, openai_client):
    messages = [
        {"role": "system", "content": "You are a fleet."},
        {"role": "user", "content": "hello fleet of echoes"},
    ]
    chat = openai_client.chat.completions.create(model="tiny", messages=messages)
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == "hello fleet of echoes"
    assert chat.choices[0].finish_reason == "stop"
    # The backend's counts: every message's words in, the answer's tokens out.
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (8, 4)
    assert chat.usage.total_tokens == 12

    capped = openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert capped.choices[0].message.content == "hello fleet"
    assert capped.choices[0].finish_reason == "length"

    completion = openai_client.completions.create(model="tiny", prompt="one two three", temperature=0.2)
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "one two three"
    assert completion.usage.completion_tokens == 3

    stream = openai_client.chat.completions.create(
        model="tiny", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "hello fleet of echoes"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].choices == []
    assert len({chunk.id for chunk in chunks}) == 1

    pieces = [c.choices[0].text for c in openai_client.completions.create(model="tiny", prompt=WORDS, stream=True)]
    assert "".join(pieces) == WORDS
    assert len([piece for piece in pieces if piece]) == 60  # one event per token
    # Each lease is released right after its answer's last byte.
    wait_for(lambda: live_leases(fleet) == 0 and in_flight(fleet) == 0, timeout=5, what="leases released")


def test_embeddings_float_and_base64(fleet, openai_client):
    # The openai package asks for base64 unless told otherwise and decodes it.
    result = openai_client.embeddings.create(model="tiny", input=["alpha beta", "gamma"])
    assert [item.index for item in result.data] == [0, 1]
    for item, text in zip(result.data, ["alpha beta", "gamma"], strict=True):
        assert item.embedding == pytest.approx(embed(text), abs=1e-6)
    assert result.usage.prompt_tokens == 3
    floats = openai_client.embeddings.create(model="tiny", input="alpha beta", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(embed("alpha beta"), abs=1e-6)


def test_wrong_key_unknown_model_and_bad_input(fleet, openai_client):
    wrong = openai.OpenAI(base_url=fleet.gateway_url, api_key="cpk_not_a_key_at_all_0000", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()

    with pytest.raises(openai.NotFoundError) as unknown:
        openai_client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert unknown.value.code == "model_not_found"
    assert unknown.value.body["param"] == "model"

    with pytest.raises(openai.BadRequestError) as bad:
        openai_client.chat.completions.create(model="tiny", messages=[], temperature=0.5)
    assert bad.value.body["param"] == "messages"


def test_a_cold_model_loads_and_a_dropped_stream_gives_its_lease_back(fleet, openai_client):
    status, body = fleet.api("PUT", "/api/v1/models/slow/load-info", SLOW)
    assert status in (200, 201), body
    # Not loaded anywhere: the first request waits for the load job the qcluster runs.
    first = openai_client.completions.create(model="slow", prompt="warm up")
    assert first.choices[0].text == "warm up"

    # 60 tokens at 20/s: three seconds of stream. Read a few chunks, then hang up.
    stream = openai_client.completions.create(model="slow", prompt=WORDS, stream=True)
    received = []
    for chunk in stream:
        received.append(chunk.choices[0].text)
        if len(received) == 3:
            assert in_flight(fleet) == 1 and live_leases(fleet) == 1
            break
    stream.close()
    dropped = time.monotonic()
    wait_for(lambda: in_flight(fleet) == 0 and live_leases(fleet) == 0, timeout=5, what="lease released")
    assert time.monotonic() - dropped < 2.5  # released at the hang-up, not when the stream would have ended
    assert "".join(received) == " ".join(WORDS.split()[:3])

    with urllib.request.urlopen(f"http://127.0.0.1:{fleet.gateway_port}/metrics", timeout=5) as response:
        scraped = response.read().decode()
    assert 'controlplane_gateway_requests_total{endpoint="completions",model="slow",outcome="cancelled"} 1.0' in scraped
    assert 'controlplane_gateway_streams_in_flight{model="slow"} 0.0' in scraped
    # The replica is free again: the next request is served at once.
    assert openai_client.completions.create(model="slow", prompt="again").choices[0].text == "again"


def test_a_worker_killed_mid_traffic_costs_at_most_its_requests_in_flight(fleet, report):
    # Both workers placeable when the floor is set: spread placement then puts one replica on
    # each (a worker that missed a ListBackends deadline under load is not placed on meanwhile).
    wait_for(
        lambda: all(
            node["status"] == "healthy" and node["worker_api"] == "available"
            for name, node in fleet.nodes().items()
            if name in ("gw-a", "gw-b")
        ),
        timeout=30,
        what="both workers healthy and answering the worker service",
    )
    status, body = fleet.api("PUT", "/api/v1/models/steady/load-info", STEADY)
    assert status in (200, 201), body
    status, body = fleet.api("PUT", "/api/v1/models/steady/scheduling", {"min_replicas": 2})
    assert status in (200, 201), body
    fleet.wait_converged("steady", 2, 60)
    holders = {row["node"] for row in fleet.replica_rows("steady") if row["state"] == "loaded"}
    if holders != {"gw-a", "gw-b"}:
        print(fleet.logs())  # why the placement did not spread: the reconciler's and workers' logs
    assert holders == {"gw-a", "gw-b"}, holders  # spread: one replica on each worker

    records: list[tuple[float, float, str]] = []  # (started, ended, outcome)
    stop = threading.Event()

    def client_loop():
        client = openai.OpenAI(base_url=fleet.gateway_url, api_key=fleet.api_key, max_retries=0, timeout=30)
        while not stop.is_set():
            started = time.monotonic()
            try:
                text = "".join(
                    chunk.choices[0].text
                    for chunk in client.completions.create(model="steady", prompt="a b c d e f g h i j", stream=True)
                )
                outcome = "ok" if text == "a b c d e f g h i j" else f"wrong text {text!r}"
            except openai.APIError as error:
                outcome = f"{type(error).__name__}: {error}"
            records.append((started, time.monotonic(), outcome))

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(records) >= 8, timeout=60, what="traffic flowing")
    killed = time.monotonic()
    fleet.stop(fleet.workers["gw-b"], signal.SIGKILL)  # its backends die with it (PR_SET_PDEATHSIG)
    wait_for(lambda: len([r for r in records if r[0] > killed + 1]) >= 8, timeout=60, what="traffic after the kill")
    stop.set()
    for thread in threads:
        thread.join(40)

    before = [r for r in records if r[1] < killed]
    spanning = [r for r in records if r[0] <= killed <= r[1]]
    after = [r for r in records if r[0] > killed]
    failed = [r for r in records if r[2] != "ok"]
    report(
        f"gateway e2e: worker SIGKILL under 4 streaming clients: {len(before)} requests before, "
        f"{len(spanning)} in flight at the kill, {len(after)} after; {len(failed)} failed"
    )
    assert before and after
    assert all(r[2] == "ok" for r in before), before
    # Only requests in flight on the killed worker may fail (at most one per client) ...
    assert len(failed) <= len(spanning), failed
    assert all(r in spanning for r in failed), failed
    # ... and every request that started after the kill was served (re-routed off the dead replica).
    assert all(r[2] == "ok" for r in after), [r for r in after if r[2] != "ok"]
    wait_for(lambda: in_flight(fleet) == 0 and live_leases(fleet) == 0, timeout=10, what="every lease released")
