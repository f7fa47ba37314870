"""The committed gRPC/protobuf code in jaxpd/v1 is what protos/ generates (`make protos`)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GENERATED = sorted((REPO / "jaxpd" / "v1").glob("*_pb2*.py*"))


def test_generated_code_is_up_to_date(tmp_path):
    protos = sorted(str(p.relative_to(REPO)) for p in (REPO / "protos").rglob("*.proto"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iprotos", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", *protos],
                   cwd=REPO, check=True)
    fresh = sorted((tmp_path / "jaxpd" / "v1").glob("*_pb2*.py*"))
    assert [p.name for p in fresh] == [p.name for p in GENERATED]
    stale = [p.name for p, q in zip(GENERATED, fresh) if p.read_bytes() != q.read_bytes()]
    assert not stale, f"{stale} differ from protos/: run `make protos` and commit the result"


def test_services_are_importable_and_complete():
    from jaxpd.v1 import generation_pb2, worker_pb2

    generation = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert {m.name for m in generation.methods} == {
        "Generate", "Abort", "Tokenize", "GetModelInfo", "GetServerInfo", "GetLoads"}
    assert generation.methods_by_name["Generate"].server_streaming
    assert set(worker_pb2.DESCRIPTOR.services_by_name) == {"PrefillWorker", "DecodeWorker", "KVTransfer"}
    assert worker_pb2.DESCRIPTOR.services_by_name["KVTransfer"].methods_by_name["PushKV"].client_streaming
