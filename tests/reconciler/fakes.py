"""Fakes for the reconciler's two collaborators: the scheduler and the gRPC prober.

The prober fake never touches the database (it runs on the pass's probe threads); the
scheduler fake, called on the pass's own thread, writes replica rows through the registry verbs
like the real router would.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from proto import worker_pb2
from proto.client import GrpcCallError, Probe, ProbeResult
from registry.models import ModelRevision, Node, NodeModel


@dataclass
class Placed:
    """What the fake scheduler returns (the real router's answer has these attributes too)."""

    node_id: object
    replica_index: int


@dataclass
class FakeScheduler:
    """Records every ``schedule_and_load`` call. With ``place`` it writes a loaded row on the
    first candidate with a free slot (like the router); ``fail_after`` calls raise."""

    place: bool = True
    fail_after: int | None = None
    error: Exception = field(default_factory=lambda: RuntimeError("load failed: out of memory"))
    calls: list[tuple[str, list]] = field(default_factory=list)

    def schedule_and_load(self, model_name, candidate_node_ids):
        self.calls.append((model_name, list(candidate_node_ids)))
        if self.fail_after is not None and len(self.calls) > self.fail_after:
            raise self.error
        if not self.place:
            return None
        for node in Node.objects.filter(pk__in=candidate_node_ids).order_by("name"):
            index = NodeModel.objects.next_free_index(node, model_name)
            if index is not None:
                # Stamped with the model's current revision, as the real loaders do.
                revision = ModelRevision.objects.head_numbers([model_name]).get(model_name)
                NodeModel.objects.record_loaded(
                    node.pk, model_name, index, address=f"10.9.0.1:{7000 + index}", revision=revision
                )
                return Placed(node.pk, index)
        raise RuntimeError("no free slot")

    @property
    def models(self) -> list[str]:
        return [name for name, _ in self.calls]


@dataclass
class FakeProber:
    """Probe outcomes by address (default ALIVE), worker listings by address (default: the call
    fails, so the worker is not reconciled), and a record of every call."""

    outcomes: dict[str, Probe] = field(default_factory=dict)
    listings: dict[str, list] = field(default_factory=dict)
    listing_node_ids: dict[str, str] = field(default_factory=dict)
    probed: list[str] = field(default_factory=list)
    stopped: list[tuple[str, str, int, str | None]] = field(default_factory=list)
    unloaded: list[tuple[str, str]] = field(default_factory=list)
    stop_error: Exception | None = None
    gate: threading.Event | None = None  # probes block on it (concurrency tests)
    entered: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def probe(self, address, *, node_id=None, timeout=None):
        with self.lock:
            self.probed.append(address)
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=10)
        return ProbeResult(self.outcomes.get(address, Probe.ALIVE))

    def list_backends(self, address, *, node_id=None, timeout=None):
        if address not in self.listings:
            raise GrpcCallError("/controlplane.worker.v1.Worker/ListBackends", None, "not configured in the fake")
        backends = [
            worker_pb2.BackendProcess(model_name=model, replica_index=index, state=state, address=f"{address}-{index}")
            for model, index, state in self.listings[address]
        ]
        return worker_pb2.ListBackendsResponse(node_id=self.listing_node_ids.get(address, node_id or ""), backends=backends)

    def stop_backend(self, address, model_name, replica_index, *, node_id=None, timeout=None):
        self.stopped.append((address, model_name, replica_index, node_id))
        if self.stop_error is not None:
            raise self.stop_error
        return worker_pb2.StopBackendResponse(stopped=True)

    def unload_model(self, address, model_name, *, node_id=None, timeout=None):
        self.unloaded.append((address, model_name))
        return worker_pb2.UnloadModelResponse(stopped=1)
