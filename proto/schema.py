"""The wire-relevant shape of a .proto file as plain data, and the differences between two.

``backend.proto`` must match LocalAI's ``backend/backend.proto`` field for field: frontends
talk to the replicas we hand out through our stubs, and the control plane stores
``ModelOptions`` blobs that LocalAI frontends produce. ``tests/proto/backend_schema.json`` is
LocalAI's schema recorded with :func:`describe` (by ``scripts/record_proto_schema.py``), and
a test compares it with ours through :func:`differences`.

The description keeps what decides the wire encoding and the gRPC method paths, and nothing
else (no comments, no file options such as ``go_package``):

* ``package`` and ``syntax``;
* every message, nested ones included, by full name: each field's ``number``, ``type``,
  ``label`` (``optional``/``repeated``; proto3 singular fields are ``optional``),
  ``type_name`` for message and enum fields, ``oneof`` for members of a real oneof,
  ``proto3_optional`` for ``optional`` scalars (explicit presence); a map field is a
  repeated field of a nested ``...Entry`` message marked ``map_entry``; ``reserved``
  numbers and names;
* every enum (nested too): value name -> number;
* every service: each RPC's input and output type and whether either side streams.

Plain protobuf descriptors only: no Django, no grpc.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor

__all__ = ["describe", "describe_file", "differences"]

_F = descriptor_pb2.FieldDescriptorProto
_TYPE_NAMES = {value: name.removeprefix("TYPE_").lower() for name, value in _F.Type.items()}  # TYPE_INT32 -> "int32"
_LABEL_NAMES = {value: name.removeprefix("LABEL_").lower() for name, value in _F.Label.items()}


def describe_file(file_descriptor: FileDescriptor) -> dict[str, Any]:
    """:func:`describe` of a compiled module's ``DESCRIPTOR`` (e.g. ``backend_pb2.DESCRIPTOR``)."""
    proto = descriptor_pb2.FileDescriptorProto()
    file_descriptor.CopyToProto(proto)
    return describe(proto)


def describe(file_proto: descriptor_pb2.FileDescriptorProto) -> dict[str, Any]:
    """The wire-relevant shape of one .proto file (see the module docstring), JSON-ready."""
    package = file_proto.package
    prefix = f"{package}." if package else ""
    messages: dict[str, Any] = {}
    enums: dict[str, Any] = {}
    for enum in file_proto.enum_type:
        enums[prefix + enum.name] = _enum(enum)
    for message in file_proto.message_type:
        _collect_message(message, prefix + message.name, messages, enums)
    services = {
        prefix + service.name: {
            method.name: {
                "input_type": method.input_type.lstrip("."),
                "output_type": method.output_type.lstrip("."),
                "client_streaming": method.client_streaming,
                "server_streaming": method.server_streaming,
            }
            for method in service.method
        }
        for service in file_proto.service
    }
    return {
        "package": package,
        "syntax": file_proto.syntax or "proto2",
        "messages": dict(sorted(messages.items())),
        "enums": dict(sorted(enums.items())),
        "services": services,
    }


def _collect_message(message, full_name: str, messages: dict, enums: dict) -> None:
    real_oneofs = _real_oneof_names(message)
    fields = {}
    for field in sorted(message.field, key=lambda f: f.number):
        entry: dict[str, Any] = {
            "number": field.number,
            "type": _TYPE_NAMES[field.type],
            "label": _LABEL_NAMES[field.label],
        }
        if field.type in (_F.TYPE_MESSAGE, _F.TYPE_ENUM, _F.TYPE_GROUP):
            entry["type_name"] = field.type_name.lstrip(".")
        if field.HasField("oneof_index") and field.oneof_index in real_oneofs:
            entry["oneof"] = real_oneofs[field.oneof_index]
        if field.proto3_optional:
            entry["proto3_optional"] = True
        fields[field.name] = entry
    described: dict[str, Any] = {"fields": fields}
    if message.options.map_entry:
        described["map_entry"] = True
    reserved = [number for r in message.reserved_range for number in range(r.start, r.end)]
    if reserved:
        described["reserved_numbers"] = reserved
    if message.reserved_name:
        described["reserved_names"] = sorted(message.reserved_name)
    messages[full_name] = described
    for enum in message.enum_type:
        enums[f"{full_name}.{enum.name}"] = _enum(enum)
    for nested in message.nested_type:
        _collect_message(nested, f"{full_name}.{nested.name}", messages, enums)


