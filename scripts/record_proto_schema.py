#!/usr/bin/env python
"""Record the wire-relevant schema of a .proto file as JSON (see proto/schema.py).

Usage (from anywhere; needs grpcio-tools from requirements-dev.txt):

    .venv/bin/python scripts/record_proto_schema.py PATH/TO/backend.proto \\
        --source-commit <LocalAI commit> --source-date <YYYY-MM-DD> \\
        -o tests/proto/backend_schema.json

The .proto is compiled with ``grpc_tools.protoc --descriptor_set_out`` in a temporary
directory (so a file from anywhere works, e.g. LocalAI's ``backend/backend.proto`` checked
out or copied to /tmp) and described by ``proto.schema.describe``. ``--source-*`` end up in a
``recorded_from`` entry, so the file says which upstream revision it pins. Without ``-o`` the
JSON goes to standard output.

To follow a newer LocalAI: record its ``backend/backend.proto`` over the committed JSON, copy
the .proto to ``proto/backend.proto`` (without comments), run ``scripts/gen_proto.py``, and
let ``tests/proto/test_proto_wire.py`` confirm the two agree.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from google.protobuf import descriptor_pb2  # noqa: E402

from proto.schema import describe  # noqa: E402


def compile_descriptor(proto_path: Path) -> descriptor_pb2.FileDescriptorProto:
    """protoc's FileDescriptorProto of ``proto_path`` (its imports resolved next to it)."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory(prefix="record_proto_schema_") as tmp:
        source = Path(tmp) / "src"
        source.mkdir()
        shutil.copy(proto_path, source / proto_path.name)
        descriptor_set = Path(tmp) / "descriptor.pb"
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{source}",
                f"-I{proto_path.resolve().parent}",
                f"-I{well_known}",
                f"--descriptor_set_out={descriptor_set}",
                str(source / proto_path.name),
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed on {proto_path} with exit code {code}")
        files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    for file_proto in files:
        if file_proto.name == proto_path.name:
            return file_proto
    raise SystemExit(f"protoc produced no descriptor for {proto_path.name}")


def record(proto_path: Path, *, repository: str, path: str, commit: str, date: str) -> dict:
    schema = describe(compile_descriptor(proto_path))
    recorded_from = {"repository": repository, "path": path, "commit": commit, "date": date}
    return {"recorded_from": recorded_from, **schema}


def to_json(value, indent: int = 0) -> str:
    """Indented JSON with every innermost object (a field, an RPC, an enum) on one line, so a
    schema change shows as a one-line diff."""
    if not isinstance(value, dict) or not value or all(not isinstance(v, (dict, list)) for v in value.values()):
        return json.dumps(value)
    pad = " " * (indent + 1)
    items = ",\n".join(f"{pad}{json.dumps(key)}: {to_json(item, indent + 1)}" for key, item in value.items())
    return "{\n" + items + "\n" + " " * indent + "}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("proto", type=Path, help="the .proto file to record")
    parser.add_argument("-o", "--output", type=Path, help="write the JSON here (default: standard output)")
    parser.add_argument("--source-repository", default="mudler/LocalAI")
    parser.add_argument("--source-path", default="backend/backend.proto")
    parser.add_argument("--source-commit", default="", help="the upstream commit the .proto was taken from")
    parser.add_argument("--source-date", default="", help="that commit's date (YYYY-MM-DD)")
    args = parser.parse_args(argv)
    recorded = record(
        args.proto,
        repository=args.source_repository,
        path=args.source_path,
        commit=args.source_commit,
        date=args.source_date,
    )
    text = to_json(recorded) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
