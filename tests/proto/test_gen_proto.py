"""scripts/gen_proto.py --check: the committed generated code matches the .proto files."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "gen_proto.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gen_proto_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_generated_code_is_up_to_date():
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr


def test_check_fails_with_a_diff_when_generated_code_is_stale(tmp_path, capsys):
    gen_proto = load_script()
    (tmp_path / "proto").mkdir()
    for name in gen_proto.generated_names():
        shutil.copy(REPO_ROOT / "proto" / name, tmp_path / "proto" / name)
    stale = tmp_path / "proto" / "worker_pb2.py"
    stale.write_text(stale.read_text() + "# hand edit\n")

    assert gen_proto.check(committed_root=tmp_path) == 1
    assert "-# hand edit" in capsys.readouterr().out


def test_generated_modules_import_as_a_package():
    from proto import backend_pb2_grpc, worker_pb2_grpc

    assert backend_pb2_grpc.BackendStub
    assert worker_pb2_grpc.WorkerStub
