#!/usr/bin/env python
"""Regenerate (or check) the committed protobuf/gRPC Python code under proto/.

Usage (from anywhere):

    .venv/bin/python scripts/gen_proto.py          # rewrite proto/*_pb2*.py(i)
    .venv/bin/python scripts/gen_proto.py --check  # exit 1 with a diff if they are stale

protoc runs from the repository root with ``-I .`` so that generated modules import each
other as ``from proto import backend_pb2`` and work as a package. The generated files are
committed (the runtime image has no protoc); ``--check`` lets CI catch a .proto edit that
was not followed by a regeneration. Output depends on the grpcio-tools version pinned in
requirements-dev.txt, so regenerate with that version.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = "proto"
PROTO_FILES = ("proto/backend.proto", "proto/worker.proto")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_names() -> list[str]:
    """File names (relative to proto/) that protoc produces for PROTO_FILES."""
    stems = [Path(p).stem for p in PROTO_FILES]
    return sorted(stem + suffix for stem in stems for suffix in GENERATED_SUFFIXES)


def run_protoc(out_dir: Path) -> None:
    """Generate into out_dir/proto/; raises SystemExit when protoc fails."""
    import grpc_tools
    from grpc_tools import protoc

    # Well-known types (google/protobuf/*.proto) ship inside grpc_tools.
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    (out_dir / PROTO_DIR).mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        "-I",
        ".",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTO_FILES,
    ]
    # protoc resolves -I . against the working directory; paths in the generated code
    # (descriptor file names, imports) come from it, so it must be the repo root.
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        code = protoc.main(args)
    finally:
        os.chdir(cwd)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


def check(committed_root: Path = REPO_ROOT) -> int:
    """Regenerate into a temp dir and diff against committed_root/proto/; 0 when identical."""
    with tempfile.TemporaryDirectory(prefix="gen_proto_") as tmp:
        run_protoc(Path(tmp))
        stale = False
        for name in generated_names():
            fresh_path = Path(tmp) / PROTO_DIR / name
            committed_path = committed_root / PROTO_DIR / name
            fresh = fresh_path.read_text().splitlines(keepends=True)
            committed = committed_path.read_text().splitlines(keepends=True) if committed_path.exists() else []
            if fresh != committed:
                stale = True
                sys.stdout.writelines(
                    difflib.unified_diff(
                        committed,
                        fresh,
                        fromfile=f"{PROTO_DIR}/{name} (committed)",
                        tofile=f"{PROTO_DIR}/{name} (regenerated)",
                    )
                )
    if stale:
        print(
            "\nGenerated protobuf code is out of date: run "
            "`.venv/bin/python scripts/gen_proto.py` and commit the result.",
            file=sys.stderr,
        )
        return 1
    print("Generated protobuf code is up to date.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temp dir and exit 1 with a diff if committed files differ",
    )
    args = parser.parse_args(argv)
    if args.check:
        return check()
    run_protoc(REPO_ROOT)
    for name in generated_names():
        print(f"wrote {PROTO_DIR}/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
