"""Reference worker agent.

A worker registers with the control plane, heartbeats its free memory, and starts one backend
process per (model, replica index) when the control plane asks over gRPC
(``proto/worker.proto``). Layout:

- ``cli``: ``python -m worker run ...`` (argparse), turns flags into a :class:`WorkerConfig`.
- ``config``: :class:`WorkerConfig` and the small parsers for its flags.
- ``control_plane``: REST client for the node API (register, heartbeat, drain, models,
  deregister) and registration with backoff.
- ``agent``: :class:`WorkerAgent`, the lifecycle: serve, register, heartbeat, graceful shutdown.
- ``processes``: :class:`BackendSupervisor`, the table of backend processes (ports, per-key
  locks, health wait, exit detection, stderr ring buffers).
- ``service``: the gRPC ``controlplane.worker.v1.Worker`` servicer and server factory.
- ``grpc_auth``: bearer-token server interceptor shared by the worker and the echo backend.
- ``backends.echo``: a built-in LocalAI-compatible backend for tests and demos.
"""