def _real_oneof_names(message) -> dict[int, str]:
    """Oneof index -> name, leaving out the synthetic oneofs protoc makes for proto3
    ``optional`` fields (those are reported as ``proto3_optional`` instead)."""
    synthetic = {f.oneof_index for f in message.field if f.proto3_optional and f.HasField("oneof_index")}
    return {index: oneof.name for index, oneof in enumerate(message.oneof_decl) if index not in synthetic}


def _enum(enum) -> dict[str, int]:
    return {value.name: value.number for value in enum.value}


def differences(recorded: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """Every way ``ours`` departs from ``recorded``, one readable line each (empty: parity).

    Both are :func:`describe` results. Lines name the message and field (or enum value, or
    RPC) and say what was recorded and what we have, e.g.
    ``backend.ModelOptions.EnableScore: number recorded 75, ours 76``. Something we declare
    that the recorded schema does not is a difference too: a number we invent may be taken by
    LocalAI tomorrow.
    """
    problems: list[str] = []
    for key in ("package", "syntax"):
        if recorded.get(key) != ours.get(key):
            problems.append(f"{key}: recorded {recorded.get(key)!r}, ours {ours.get(key)!r}")
    problems += _compare_named(
        "message",
        recorded.get("messages", {}),
        ours.get("messages", {}),
        _message_differences,
    )
    problems += _compare_named("enum", recorded.get("enums", {}), ours.get("enums", {}), _enum_differences)
    problems += _compare_named("service", recorded.get("services", {}), ours.get("services", {}), _service_differences)
    return problems


def _compare_named(kind: str, recorded: dict, ours: dict, compare) -> list[str]:
    problems = []
    for name in recorded:
        if name not in ours:
            problems.append(f"{kind} {name}: missing (recorded, not declared here)")
        else:
            problems += compare(name, recorded[name], ours[name])
    for name in ours:
        if name not in recorded:
            problems.append(f"{kind} {name}: declared here but not in the recorded schema")
    return problems


def _message_differences(name: str, recorded: dict, ours: dict) -> list[str]:
    problems = []
    for key in ("map_entry", "reserved_numbers", "reserved_names"):
        if recorded.get(key) != ours.get(key):
            problems.append(f"{name}: {key} recorded {recorded.get(key)!r}, ours {ours.get(key)!r}")
    recorded_fields, our_fields = recorded.get("fields", {}), ours.get("fields", {})
    for field_name, expected in recorded_fields.items():
        actual = our_fields.get(field_name)
        if actual is None:
            problems.append(f"{name}.{field_name} (number {expected.get('number')}): missing")
            continue
        for key in sorted(set(expected) | set(actual)):
            if expected.get(key) != actual.get(key):
                problems.append(f"{name}.{field_name}: {key} recorded {expected.get(key)!r}, ours {actual.get(key)!r}")
    for field_name, actual in our_fields.items():
        if field_name not in recorded_fields:
            problems.append(
                f"{name}.{field_name} (number {actual.get('number')}): declared here but not in the recorded schema"
            )
    return problems


def _enum_differences(name: str, recorded: dict, ours: dict) -> list[str]:
    problems = []
    for value_name in sorted(set(recorded) | set(ours)):
        if recorded.get(value_name) != ours.get(value_name):
            problems.append(
                f"{name}.{value_name}: recorded {recorded.get(value_name)!r}, ours {ours.get(value_name)!r}"
            )
    return problems


def _service_differences(name: str, recorded: dict, ours: dict) -> list[str]:
    problems = []
    for rpc in recorded:
        if rpc not in ours:
            problems.append(f"rpc {name}/{rpc}: missing")
            continue
        for key in sorted(set(recorded[rpc]) | set(ours[rpc])):
            if recorded[rpc].get(key) != ours[rpc].get(key):
                problems.append(
                    f"rpc {name}/{rpc}: {key} recorded {recorded[rpc].get(key)!r}, ours {ours[rpc].get(key)!r}"
                )
    for rpc in ours:
        if rpc not in recorded:
            problems.append(f"rpc {name}/{rpc}: declared here but not in the recorded schema")
    return problems
