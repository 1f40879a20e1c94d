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
- ``echo.tokens_per_second=50``: the generation rate of Predict and PredictStream (env default
  ``ECHO_TOKENS_PER_SECOND``; 0 or unset: unthrottled). Each token takes ``1/rate`` s, the
  first one included: PredictStream sends token ``i`` (from 0) ``(i + 1) / rate`` s after the
  predict delay, and Predict answers after ``tokens / rate`` s. A negative rate fails the load.

What it answers (deterministic, so tests can assert content):

- The *input text* is ``PredictOptions.Prompt``; for a chat request sent LocalAI's way
  (``UseTokenizerTemplate`` set and ``Messages`` not empty) it is the ``content`` of the last
  message whose ``role`` is ``user`` (no user message: the last message). ``Messages`` without
  ``UseTokenizerTemplate`` are ignored, as LocalAI's llama.cpp backend ignores them.
- The answer echoes the input text, split into tokens by whitespace: a token is a word with the
  whitespace before it (the first also keeps any leading whitespace, the last any trailing
  whitespace), so the tokens joined are the input text exactly; a text without a word has no
  token. ``PredictOptions.Tokens`` > 0 (OpenAI's ``max_tokens``) keeps the first that many.
- Token counts, as LocalAI's llama.cpp backend reports them: ``prompt_tokens`` is the number of
  words of the prompt (a chat's: of every message's content); ``tokens`` is the number of answer
  tokens generated so far. ``Predict`` answers once with the whole answer; ``PredictStream``
  sends one ``Reply`` per token (``message`` = that token's UTF-8 bytes) with ``tokens`` counting
  up from 1 (the last reply carries the total, which is what LocalAI's frontend keeps) and
  ``prompt_tokens`` in every reply; an empty answer is one ``Reply`` with an empty message and
  ``tokens=0``. A cancelled stream stops at once (also in the middle of a throttled wait).
- ``Embedding``: a vector of 8 floats in [-1, 1] derived from sha256 of ``Embeddings`` (or of
  ``Prompt`` when empty); ``prompt_tokens`` counts its words. A token-list input
  (``EmbeddingTokens``, no text) is embedded as its ids joined by spaces and counts one token
  per id.

TLS: with ``BACKEND_TLS_CERT`` and ``BACKEND_TLS_KEY`` in the environment (PEM files; the
worker sets them for its TLS backends, docs/tls.md) it serves TLS, and with
``BACKEND_TLS_CLIENT_CA`` as well it requires a client certificate signed by that CA. LocalAI's
own backends have no such option: they serve plaintext only.

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

Like LocalAI's Python backends it serves with ONE gRPC thread by default: a ``Health`` probe
waits behind a running ``LoadModel`` or ``Predict``, and concurrent streams are served one after
the other. That is intended: it lets tests reproduce "busy, not dead" probes (DEADLINE_EXCEEDED)
against a real process. ``PYTHON_GRPC_MAX_WORKERS=N`` (environment only, LocalAI's variable for
its Python backends) serves N calls at once, e.g. for concurrent streams in a benchmark.

Auth: when ``LOCALAI_GRPC_AUTH_TOKEN`` is set, every call must carry ``authorization: Bearer
<token>`` metadata (UNAUTHENTICATED otherwise).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc

from proto import backend_pb2, backend_pb2_grpc, tls
from worker.grpc_auth import BearerTokenInterceptor

log = logging.getLogger("worker.backends.echo")

EMBEDDING_SIZE = 8


@dataclass(frozen=True)
class EchoSettings:
    load_delay_s: float = 0.0
    memory_bytes: int = 0
    predict_delay_s: float = 0.0
    fail_load: str | None = None
    tokens_per_second: float = 0.0  # 0: unthrottled

    @classmethod
    def from_env(cls, env=None) -> EchoSettings:
        env = os.environ if env is None else env
        return cls(
            load_delay_s=float(env.get("ECHO_LOAD_DELAY_S") or 0),
            memory_bytes=int(env.get("ECHO_MEMORY_BYTES") or 0),
            predict_delay_s=float(env.get("ECHO_PREDICT_DELAY_S") or 0),
            tokens_per_second=_rate(env.get("ECHO_TOKENS_PER_SECOND") or 0),
        )

    def with_options(self, options) -> EchoSettings:
        """Apply ``echo.*`` entries of ``ModelOptions.Options``; other entries are ignored.

        Raises ValueError for a malformed number (or a negative rate), which LoadModel reports
        as a failed load.
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
            tokens_per_second=_rate(values.get("tokens_per_second", self.tokens_per_second)),
        )


def _rate(value) -> float:
    rate = float(value)
    if not rate >= 0:  # also refuses NaN
        raise ValueError(f"tokens_per_second must be >= 0, got {value!r}")
    return rate


def embed(text: str) -> list[float]:
    """A deterministic vector in [-1, 1] derived from sha256(text)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return [digest[i] / 127.5 - 1.0 for i in range(EMBEDDING_SIZE)]


_TOKEN = re.compile(r"\s*\S+")


def tokenize(text: str) -> list[str]:
    """Split ``text`` into tokens: each word with the whitespace before it; the last token keeps
    any trailing whitespace, so ``"".join(tokenize(text)) == text`` whenever ``text`` has a word."""
    tokens = _TOKEN.findall(text)
    if tokens:
        tokens[-1] += text[sum(map(len, tokens)) :]
    return tokens


def count_words(text: str) -> int:
    return len(text.split())


def chat_input(request) -> tuple[str, int]:
    """The text to echo and the prompt's word count, for a Predict/PredictStream request."""
    if request.UseTokenizerTemplate and request.Messages:
        messages = list(request.Messages)
        users = [m for m in messages if m.role == "user"]
        text = (users or messages)[-1].content
        return text, sum(count_words(m.content) for m in messages)
    return request.Prompt, count_words(request.Prompt)


def answer_tokens(request) -> tuple[list[str], int]:
    """The answer's tokens (capped at ``Tokens`` when > 0) and the prompt's token count."""
    text, prompt_tokens = chat_input(request)
    tokens = tokenize(text)
    if request.Tokens > 0:
        tokens = tokens[: request.Tokens]
    return tokens, prompt_tokens


MODEL_MISMATCH_SENTINEL = "model identity mismatch"  # the substring LocalAI's router looks for


class _Cancelled(Exception):
    pass


class _Waiter:
    """Sleeps that end early when the call is cancelled (the client went away)."""

    def __init__(self, context):
        self._done = threading.Event()
        self._context = context
        if context is not None:
            context.add_callback(self._done.set)

    def sleep(self, seconds: float) -> None:
        if seconds > 0 and self._done.wait(seconds):
            raise _Cancelled
        if self._context is not None and not self._context.is_active():
            raise _Cancelled


class EchoBackend(backend_pb2_grpc.BackendServicer):
    def __init__(self, defaults: EchoSettings | None = None):
        self._defaults = defaults or EchoSettings.from_env()
        self._settings = self._defaults
        self._model: str | None = None  # the loaded model, None before a load and after Free
        self._identity = ""  # ModelOptions.Model of the last successful load (kept after Free)
        self._memory_bytes = 0
        self._loads = 0  # successful LoadModel calls served (Status: breakdown["echo.loads"])
        self._lock = threading.Lock()  # with PYTHON_GRPC_MAX_WORKERS > 1, loads may overlap

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
        with self._lock:
            self._settings = settings
            self._model = request.Model or "echo"
            self._identity = request.Model
            self._memory_bytes = settings.memory_bytes
            self._loads += 1
        log.info(
            "model=%s loaded memory_bytes=%d tokens_per_second=%g",
            self._model,
            self._memory_bytes,
            settings.tokens_per_second,
        )
        return backend_pb2.Result(success=True, message=f"loaded {self._model}")

    def Free(self, request, context):
        log.info("model=%s freed", self._model)
        with self._lock:
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

    def _require_model(self, request, context) -> EchoSettings:
        """Guard the call, wait the predict delay; the settings of the load to predict with."""
        self._guard(request, context)
        settings = self._settings
        if settings.predict_delay_s > 0:
            time.sleep(settings.predict_delay_s)
        return settings

    def Predict(self, request, context):
        settings = self._require_model(request, context)
        tokens, prompt_tokens = answer_tokens(request)
        if settings.tokens_per_second > 0:
            try:
                _Waiter(context).sleep(len(tokens) / settings.tokens_per_second)
            except _Cancelled:
                return backend_pb2.Reply()  # nobody reads it
        return backend_pb2.Reply(
            message="".join(tokens).encode("utf-8"), tokens=len(tokens), prompt_tokens=prompt_tokens
        )

    def PredictStream(self, request, context):
        settings = self._require_model(request, context)
        tokens, prompt_tokens = answer_tokens(request)
        if not tokens:
            yield backend_pb2.Reply(message=b"", tokens=0, prompt_tokens=prompt_tokens)
            return
        rate = settings.tokens_per_second
        waiter = _Waiter(context) if rate > 0 else None
        started = time.monotonic()
        for index, token in enumerate(tokens, start=1):
            if waiter is not None:
                # Token i is due i/rate s after the start: no drift however long a send took.
                try:
                    waiter.sleep(started + index / rate - time.monotonic())
                except _Cancelled:
                    return
            yield backend_pb2.Reply(message=token.encode("utf-8"), tokens=index, prompt_tokens=prompt_tokens)

    def Embedding(self, request, context):
        self._require_model(request, context)
        text = request.Embeddings or request.Prompt
        if not text and request.EmbeddingTokens:  # a token-list input: one token per id
            ids = list(request.EmbeddingTokens)
            return backend_pb2.EmbeddingResult(
                embeddings=embed(" ".join(map(str, ids))), dim=EMBEDDING_SIZE, prompt_tokens=len(ids)
            )
        return backend_pb2.EmbeddingResult(embeddings=embed(text), dim=EMBEDDING_SIZE, prompt_tokens=count_words(text))

    def TokenizeString(self, request, context):
        """One token per whitespace-separated word (its index in the prompt); no predict delay."""
        self._guard(request, context)
        tokens = list(range(count_words(request.Prompt)))
        return backend_pb2.TokenizationResponse(length=len(tokens), tokens=tokens)


def serve(
    addr: str,
    token: str | None = None,
    backend: EchoBackend | None = None,
    threads: int = 1,
    credentials: grpc.ServerCredentials | None = None,
) -> grpc.Server:
    """Start the echo backend on ``addr`` with ``threads`` gRPC threads (1, like LocalAI's Python
    backends by default), serving TLS with ``credentials``, plaintext without."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads),
        interceptors=[BearerTokenInterceptor(token)],
        # Fail on a taken port instead of sharing it with another process (SO_REUSEPORT).
        options=[("grpc.so_reuseport", 0)],
    )
    backend_pb2_grpc.add_BackendServicer_to_server(backend or EchoBackend(), server)
    try:
        port = server.add_secure_port(addr, credentials) if credentials else server.add_insecure_port(addr)
    except RuntimeError:
        port = 0
    if port == 0:
        raise RuntimeError(f"cannot bind {addr}")
    server.start()
    return server


def _tls_from_env() -> grpc.ServerCredentials | None:
    """The BACKEND_TLS_* environment as server credentials, None when unset (plaintext)."""
    cert, key = os.environ.get("BACKEND_TLS_CERT"), os.environ.get("BACKEND_TLS_KEY")
    if not cert and not key:
        return None
    if not cert or not key:
        raise ValueError("BACKEND_TLS_CERT and BACKEND_TLS_KEY go together")
    names = ("BACKEND_TLS_CERT", "BACKEND_TLS_KEY", "BACKEND_TLS_CLIENT_CA")
    return tls.server_credentials(cert, key, os.environ.get("BACKEND_TLS_CLIENT_CA") or None, names=names)


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
        threads = int(os.environ.get("PYTHON_GRPC_MAX_WORKERS") or 1)
        if threads < 1:
            raise ValueError(f"PYTHON_GRPC_MAX_WORKERS must be >= 1, got {threads}")
        backend = EchoBackend(EchoSettings.from_env())
        credentials = _tls_from_env()
        server = serve(args.addr, os.environ.get("LOCALAI_GRPC_AUTH_TOKEN") or None, backend, threads, credentials)
    except (RuntimeError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    log.info("serving on %s%s", args.addr, " (TLS)" if credentials else "")
    while not stop.wait(0.5):
        pass
    log.info("stopping")
    server.stop(grace=1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
