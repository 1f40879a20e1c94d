"""Tests of the proto package: wire compatibility, codec, gRPC client, code generation."""
