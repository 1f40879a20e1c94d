"""Conversions between stored ModelOptions blobs, protobuf messages and JSON.

The control plane stores a model's ``ModelOptions`` as the exact bytes it received (from a
LocalAI frontend or an operator). ``backend.proto`` declares every field of LocalAI's schema at
the commit recorded in ``tests/proto/backend_schema.json``, so the JSON form accepts all of
them; a newer LocalAI may still set fields we do not declare yet. Protobuf keeps those as
unknown fields, so parsing is safe for *reading*, but the blob
itself is the source of truth: nothing here is meant to produce bytes for storage from a parsed
blob, and :func:`proto.client.load_model` sends stored bytes to backends untouched.

JSON form: keys are the proto field names exactly as declared (``"Model"``, ``"ContextSize"``,
``"NGPULayers"``), values follow the proto3 JSON mapping. Fields at their default value
(``""``, ``0``, ``false``, empty lists) are OMITTED, because proto3 cannot tell "unset" from
"default" for these scalars and LocalAI treats a default as "not configured";
readers should use ``.get(name, default)`` or :func:`summarize_options`, which always returns
its keys. Unknown (undeclared) fields do not appear in JSON.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from proto import backend_pb2

__all__ = [
    "InvalidModelOptions",
    "SUMMARY_FIELDS",
    "estimate_vram_bytes",
    "options_from_blob",
    "options_from_json",
    "options_to_blob",
    "options_to_json",
    "summarize_options",
]

# The ModelOptions fields the control plane reads (placement, display).
SUMMARY_FIELDS = (
    "Model",
    "ModelFile",
    "ContextSize",
    "NGPULayers",
    "Type",
    "Embeddings",
    "Reranking",
)

# Keys recognised in ModelOptions.Options entries by estimate_vram_bytes, in priority order.
_VRAM_OPTION_KEYS = ("vram_bytes", "memory_bytes")

_MODEL_OPTIONS_FIELDS = frozenset(f.name for f in backend_pb2.ModelOptions.DESCRIPTOR.fields)


class InvalidModelOptions(ValueError):
    """The bytes or JSON given are not a valid ModelOptions (callers map this to HTTP 400)."""


def options_from_blob(blob: bytes | bytearray | memoryview) -> backend_pb2.ModelOptions:
    """Parse a stored blob; undeclared fields are kept as unknown fields.

    ``memoryview`` is accepted because Django's BinaryField returns one on PostgreSQL.
    Raises InvalidModelOptions when the bytes are not a ModelOptions wire encoding (or are not
    bytes at all).
    """
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise InvalidModelOptions(f"ModelOptions blob must be bytes, got {type(blob).__name__}")
    message = backend_pb2.ModelOptions()
    try:
        message.ParseFromString(bytes(blob))
    except DecodeError as exc:
        raise InvalidModelOptions(f"ModelOptions blob does not parse: {exc}") from exc
    return message


class CheckedOptions(bytes):
    """Serialized ``ModelOptions`` already known to parse: what ``check_options`` and
    ``options_to_blob`` return. A layer that received one (the router, from the API's
    serializer field) does not decode it again to validate it."""


def check_options(blob: bytes | bytearray | memoryview) -> CheckedOptions:
    """The received bytes, unchanged, once they parse as ``ModelOptions`` (so fields a newer
    LocalAI sets and this module does not declare survive); raises InvalidModelOptions."""
    if isinstance(blob, CheckedOptions):
        return blob
    options_from_blob(blob)
    return CheckedOptions(blob)


def options_to_blob(message: backend_pb2.ModelOptions) -> CheckedOptions:
    """Serialize a message built by the control plane (e.g. from JSON an operator posted).

    Do not use this to re-store a blob that came from elsewhere: keep the received bytes.
    """
    return CheckedOptions(message.SerializeToString())


def options_to_json(
    message_or_blob: backend_pb2.ModelOptions | bytes | bytearray | memoryview,
) -> dict[str, Any]:
    """JSON-ready dict with proto field names; default-valued fields are omitted.

    Raises InvalidModelOptions when given bytes that do not parse.
    """
    message = _as_message(message_or_blob)
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def options_from_json(obj: dict[str, Any]) -> backend_pb2.ModelOptions:
    """Build a ModelOptions from its JSON form (proto field names at the top level).

    Every unknown top-level name is reported at once, so an operator can fix a payload in one
    go; a wrong value type (or an unknown name inside ``Proxy``) is reported as protobuf's
    JSON parser words it. Raises InvalidModelOptions in all those cases.
    """
    if not isinstance(obj, dict):
        raise InvalidModelOptions(f"ModelOptions JSON must be an object, got {type(obj).__name__}")
    unknown = sorted(str(key) for key in obj if key not in _MODEL_OPTIONS_FIELDS)
    if unknown:
        raise InvalidModelOptions(
            "unknown ModelOptions field(s): "
            + ", ".join(unknown)
            + " (field names are case-sensitive, e.g. 'ContextSize', 'NGPULayers')"
        )
    message = backend_pb2.ModelOptions()
    try:
        json_format.ParseDict(obj, message)
    except (json_format.ParseError, TypeError, ValueError) as exc:
        raise InvalidModelOptions(f"invalid ModelOptions JSON: {exc}") from exc
    return message


def summarize_options(
    message_or_blob: backend_pb2.ModelOptions | bytes | bytearray | memoryview,
) -> dict[str, Any]:
    """The fields the control plane reads, each always present (defaults included).

    Raises InvalidModelOptions when given bytes that do not parse.
    """
    message = _as_message(message_or_blob)
    return {name: getattr(message, name) for name in SUMMARY_FIELDS}


def estimate_vram_bytes(
    options: backend_pb2.ModelOptions | bytes | bytearray | memoryview,
) -> int:
    """VRAM a replica of this model needs, in bytes, or 0 when unknown.

    Heuristic, deliberately simple: the control plane cannot see the model file, so
    ContextSize/NGPULayers alone cannot give an honest number. The only source used is an
    explicit hint in ``ModelOptions.Options``: an entry ``vram_bytes=<int>`` (preferred) or
    ``memory_bytes=<int>``; ``:`` is accepted as separator too, matching LocalAI's
    ``key:value`` option style. Malformed or negative values are ignored. 0 means "unknown";
    placement should then not reserve VRAM for the model rather than guess.
    """
    message = _as_message(options)
    found: dict[str, int] = {}
    for entry in message.Options:
        key, value = _split_option(entry)
        if key in _VRAM_OPTION_KEYS and key not in found:
            try:
                number = int(value)
            except ValueError:
                continue
            if number >= 0:
                found[key] = number
    for key in _VRAM_OPTION_KEYS:
        if key in found:
            return found[key]
    return 0


def _split_option(entry: str) -> tuple[str, str]:
    """Split "key=value" or "key:value" (whichever separator comes first)."""
    positions = [i for i in (entry.find("="), entry.find(":")) if i >= 0]
    if not positions:
        return entry.strip(), ""
    cut = min(positions)
    return entry[:cut].strip(), entry[cut + 1 :].strip()


def _as_message(
    message_or_blob: backend_pb2.ModelOptions | bytes | bytearray | memoryview,
) -> backend_pb2.ModelOptions:
    if isinstance(message_or_blob, backend_pb2.ModelOptions):
        return message_or_blob
    return options_from_blob(message_or_blob)
