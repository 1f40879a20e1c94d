"""Built-in echo backend: a LocalAI-compatible ``backend.Backend`` without a real model.

Run as ``python -m worker.backends.echo --addr HOST:PORT``, the way LocalAI starts backend
executables. It exists for tests and demos: it behaves like a model server (slow loads, a memory
footprint reported through ``Status``, failed loads, slow predictions) without allocating
anything.

Configuration, per load, through ``ModelOptions.Options`` entries (``key=value``; LocalAI's
``key:value`` is accepted too):

- ``echo.load_delay_s=1.5``: LoadModel sleeps this long (env default ``ECHO_LOAD_DELAY_S``).
- ``echo.memory_bytes=1000000``: the footprint reported by Status after a load (a number only;
  env default ``ECHO_MEMORY_BYTES``).
- ``echo.fail_load=reason``: LoadModel answers ``success=false`` with that message.
- ``echo.predict_delay_s=0.5``: Predict/PredictStream/Embedding sleep this long first (env
  default ``ECHO_PREDICT_DELAY_S``).

Start-up: ``ECHO_START_DELAY_S=3`` (environment only) waits that long before listening, like a
real backend importing its libraries; the worker's ``StartBackend`` waits for it.

Load counter: ``Status`` reports how many successful ``LoadModel`` calls this process has
served in ``StatusResponse.memory.breakdown["echo.loads"]`` (``MemoryUsageData.breakdown`` is a
``map<string, uint64>``), in every state, also after ``Free``. Failed loads are not counted. The
fault suite uses it for the invariant "one successful LoadModel per replica": the control plane
starts one backend process per replica, so a loaded replica's backend must report 1.

It behaves like a real LocalAI backend where the control plane could be fooled (there is no
lenient mode):

- ``Status`` answers READY whenever it is idle, before any ``LoadModel`` too (LocalAI's tinygrad
  backend and the Go ``SingleThread.Status`` do the same), so READY never proves a model is loaded.
- ``Predict``, ``PredictStream``, ``Embedding`` and ``TokenizeString`` answer FAILED_PRECONDITION
  ("model not loaded") until a ``LoadModel`` has succeeded (and again after ``Free``).
- ``ModelIdentity`` is enforced on those calls as LocalAI's Python backends enforce it
  (``backend/python/common/model_identity.py``): a successful ``LoadModel`` records its
  ``ModelOptions.Model``; a request whose ``ModelIdentity`` names another model is refused with
  NOT_FOUND and "model identity mismatch: loaded 'X', requested 'Y'". An empty identity on
  either side (the request carries none, or nothing was loaded yet) skips the check. The
  recorded identity survives ``Free``, as LocalAI's interceptor keeps it.
- ``TokenizeString`` is cheap: one token per whitespace-separated word (the control plane uses it
  with ``ModelIdentity`` to prove which model a reused process holds).

Like LocalAI's Python backends it serves with ONE gRPC thread: a ``Health`` probe waits behind a
running ``LoadModel`` or ``Predict``. That is intended: it lets tests reproduce "busy, not dead"
probes (DEADLINE_EXCEEDED) against a real process.

Auth: when ``LOCALAI_GRPC_AUTH_TOKEN`` is set, every call must carry ``authorization: Bearer
<token>`` metadata (UNAUTHENTICATED otherwise).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc

from proto import backend_pb2, backend_pb2_grpc
from worker.grpc_auth import BearerTokenInterceptor

log = logging.getLogger("worker.backends.echo")

EMBEDDING_SIZE = 8


@dataclass(frozen=True)
class EchoSettings:
    load_delay_s: float = 0.0
    memory_bytes: int = 0
    predict_delay_s: float = 0.0
    fail_load: str | None = None

    @classmethod
    def from_env(cls, env=None) -> EchoSettings:
        env = os.environ if env is None else env
        return cls(
            load_delay_s=float(env.get("ECHO_LOAD_DELAY_S") or 0),
            memory_bytes=int(env.get("ECHO_MEMORY_BYTES") or 0),
            predict_delay_s=float(env.get("ECHO_PREDICT_DELAY_S") or 0),
        )

    def with_options(self, options) -> EchoSettings:
        """Apply ``echo.*`` entries of ``ModelOptions.Options``; other entries are ignored.

        Raises ValueError for a malformed number, which LoadModel reports as a failed load.
        """
        values = {}
        for entry in options:
            sep = "=" if "=" in entry else ":"
            key, found, value = entry.partition(sep)
            if found and key.strip().startswith("echo."):
                values[key.strip()[len("echo.") :]] = value.strip()
        return EchoSettings(
            load_delay_s=float(values.get("load_delay_s", self.load_delay_s)),
            memory_bytes=int(values.get("memory_bytes", self.memory_bytes)),
            predict_delay_s=float(values.get("predict_delay_s", self.predict_delay_s)),
            fail_load=values.get("fail_load") or None,
        )


def embed(text: str) -> list[float]:
    """A deterministic vector in [-1, 1] derived from sha256(text)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return [digest[i] / 127.5 - 1.0 for i in range(EMBEDDING_SIZE)]


