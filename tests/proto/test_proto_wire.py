"""backend.proto must stay wire-compatible with LocalAI: the tables below are copied from
docs/localai-wire.md and compared with the generated descriptors."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import FieldDescriptor as F

from proto import backend_pb2

STRING, INT32, BOOL, FLOAT, DOUBLE, BYTES, UINT64, MESSAGE, ENUM = (
    F.TYPE_STRING,
    F.TYPE_INT32,
    F.TYPE_BOOL,
    F.TYPE_FLOAT,
    F.TYPE_DOUBLE,
    F.TYPE_BYTES,
    F.TYPE_UINT64,
    F.TYPE_MESSAGE,
    F.TYPE_ENUM,
)
REPEATED = True

# (name, number, type, repeated)
MODEL_OPTIONS = [
    ("Model", 1, STRING, False),
    ("ContextSize", 2, INT32, False),
    ("Seed", 3, INT32, False),
    ("NBatch", 4, INT32, False),
    ("F16Memory", 5, BOOL, False),
    ("MLock", 6, BOOL, False),
    ("MMap", 7, BOOL, False),
    ("VocabOnly", 8, BOOL, False),
    ("LowVRAM", 9, BOOL, False),
    ("Embeddings", 10, BOOL, False),
    ("NUMA", 11, BOOL, False),
    ("NGPULayers", 12, INT32, False),
    ("MainGPU", 13, STRING, False),
    ("TensorSplit", 14, STRING, False),
    ("Threads", 15, INT32, False),
    ("RopeFreqBase", 17, FLOAT, False),
    ("RopeFreqScale", 18, FLOAT, False),
    ("RMSNormEps", 19, FLOAT, False),
    ("NGQA", 20, INT32, False),
    ("ModelFile", 21, STRING, False),
    ("PipelineType", 26, STRING, False),
    ("SchedulerType", 27, STRING, False),
    ("CUDA", 28, BOOL, False),
    ("CFGScale", 29, FLOAT, False),
    ("IMG2IMG", 30, BOOL, False),
    ("CLIPModel", 31, STRING, False),
    ("CLIPSubfolder", 32, STRING, False),
    ("CLIPSkip", 33, INT32, False),
    ("Tokenizer", 34, STRING, False),
    ("LoraBase", 35, STRING, False),
    ("LoraAdapter", 36, STRING, False),
    ("NoMulMatQ", 37, BOOL, False),
    ("AudioPath", 38, STRING, False),
    ("DraftModel", 39, STRING, False),
    ("Quantization", 40, STRING, False),
    ("MMProj", 41, STRING, False),
    ("LoraScale", 42, FLOAT, False),
    ("RopeScaling", 43, STRING, False),
    ("YarnExtFactor", 44, FLOAT, False),
    ("YarnAttnFactor", 45, FLOAT, False),
    ("YarnBetaFast", 46, FLOAT, False),
    ("YarnBetaSlow", 47, FLOAT, False),
    ("ControlNet", 48, STRING, False),
    ("Type", 49, STRING, False),
    ("GPUMemoryUtilization", 50, FLOAT, False),
    ("TrustRemoteCode", 51, BOOL, False),
    ("EnforceEager", 52, BOOL, False),
    ("SwapSpace", 53, INT32, False),
    ("MaxModelLen", 54, INT32, False),
    ("TensorParallelSize", 55, INT32, False),
    ("FlashAttention", 56, STRING, False),
    ("NoKVOffload", 57, BOOL, False),
    ("LoadFormat", 58, STRING, False),
    ("ModelPath", 59, STRING, False),
    ("LoraAdapters", 60, STRING, REPEATED),
    ("LoraScales", 61, FLOAT, REPEATED),
    ("Options", 62, STRING, REPEATED),
    ("CacheTypeKey", 63, STRING, False),
    ("CacheTypeValue", 64, STRING, False),
    ("DisableLogStatus", 66, BOOL, False),
    ("DType", 67, STRING, False),
    ("LimitImagePerPrompt", 68, INT32, False),
    ("LimitVideoPerPrompt", 69, INT32, False),
    ("LimitAudioPerPrompt", 70, INT32, False),
    ("Reranking", 71, BOOL, False),
    ("Overrides", 72, STRING, REPEATED),
    ("EngineArgs", 73, STRING, False),
    ("Proxy", 74, MESSAGE, False),
]

OTHER_MESSAGES = {
    "HealthMessage": [],
    "Result": [("message", 1, STRING, False), ("success", 2, BOOL, False)],
    "Reply": [
        ("message", 1, BYTES, False),
        ("tokens", 2, INT32, False),
        ("prompt_tokens", 3, INT32, False),
        ("timing_prompt_processing", 4, DOUBLE, False),
        ("timing_token_generation", 5, DOUBLE, False),
        ("audio", 6, BYTES, False),
    ],
    "EmbeddingResult": [("embeddings", 1, FLOAT, REPEATED)],
    "StatusResponse": [("state", 1, ENUM, False), ("memory", 2, MESSAGE, False)],
    "MemoryUsageData": [("total", 1, UINT64, False), ("breakdown", 2, MESSAGE, REPEATED)],
    "PredictOptions": [
        ("Prompt", 1, STRING, False),
        ("Seed", 2, INT32, False),
        ("Threads", 3, INT32, False),
        ("Tokens", 4, INT32, False),
        ("TopK", 5, INT32, False),
        ("Temperature", 9, FLOAT, False),
        ("StopPrompts", 13, STRING, REPEATED),
        ("TopP", 32, FLOAT, False),
        ("Embeddings", 36, STRING, False),
        ("CorrelationId", 47, STRING, False),
        ("Metadata", 52, MESSAGE, REPEATED),
    ],
    "ProxyOptions": [
        ("upstream_url", 1, STRING, False),
        ("mode", 2, STRING, False),
        ("provider", 3, STRING, False),
        ("api_key_env", 4, STRING, False),
        ("api_key_file", 5, STRING, False),
        ("upstream_model", 6, STRING, False),
        ("request_timeout_seconds", 7, INT32, False),
    ],
}

SERVICE = [
    ("Health", "HealthMessage", "Reply", False),
    ("LoadModel", "ModelOptions", "Result", False),
    ("Free", "HealthMessage", "Result", False),
    ("Status", "HealthMessage", "StatusResponse", False),
    ("Predict", "PredictOptions", "Reply", False),
    ("PredictStream", "PredictOptions", "Reply", True),
    ("Embedding", "PredictOptions", "EmbeddingResult", False),
]


def declared(message_name: str) -> list[tuple[str, int, int, bool]]:
    descriptor = backend_pb2.DESCRIPTOR.message_types_by_name[message_name]
    return sorted(
        ((f.name, f.number, f.type, f.is_repeated) for f in descriptor.fields),
        key=lambda row: row[1],
    )


def test_model_options_matches_localai_field_for_field():
    assert declared("ModelOptions") == MODEL_OPTIONS


def test_model_options_leaves_grammar_triggers_undeclared():
    assert 65 not in backend_pb2.ModelOptions.DESCRIPTOR.fields_by_number


def test_model_options_proxy_is_proxy_options():
    proxy = backend_pb2.ModelOptions.DESCRIPTOR.fields_by_name["Proxy"]
    assert proxy.message_type.full_name == "backend.ProxyOptions"


@pytest.mark.parametrize("message_name", sorted(OTHER_MESSAGES))
def test_message_matches_localai(message_name):
    assert declared(message_name) == OTHER_MESSAGES[message_name]


@pytest.mark.parametrize(
    ("message_name", "field_name", "key_type", "value_type"),
    [("MemoryUsageData", "breakdown", STRING, UINT64), ("PredictOptions", "Metadata", STRING, STRING)],
)
def test_map_fields_have_localai_key_and_value_types(message_name, field_name, key_type, value_type):
    field = backend_pb2.DESCRIPTOR.message_types_by_name[message_name].fields_by_name[field_name]
    entry = field.message_type
    assert entry.GetOptions().map_entry
    assert (entry.fields_by_name["key"].type, entry.fields_by_name["value"].type) == (
        key_type,
        value_type,
    )


def test_status_state_enum_values():
    state = backend_pb2.StatusResponse.DESCRIPTOR.enum_types_by_name["State"]
    assert {v.name: v.number for v in state.values} == {
        "UNINITIALIZED": 0,
        "BUSY": 1,
        "READY": 2,
        "ERROR": -1,
    }
    memory = backend_pb2.StatusResponse.DESCRIPTOR.fields_by_name["memory"]
    assert memory.message_type.full_name == "backend.MemoryUsageData"


def test_service_name_and_methods_match_localai():
    assert backend_pb2.DESCRIPTOR.package == "backend"
    service = backend_pb2.DESCRIPTOR.services_by_name["Backend"]
    assert service.full_name == "backend.Backend"
    methods = {(m.name, m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods}
    assert set(SERVICE) <= methods
    assert not any(m.client_streaming for m in service.methods)
