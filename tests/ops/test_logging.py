"""Log lines: request id in and out, context fields on every line, JSON format."""

import io
import json
import logging

import pytest
from django.utils import timezone

from core.logs import ContextFilter, JsonFormatter, ReadableFormatter, log_context, logging_config
from reconciler.reconcile import reconcile_once
from tests.reconciler.fakes import FakeProber, FakeScheduler

pytestmark = pytest.mark.django_db


@pytest.fixture
def json_lines():
    """Attach a JSON handler (with the context filter) to the root logger; returns a function
    giving the parsed lines so far."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(previous)


def test_request_id_is_taken_from_the_request_answered_and_on_its_log_lines(client, json_lines):
    response = client.get("/metrics", REMOTE_ADDR="10.9.9.9", HTTP_X_REQUEST_ID="req-abc-123")
    assert response.status_code == 403
    assert response["X-Request-ID"] == "req-abc-123"
    forbidden = [line for line in json_lines() if line["logger"] == "django.request"]
    assert forbidden and forbidden[-1]["request_id"] == "req-abc-123"
    assert forbidden[-1]["level"] == "WARNING"


def test_a_missing_or_unsafe_request_id_is_replaced(client):
    generated = client.get("/livez")["X-Request-ID"]
    assert len(generated) == 32
    assert client.get("/livez", HTTP_X_REQUEST_ID="bad id\nwith newline")["X-Request-ID"] != "bad id\nwith newline"


def test_model_and_node_from_the_url_are_on_the_request_log_lines(client, json_lines):
    client.get("/api/v1/models/ctx-model/load-info")  # 401: logged by django.request
    line = [entry for entry in json_lines() if entry["logger"] == "django.request"][-1]
    assert line["model"] == "ctx-model"
    assert line["request_id"]


def test_reconcile_pass_lines_carry_the_pass_id(json_lines):
    reconcile_once(now=timezone.now(), scheduler=FakeScheduler(), prober=FakeProber())
    summary = [line for line in json_lines() if line["message"].startswith("reconcile pass ok")]
    assert summary and len(summary[-1]["pass_id"]) == 12


def test_context_does_not_leak_after_the_block(json_lines):
    with log_context(node="n-1", model="m-1", replica=0):
        logging.getLogger("ops.test").info("inside")
    logging.getLogger("ops.test").info("outside")
    inside, outside = [line for line in json_lines() if line["logger"] == "ops.test"]
    assert (inside["node"], inside["model"], inside["replica"]) == ("n-1", "m-1", "0")
    assert "node" not in outside


def test_json_lines_carry_exceptions_and_extras():
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("here",), None)
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    record.model = "m"
    record.attempt = 3
    ContextFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "failed here"
    assert line["model"] == "m" and line["attempt"] == 3
    assert "ValueError: boom" in line["exc_info"]


def test_readable_lines_append_the_context():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", (), None)
    with log_context(request_id="r-1"):
        ContextFilter().filter(record)
    assert ReadableFormatter().format(record).endswith("hello [request_id=r-1]")


def test_log_format_selects_the_formatter():
    assert logging_config(fmt="json")["handlers"]["console"]["formatter"] == "json"
    assert logging_config()["handlers"]["console"]["formatter"] == "readable"
    assert logging_config()["handlers"]["console"]["filters"] == ["context", "client_errors"]
