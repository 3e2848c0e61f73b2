"""Write grpc_predict_v2_pb2.py, .pyi and _pb2_grpc.py from grpc_predict_v2.proto (needs grpcio-tools, the
dev extra): `python -m app.grpc_generated.generate` from the repository root.

protoc's output, with one change: the messages are built in a descriptor pool of their own instead of
protobuf's default pool. Every client library of the protocol (tritonclient.grpc, kserve) registers the
same `inference.*` messages in the default pool, and a second registration of a name fails; with its
own pool the server's modules load beside any of them (a test process, an application embedding
dsphere).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROTO = "app/grpc_generated/grpc_predict_v2.proto"
DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
OWN_POOL = "_descriptor_pool.DescriptorPool().AddSerializedFile("


def generate(out: Path = ROOT) -> list[Path]:
    """Run protoc on PROTO, writing under `out` (app/grpc_generated/...); the files written."""
    from grpc_tools import protoc  # the dev extra: never imported by the service

    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", str(ROOT / PROTO)]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO}")
    target = out / "app" / "grpc_generated"
    pb2 = target / "grpc_predict_v2_pb2.py"
    text = pb2.read_text()
    if text.count(DEFAULT_POOL) != 1:
        raise SystemExit(f"{pb2}: protoc's output changed; expected one {DEFAULT_POOL!r}")
    pb2.write_text(text.replace(DEFAULT_POOL, OWN_POOL))
    return [pb2, target / "grpc_predict_v2_pb2.pyi", target / "grpc_predict_v2_pb2_grpc.py"]


if __name__ == "__main__":
    for p in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT):
        print(p)
