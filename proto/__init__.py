"""Protobuf contracts of the control plane: LocalAI-compatible backend.proto, our worker.proto,
their generated code (regenerate with ``scripts/gen_proto.py``), the ModelOptions codec and the
gRPC client; and the kept HTTP connection the two clients of the control plane's REST API share
(``keepalive``, standard library only)."""
