"""A message with every declared field at a non-default value, built from the descriptor (so a
field added to backend.proto is covered without editing a test)."""

from __future__ import annotations

import json
from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor as F
from google.protobuf.message import Message

from proto import backend_pb2

# Values survive a JSON round trip exactly (floats are binary fractions, integers small).
_SCALARS = {
    F.TYPE_STRING: lambda field, i: f"{field.name}-{i}",
    F.TYPE_BYTES: lambda field, i: f"{field.name}-{i}".encode(),
    F.TYPE_BOOL: lambda field, i: True,
    F.TYPE_FLOAT: lambda field, i: 0.5 + i,
    F.TYPE_DOUBLE: lambda field, i: 0.25 + i,
}


def _scalar(field, i: int):
    if field.type in _SCALARS:
        return _SCALARS[field.type](field, i)
    if field.type == F.TYPE_ENUM:
        non_zero = [v.number for v in field.enum_type.values if v.number != 0]
        return non_zero[i % len(non_zero)]
    return field.number + i + 1  # every integer type; distinct from the field's neighbours


def fill(message: Message, depth: int = 0) -> Message:
    """Set every field of ``message`` (in place) to a non-default value; returns it. Repeated
    fields get two elements, maps one entry, nested messages are filled (two levels deep);
    of a oneof only the first member is set."""
    seen_oneofs = set()
    for field in message.DESCRIPTOR.fields:
        oneof = field.containing_oneof
        if oneof is not None and not _is_synthetic(oneof):
            if oneof.name in seen_oneofs:
                continue
            seen_oneofs.add(oneof.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            target = getattr(message, field.name)
            key = _scalar(key_field, 0)
            if value_field.message_type is not None:
                fill(target[key], depth + 1)
            else:
                target[key] = _scalar(value_field, 0)
        elif field.is_repeated:
            target = getattr(message, field.name)
            for i in range(2):
                if field.message_type is not None:
                    fill(target.add(), depth + 1)
                else:
                    target.append(_scalar(field, i))
        elif field.message_type is not None:
            if depth < 2:
                fill(getattr(message, field.name), depth + 1)
            else:
                getattr(message, field.name).SetInParent()
        else:
            setattr(message, field.name, _scalar(field, 0))
    return message


def _is_synthetic(oneof) -> bool:
    """protoc's one-member oneof for a proto3 ``optional`` field (named ``_<field>``)."""
    return len(oneof.fields) == 1 and oneof.name == "_" + oneof.fields[0].name


def model_options_with_every_field() -> backend_pb2.ModelOptions:
    return fill(backend_pb2.ModelOptions())


def recorded_model_options_fields() -> dict[str, dict]:
    """ModelOptions' fields in LocalAI's recorded schema (tests/proto/backend_schema.json)."""
    recorded = json.loads(Path(__file__).with_name("backend_schema.json").read_text())
    return recorded["messages"]["backend.ModelOptions"]["fields"]
