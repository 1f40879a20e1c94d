"""backend.proto must stay wire-compatible with LocalAI's ``backend/backend.proto``: same
package, service, RPCs, messages, field numbers and types. ``backend_schema.json`` (next to
this file) is LocalAI's schema recorded by ``scripts/record_proto_schema.py`` at the commit
named in its ``recorded_from``; our compiled descriptor must match it exactly."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from proto import backend_pb2
from proto.schema import describe_file, differences

RECORDED_PATH = Path(__file__).with_name("backend_schema.json")
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def recorded() -> dict:
    schema = json.loads(RECORDED_PATH.read_text())
    schema.pop("recorded_from")
    return schema


@pytest.fixture(scope="module")
def ours() -> dict:
    return describe_file(backend_pb2.DESCRIPTOR)


def test_backend_proto_matches_the_recorded_localai_schema(recorded, ours):
    drift = differences(recorded, ours)
    assert not drift, "backend.proto departs from LocalAI's recorded schema:\n" + "\n".join(drift)


def test_the_recorded_schema_names_the_localai_commit_it_pins():
    source = json.loads(RECORDED_PATH.read_text())["recorded_from"]
    assert source["repository"] == "mudler/LocalAI"
    assert source["path"] == "backend/backend.proto"
    assert len(source["commit"]) == 40
    assert source["date"]


def test_the_recorded_schema_holds_what_frontends_of_the_current_localai_send(recorded):
    """The fields and RPCs a subset would miss, by number: a guard on the recording itself."""
    messages = recorded["messages"]

    def field(message: str, number: int) -> tuple[str, str, str]:
        fields = messages[f"backend.{message}"]["fields"]
        name, entry = next((n, e) for n, e in fields.items() if e["number"] == number)
        return name, entry["type"], entry["label"]

    assert recorded["package"] == "backend"
    assert len(recorded["services"]["backend.Backend"]) == 52
    assert field("ModelOptions", 65) == ("GrammarTriggers", "message", "repeated")
    assert field("ModelOptions", 75) == ("EnableScore", "bool", "optional")
    assert field("PredictOptions", 44) == ("Messages", "message", "repeated")
    assert field("PredictOptions", 48) == ("Tools", "string", "optional")
    assert field("PredictOptions", 54) == ("ModelIdentity", "string", "optional")
    assert field("Reply", 7) == ("logprobs", "bytes", "optional")
    assert field("Reply", 8) == ("chat_deltas", "message", "repeated")
    assert [field("EmbeddingResult", n)[0] for n in range(1, 6)] == [
        "embeddings",
        "tokens",
        "dim",
        "prompt_tokens",
        "layout",
    ]
    assert field("ProxyOptions", 8) == ("cache_prompt", "bool", "optional")
    assert len(messages["backend.PredictOptions"]["fields"]) == 53


def _mutate(schema: dict, path: tuple, value) -> dict:
    changed = copy.deepcopy(schema)
    target = changed
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return changed


_DELETE = object()
_MODEL_OPTIONS = ("messages", "backend.ModelOptions", "fields")
_PREDICT = ("services", "backend.Backend", "Predict")


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            (*_MODEL_OPTIONS, "EnableScore", "number"),
            76,
            "backend.ModelOptions.EnableScore: number recorded 76, ours 75",
        ),
        (
            (*_MODEL_OPTIONS, "ContextSize", "type"),
            "int64",
            "backend.ModelOptions.ContextSize: type recorded 'int64', ours 'int32'",
        ),
        (
            (*_MODEL_OPTIONS, "LoraScales", "label"),
            "optional",
            "backend.ModelOptions.LoraScales: label recorded 'optional', ours 'repeated'",
        ),
        (
            (*_MODEL_OPTIONS, "Proxy", "type_name"),
            "backend.OtherProxy",
            "backend.ModelOptions.Proxy: type_name recorded 'backend.OtherProxy', ours 'backend.ProxyOptions'",
        ),
        (
            ("messages", "backend.PredictOptions", "fields", "ModelIdentity"),
            _DELETE,
            "backend.PredictOptions.ModelIdentity (number 54): declared here but not in the recorded schema",
        ),
        (
            (*_PREDICT, "server_streaming"),
            True,
            "rpc backend.Backend/Predict: server_streaming recorded True, ours False",
        ),
        (
            ("enums", "backend.StatusResponse.State", "ERROR"),
            -2,
            "backend.StatusResponse.State.ERROR: recorded -2, ours -1",
        ),
        (
            ("messages", "backend.PredictOptions", "reserved_numbers"),
            [25],
            "backend.PredictOptions: reserved_numbers recorded [25], ours [24]",
        ),
    ],
    ids=["renumbered", "retyped", "relabelled", "message-type", "extra-field", "streaming", "enum-value", "reserved"],
)
def test_a_drift_from_the_recording_is_reported_naming_the_field(recorded, ours, path, value, expected):
    assert differences(_mutate(recorded, path, value), ours) == [expected]


def test_a_field_or_rpc_we_lack_is_reported_as_missing(recorded, ours):
    recorded_more = copy.deepcopy(recorded)
    recorded_more["messages"]["backend.ModelOptions"]["fields"]["FutureKnob"] = {
        "number": 76,
        "type": "bool",
        "label": "optional",
    }
    recorded_more["services"]["backend.Backend"]["FutureRpc"] = {
        "input_type": "backend.HealthMessage",
        "output_type": "backend.Reply",
        "client_streaming": False,
        "server_streaming": False,
    }

    assert differences(recorded_more, ours) == [
        "backend.ModelOptions.FutureKnob (number 76): missing",
        "rpc backend.Backend/FutureRpc: missing",
    ]


def test_the_recorder_describes_our_proto_as_the_runtime_descriptor_does(ours):
    """scripts/record_proto_schema.py compiles a .proto with protoc; run on our own file it
    must give what the generated module says (so a recording of LocalAI's file is comparable)."""
    pytest.importorskip("grpc_tools")
    import importlib.util

    spec = importlib.util.spec_from_file_location("record_proto_schema", REPO_ROOT / "scripts/record_proto_schema.py")
    recorder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recorder)

    compiled = recorder.record(REPO_ROOT / "proto/backend.proto", repository="r", path="p", commit="c", date="d")

    assert compiled.pop("recorded_from") == {"repository": "r", "path": "p", "commit": "c", "date": "d"}
    assert compiled == ours