MODEL_MISMATCH_SENTINEL = "model identity mismatch"  # the substring LocalAI's router looks for


class EchoBackend(backend_pb2_grpc.BackendServicer):
    def __init__(self, defaults: EchoSettings | None = None):
        self._defaults = defaults or EchoSettings.from_env()
        self._settings = self._defaults
        self._model: str | None = None  # the loaded model, None before a load and after Free
        self._identity = ""  # ModelOptions.Model of the last successful load (kept after Free)
        self._memory_bytes = 0
        self._loads = 0  # successful LoadModel calls served (Status: breakdown["echo.loads"])

    @property
    def loads(self) -> int:
        return self._loads

    def Health(self, request, context):
        return backend_pb2.Reply(message=b"OK")

    def LoadModel(self, request, context):
        try:
            settings = self._defaults.with_options(request.Options)
        except ValueError as exc:
            return backend_pb2.Result(success=False, message=f"bad echo option: {exc}")
        if settings.load_delay_s > 0:
            time.sleep(settings.load_delay_s)
        if settings.fail_load:
            log.info("model=%s load failed on request: %s", request.Model, settings.fail_load)
            return backend_pb2.Result(success=False, message=settings.fail_load)
        self._settings = settings
        self._model = request.Model or "echo"
        self._identity = request.Model
        self._memory_bytes = settings.memory_bytes
        self._loads += 1
        log.info("model=%s loaded memory_bytes=%d", self._model, self._memory_bytes)
        return backend_pb2.Result(success=True, message=f"loaded {self._model}")

    def Free(self, request, context):
        log.info("model=%s freed", self._model)
        self._model = None
        self._memory_bytes = 0
        return backend_pb2.Result(success=True, message="freed")

    def Status(self, request, context):
        # READY whether or not a model is loaded, as LocalAI's backends answer when idle: Status
        # says "not busy", never "holds a model".
        breakdown = {"echo.loads": self._loads}
        if self._model is not None:
            breakdown["model"] = self._memory_bytes
        return backend_pb2.StatusResponse(
            state=backend_pb2.StatusResponse.READY,
            memory=backend_pb2.MemoryUsageData(total=self._memory_bytes, breakdown=breakdown),
        )

    def _guard(self, request, context) -> None:
        """What a guarded call checks before any work, in LocalAI's order: the identity (its
        interceptor runs first), then "is a model loaded" (the servicer)."""
        requested = request.ModelIdentity
        if requested and self._identity and requested != self._identity:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"{MODEL_MISMATCH_SENTINEL}: loaded {self._identity!r}, requested {requested!r}",
            )
        if self._model is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "model not loaded")

    def _require_model(self, request, context) -> None:
        self._guard(request, context)
        if self._settings.predict_delay_s > 0:
            time.sleep(self._settings.predict_delay_s)

    def Predict(self, request, context):
        self._require_model(request, context)
        words = len(request.Prompt.split())
        return backend_pb2.Reply(message=request.Prompt.encode("utf-8"), tokens=words, prompt_tokens=words)

    def PredictStream(self, request, context):
        self._require_model(request, context)
        words = request.Prompt.split()
        for i, word in enumerate(words):
            text = word if i == 0 else " " + word
            yield backend_pb2.Reply(message=text.encode("utf-8"), tokens=1)

    def Embedding(self, request, context):
        self._require_model(request, context)
        return backend_pb2.EmbeddingResult(embeddings=embed(request.Embeddings or request.Prompt))

    def TokenizeString(self, request, context):
        """One token per whitespace-separated word (its index in the prompt); no predict delay."""
        self._guard(request, context)
        tokens = list(range(len(request.Prompt.split())))
        return backend_pb2.TokenizationResponse(length=len(tokens), tokens=tokens)


def serve(addr: str, token: str | None = None, backend: EchoBackend | None = None) -> grpc.Server:
    """Start the echo backend on ``addr`` (one worker thread, like LocalAI's Python backends)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=1),
        interceptors=[BearerTokenInterceptor(token)],
        # Fail on a taken port instead of sharing it with another process (SO_REUSEPORT).
        options=[("grpc.so_reuseport", 0)],
    )
    backend_pb2_grpc.add_BackendServicer_to_server(backend or EchoBackend(), server)
    try:
        port = server.add_insecure_port(addr)
    except RuntimeError:
        port = 0
    if port == 0:
        raise RuntimeError(f"cannot bind {addr}")
    server.start()
    return server


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.backends.echo", description="Built-in echo backend.")
    parser.add_argument("--addr", required=True, help="host:port to serve backend.Backend on")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("ECHO_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s echo[%(process)d]: %(message)s",
        stream=sys.stderr,
    )
    start_delay = float(os.environ.get("ECHO_START_DELAY_S") or 0)
    if start_delay > 0:
        time.sleep(start_delay)
    try:
        server = serve(args.addr, os.environ.get("LOCALAI_GRPC_AUTH_TOKEN") or None)
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    log.info("serving on %s", args.addr)
    while not stop.wait(0.5):
        pass
    log.info("stopping")
    server.stop(grace=1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
