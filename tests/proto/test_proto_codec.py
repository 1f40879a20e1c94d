"""proto.codec: blobs, JSON, summaries; unknown (newer LocalAI) fields must survive."""

from __future__ import annotations

import pytest

from proto import backend_pb2, codec
from tests.proto.every_field import model_options_with_every_field, recorded_model_options_fields


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3 | 0) + varint(value)


def field_bytes(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def known_blob() -> bytes:
    return backend_pb2.ModelOptions(
        Model="llama-3.gguf", ContextSize=8192, NGPULayers=99, Type="llama-cpp"
    ).SerializeToString()


# Field numbers no LocalAI ModelOptions declares (yet): what a newer frontend may send.
FUTURE_MESSAGE_FIELD, FUTURE_VARINT_FIELD = 199, 99


def blob_from_newer_localai() -> bytes:
    """Known fields, then a length-delimited field and a varint field that neither LocalAI's
    recorded schema nor our backend.proto declares (as a newer LocalAI might send)."""
    nested = field_bytes(1, b"<tool_call>")
    return known_blob() + field_bytes(FUTURE_MESSAGE_FIELD, nested) + field_varint(FUTURE_VARINT_FIELD, 7)


def test_the_future_field_numbers_are_really_undeclared():
    declared = backend_pb2.ModelOptions.DESCRIPTOR.fields_by_number
    assert FUTURE_MESSAGE_FIELD not in declared
    assert FUTURE_VARINT_FIELD not in declared


def test_blob_with_unknown_fields_parses_and_reserializes_identically():
    blob = blob_from_newer_localai()

    message = codec.options_from_blob(blob)

    assert message.Model == "llama-3.gguf"
    assert message.ContextSize == 8192
    assert message.SerializeToString() == blob


def test_options_to_json_reads_a_blob_with_unknown_fields():
    assert codec.options_to_json(blob_from_newer_localai()) == {
        "Model": "llama-3.gguf",
        "ContextSize": 8192,
        "NGPULayers": 99,
        "Type": "llama-cpp",
    }


def test_options_to_json_omits_default_values():
    message = backend_pb2.ModelOptions(Model="m", ContextSize=0, Embeddings=False)

    assert codec.options_to_json(message) == {"Model": "m"}


def test_json_round_trip_keeps_every_kind_of_field():
    obj = {
        "Model": "m.gguf",
        "ContextSize": 4096,
        "NGPULayers": -1,
        "Embeddings": True,
        "GPUMemoryUtilization": 0.9,
        "LoraScales": [0.5, 1.0],
        "Options": ["use_jinja:true", "vram_bytes=1024"],
        "Proxy": {"upstream_url": "http://up:8080", "request_timeout_seconds": 30},
    }

    message = codec.options_from_json(obj)

    assert codec.options_to_json(message) == obj
    assert codec.options_from_blob(codec.options_to_blob(message)) == message


def test_json_form_accepts_every_field_of_localais_model_options():
    """Every ModelOptions field of LocalAI's recorded schema (GrammarTriggers, a repeated
    message; EnableScore; Proxy with cache_prompt ...), set to a non-default value, goes
    through the JSON form and back unchanged."""
    message = model_options_with_every_field()

    obj = codec.options_to_json(message)

    assert set(obj) == set(recorded_model_options_fields())
    assert codec.options_from_json(obj) == message
    assert codec.options_to_blob(codec.options_from_json(obj)) == message.SerializeToString()


def test_options_from_json_lists_every_unknown_field_name():
    with pytest.raises(codec.InvalidModelOptions) as excinfo:
        codec.options_from_json({"Model": "m", "context_size": 1, "gpu_layers": 2})

    assert "context_size" in str(excinfo.value)
    assert "gpu_layers" in str(excinfo.value)


@pytest.mark.parametrize(
    "obj",
    [
        {"ContextSize": "lots"},
        {"Embeddings": "yes"},
        {"Model": 3},
        {"Options": "not-a-list"},
        {"Proxy": {"no_such_field": "x"}},
    ],
)
def test_options_from_json_rejects_wrong_types(obj):
    with pytest.raises(codec.InvalidModelOptions):
        codec.options_from_json(obj)


def test_options_from_json_rejects_a_non_object():
    with pytest.raises(codec.InvalidModelOptions):
        codec.options_from_json(["Model", "m"])


@pytest.mark.parametrize(
    "garbage",
    [b"\xff\xff\xff\xff", b"not a protobuf", field_bytes(1, b"\xff\xfe")],
    ids=["corrupt-tag", "plain-text", "bad-utf8-in-Model"],
)
def test_garbage_blob_is_rejected_with_a_typed_error(garbage):
    with pytest.raises(codec.InvalidModelOptions):
        codec.options_from_blob(garbage)
    assert issubclass(codec.InvalidModelOptions, ValueError)


def test_blob_given_as_memoryview_parses():
    assert codec.options_from_blob(memoryview(known_blob())).Model == "llama-3.gguf"


def test_summary_has_every_read_field_even_at_defaults():
    summary = codec.summarize_options(blob_from_newer_localai())

    assert summary == {
        "Model": "llama-3.gguf",
        "ModelFile": "",
        "ContextSize": 8192,
        "NGPULayers": 99,
        "Type": "llama-cpp",
        "Embeddings": False,
        "Reranking": False,
    }


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ([], 0),
        (["use_jinja:true"], 0),
        (["vram_bytes=8000000000"], 8_000_000_000),
        (["vram_bytes:42"], 42),
        (["memory_bytes=100"], 100),
        (["memory_bytes=100", "vram_bytes=200"], 200),
        (["vram_bytes=lots", "memory_bytes=5"], 5),
        (["vram_bytes=-3"], 0),
    ],
)
def test_vram_estimate_comes_only_from_explicit_options_hints(options, expected):
    message = backend_pb2.ModelOptions(Model="m", NGPULayers=99, Options=options)

    assert codec.estimate_vram_bytes(message) == expected
    assert codec.estimate_vram_bytes(message.SerializeToString()) == expected
