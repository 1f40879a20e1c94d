"""Streaming through the OpenAI-compatible gateway against calling the same echo backend's
``PredictStream`` directly over gRPC, in one run.

    BENCH_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/bench_gateway.py [--quick]

Real processes on loopback, started with ``tests/e2e/harness.py``'s machinery and the settings
``make run`` ships (no overrides; ``PROMETHEUS_MULTIPROC_DIR`` set as ``scripts/run`` sets it):
gunicorn (``controlplane/gunicorn.conf.py``, 2 workers), ``manage.py qcluster``, ``manage.py
gateway`` (on ``CONTROLPLANE_GATEWAY_BIND``) and one reference worker (1 replica slot) whose echo
backend serves ``bench-echo`` unthrottled (no token rate) with ``PYTHON_GRPC_MAX_WORKERS=32``, so
that 32 streams run side by side instead of one after the other (LocalAI's Python backends
serve one call at a time by default). A fresh PostgreSQL database per run, dropped afterwards.

Both halves ask for the same thing: a chat whose last user message has ``--tokens`` words, which
the echo backend streams back one token (``Reply``) per word.

* direct: ``PredictStream`` with ``Messages``, ``UseTokenizerTemplate`` and ``ModelIdentity``,
  the backend token and the address of a lease the API granted once (released at once), over
  one ``grpc.aio`` channel (HTTP/2, streams multiplexed), with grpcio's default configuration
  (a client as its users write it), or with ``--tuned-direct`` the gateway process's
  (``gateway/grpc_environment.py``: gRPC's EventEngine client off), the stricter comparison;
* gateway: ``POST /v1/chat/completions`` with ``"stream": true`` and a ``frontend`` API key, one
  HTTP/1.1 keep-alive connection per concurrent stream, server-sent events read by a small
  asyncio client (each event's JSON parsed; the official ``openai`` client costs the client
  more CPU than the gateway would on this shared machine). Each answer is checked: its text must
  be the message, its ``usage.completion_tokens`` the word count.

For 1 and 32 concurrent streams, each stream starting as soon as the previous one of its slot
ended, for ``--seconds`` s per phase and ``--rounds`` rounds (direct and gateway alternate which
goes first): tokens/s (tokens received / wall time of the phase, median over rounds) and the
time to first token (request sent -> first token's text received; p50/p99 over every stream of
every round). Prints ``RATIO gateway: <direct/gateway>x (goal <= 1.25x)`` for the worse of the two
concurrencies: the goal is a gateway that keeps >= 0.8x of direct throughput. Then checks that
the model's in-flight count is back to 0 (every lease released).

Also, so that a shared, loaded machine still gives comparable figures: the CPU time each process
spent per token (this client with all its threads, the echo backend, the gateway; from
``/proc``), and the gateway's own time to first token (its
``controlplane_gateway_time_to_first_token_seconds`` histogram: request arrived -> first text
sent), next to what this client saw.

``--quick`` (< 60 s with start-up): one round of 3 s phases. ``--direct-only`` measures the direct
half alone (no gateway process). ``--tuned-direct``: see "direct" above.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# gRPC reads GRPC_EXPERIMENTS once, on import: --tuned-direct gives this process's direct client
# the gateway process's gRPC configuration (gateway/grpc_environment.py); the environment is
# then put back as it was, so the fleet's processes start with the caller's either way (the
# gateway sets its own).
_INHERITED_GRPC_EXPERIMENTS = os.environ.get("GRPC_EXPERIMENTS")
if "--tuned-direct" in sys.argv[1:]:
    from gateway import grpc_environment  # noqa: E402

    os.environ["GRPC_EXPERIMENTS"] = grpc_environment.GATEWAY_GRPC_EXPERIMENTS

import grpc  # noqa: E402

if _INHERITED_GRPC_EXPERIMENTS is None:
    os.environ.pop("GRPC_EXPERIMENTS", None)
else:
    os.environ["GRPC_EXPERIMENTS"] = _INHERITED_GRPC_EXPERIMENTS

from proto import backend_pb2, backend_pb2_grpc  # noqa: E402
from tests.e2e.harness import Fleet, wait_for  # noqa: E402
from tests.processes import free_port  # noqa: E402

MODEL = "bench-echo"
LOAD_INFO = {"backend_type": "echo", "model_options": {"Model": MODEL}}
CONCURRENCY = (1, 32)
GOAL_RATIO = 1.25  # direct / gateway: the gateway keeps >= 0.8x of direct throughput


@dataclass
class Sample:
    ttft: float  # s from the request to the first token's text
    tokens: int
    error: str = ""


@dataclass
class Phase:
    kind: str
    streams: int
    tokens_per_s: float
    samples: list[Sample] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds spent by each process
    server_ttft: tuple[float, int] = (0.0, 0)  # the gateway's own first-token histogram: sum s, count

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples if not s.error)

    @property
    def errors(self) -> list[str]:
        return [s.error for s in self.samples if s.error]


# ----- the two clients ----------------------------------------------------------------------------


class DirectClient:
    """``PredictStream`` on the replica, as the gateway would send it."""

    def __init__(self, address: str, backend_token: str):
        self.address, self.metadata = address, (("authorization", f"Bearer {backend_token}"),)
        self.channel = self.stub = None

    async def open(self):
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = backend_pb2_grpc.BackendStub(self.channel)
        return self

    async def connection(self):
        return None  # every stream shares the channel

    async def stream(self, _connection, text: str, words: int) -> Sample:
        request = backend_pb2.PredictOptions(
            Messages=[backend_pb2.Message(role="user", content=text)], UseTokenizerTemplate=True, ModelIdentity=MODEL
        )
        started, first, parts, last = time.perf_counter(), None, [], None
        try:
            async for reply in self.stub.PredictStream(request, metadata=self.metadata, timeout=120):
                if reply.message:
                    if first is None:
                        first = time.perf_counter()
                    parts.append(reply.message)
                last = reply
        except grpc.RpcError as exc:
            return Sample(0.0, len(parts), f"grpc {exc.code().name}: {exc.details()}")
        return check(started, first, b"".join(parts).decode(), len(parts), last and last.tokens, text, words)

    async def close(self):
        await self.channel.close()


class GatewayClient:
    """``POST /v1/chat/completions`` with ``"stream": true`` over raw HTTP/1.1 keep-alive."""

    def __init__(self, host: str, port: int, api_key: str):
        self.host, self.port, self.api_key = host, port, api_key

    async def open(self):
        return self

    async def connection(self):
        return HttpConnection(self.host, self.port)

    async def stream(self, connection: HttpConnection, text: str, words: int) -> Sample:
        body = json.dumps(
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": text}],
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode()
        started, first, parts, usage = time.perf_counter(), None, [], None
        try:
            async for event in connection.post_sse("/v1/chat/completions", body, self.api_key):
                if event.get("usage"):
                    usage = event["usage"]["completion_tokens"]
                for choice in event.get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if first is None:
                            first = time.perf_counter()
                        parts.append(content)
        except (OSError, HttpError, asyncio.IncompleteReadError, ValueError) as exc:
            connection.close()
            return Sample(0.0, len(parts), f"http: {exc}")
        return check(started, first, "".join(parts), len(parts), usage, text, words)

    async def close(self):
        pass

    def server_ttft(self) -> tuple[float, int]:
        """Sum and count of the gateway's ``controlplane_gateway_time_to_first_token_seconds``
        for the model (arrival of the request -> first text sent), from its ``/metrics``."""
        import urllib.request

        with urllib.request.urlopen(f"http://{self.host}:{self.port}/metrics", timeout=10) as response:
            text = response.read().decode()
        totals = {"sum": 0.0, "count": 0.0}
        for line in text.splitlines():
            name, _, rest = line.partition("{")
            for kind in totals:
                if name == f"controlplane_gateway_time_to_first_token_seconds_{kind}" and f'model="{MODEL}"' in rest:
                    totals[kind] += float(line.rsplit(" ", 1)[1])
        return totals["sum"], int(totals["count"])


def check(started, first, answer: str, tokens: int, counted, text: str, words: int) -> Sample:
    if answer != text or tokens != words:
        return Sample(0.0, tokens, f"answer of {tokens} tokens differs from the message ({words} words)")
    if counted != words:
        return Sample(0.0, tokens, f"the answer counts {counted} tokens, not {words}")
    return Sample(first - started, tokens)


class HttpError(Exception):
    pass


class HttpConnection:
    """One HTTP/1.1 connection, re-opened when the server closes it; reads chunked SSE bodies."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def post_sse(self, path: str, body: bytes, api_key: str):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(
            (
                f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAuthorization: Bearer {api_key}\r\n"
                f"Content-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
        reader = self.reader
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        chunked = headers.get("transfer-encoding") == "chunked"
        if status != 200 or not chunked:
            payload = await (
                self._chunks_all() if chunked else reader.readexactly(int(headers.get("content-length", 0)))
            )
            self.close()
            raise HttpError(f"{status}: {payload[:300]!r}")
        pending = b""
        done = False
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()  # the blank line after the last chunk (no trailers)
                break
            pending += await reader.readexactly(size)
            await reader.readexactly(2)
            *events, pending = pending.split(b"\n\n")
            for event in events:
                for line in event.split(b"\n"):
                    if line.startswith(b"data:"):
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            done = True
                        else:
                            yield json.loads(data)
        if headers.get("connection") == "close":
            self.close()
        if not done:
            raise HttpError("the stream ended without data: [DONE]")

    async def _chunks_all(self) -> bytes:
        data = b""
        while size := int((await self.reader.readline()).split(b";")[0], 16):
            data += await self.reader.readexactly(size)
            await self.reader.readexactly(2)
        await self.reader.readline()
        return data


# ----- CPU accounting ---------------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class CpuMeter:
    """CPU seconds of this client (every thread: grpc's poller too), the echo backend and the
    gateway: the cost of a token on each, whatever else the shared machine is doing."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids

    def read(self) -> dict[str, float]:
        return {"client": time.process_time(), **{name: process_cpu(pid) for name, pid in self.pids.items()}}


# ----- phases -----------------------------------------------------------------------------------


async def run_phase(client, kind: str, streams: int, seconds: float, text: str, words: int, meter=None) -> Phase:
    """``streams`` slots, each starting streams back to back until ``seconds`` have passed."""
    loop = asyncio.get_running_loop()
    samples: list[Sample] = []
    deadline = loop.time() + seconds

    async def slot():
        connection = await client.connection()
        try:
            while loop.time() < deadline:
                samples.append(await client.stream(connection, text, words))
        finally:
            if connection is not None:
                connection.close()

    server = getattr(client, "server_ttft", None)
    before = server() if server else (0.0, 0)
    cpu = meter.read() if meter else {}
    started = time.perf_counter()
    await asyncio.gather(*(slot() for _ in range(streams)))
    elapsed = time.perf_counter() - started
    phase = Phase(kind, streams, 0.0, samples)
    phase.tokens_per_s = phase.tokens / elapsed
    if meter:
        phase.cpu = {name: value - cpu[name] for name, value in meter.read().items()}
    if server:
        after = server()
        phase.server_ttft = (after[0] - before[0], after[1] - before[1])
    return phase


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))] if ordered else float("nan")


async def measure(clients: dict, rounds: int, seconds: float, words: int, meter: CpuMeter) -> list[Phase]:
    text = " ".join(f"w{i}" for i in range(words))
    for client in clients.values():  # warm-up: connections, code paths, the probe cache
        await run_phase(client, "warm-up", 4, min(1.0, seconds / 4), text, words)
    phases = []
    for round_index in range(rounds):
        order = list(clients) if round_index % 2 == 0 else list(reversed(clients))
        for streams in CONCURRENCY:
            for kind in order:
                phase = await run_phase(clients[kind], kind, streams, seconds, text, words, meter)
                phases.append(phase)
                print(
                    f"round {round_index + 1}: {kind:7} {streams:2} streams: {phase.tokens_per_s:9.0f} tokens/s, "
                    f"{len(phase.samples)} streams, {len(phase.errors)} errors, load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
                if phase.errors:
                    print(f"  first error: {phase.errors[0]}", flush=True)
    return phases


# ----- the fleet --------------------------------------------------------------------------------


def start_fleet(fleet: Fleet, direct_only: bool) -> dict:
    """web + qcluster (+ gateway) + one worker; ``bench-echo`` loaded; returns what clients need."""
    fleet.create_database()
    prometheus = fleet.workdir / "prometheus"
    prometheus.mkdir()
    fleet.settings_env["PROMETHEUS_MULTIPROC_DIR"] = str(prometheus)
    os.environ.pop("ECHO_TOKENS_PER_SECOND", None)  # unthrottled, whatever the caller's environment
    gateway_port = free_port()
    pids = {}
    if not direct_only:  # started first: it needs nothing else to come up
        gateway = fleet.spawn(
            "gateway", [sys.executable, "manage.py", "gateway"], CONTROLPLANE_GATEWAY_BIND=f"127.0.0.1:{gateway_port}"
        )
        pids["gateway"] = gateway.popen.pid
    fleet.start_qcluster()
    # the frontend's key, made while the rest comes up (manage.py takes seconds to start)
    key_maker = ThreadPoolExecutor(1)
    frontend_key = key_maker.submit(fleet.manage, "create_api_key", "bench-frontend", "--role", "frontend")
    fleet.start_web()
    # 32 calls at once in the backend (the worker's environment is its backends')
    fleet.settings_env["PYTHON_GRPC_MAX_WORKERS"] = str(max(CONCURRENCY))
    fleet.start_worker("bench-gateway-1", slots=1)
    del fleet.settings_env["PYTHON_GRPC_MAX_WORKERS"]
    fleet.wait_nodes({"bench-gateway-1"}, timeout=60)
    for path, body in (
        (f"/api/v1/models/{MODEL}/load-info", LOAD_INFO),
        (f"/api/v1/models/{MODEL}/scheduling", {"min_replicas": 1, "max_replicas": 0, "node_selector": {}}),
    ):
        status, answer = fleet.api("PUT", path, body)
        assert status in (200, 201), answer
    # the qcluster's leader loads the floor at its next pass (asked for now, as `make demo` does);
    # then a warm route hands out the replica's address and backend token
    fleet.api("POST", "/api/v1/reconcile")
    wait_for(lambda: fleet.model(MODEL).get("ready_replicas") == 1, timeout=90, what=f"{MODEL} loaded")
    status, lease = fleet.api("POST", f"/api/v1/models/{MODEL}/route", {**LOAD_INFO, "wait_seconds": 60}, timeout=90)
    assert status == 200, lease
    status, answer = fleet.api("POST", f"/api/v1/leases/{lease['lease_id']}/release")
    assert status == 200, answer
    frontend_key = frontend_key.result().strip()
    key_maker.shutdown()
    if not direct_only:
        wait_for(
            lambda: gateway_lists_model(gateway, gateway_port, frontend_key),
            timeout=60,
            what="the gateway lists the model",
        )
    (pids["backend"],) = [pid for (_, model, _), pid in fleet.running_backends().items() if model == MODEL]
    return {
        "address": lease["address"],
        "backend_token": lease["backend_token"],
        "gateway_port": gateway_port,
        "frontend_key": frontend_key,
        "pids": pids,
    }


def gateway_lists_model(gateway, port: int, key: str) -> bool:
    import urllib.request

    assert gateway.alive(), "the gateway exited:\n" + gateway.log()[-3000:]
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return MODEL in {model["id"] for model in json.load(response)["data"]}
    except OSError:
        return False


def in_flight(fleet: Fleet) -> int:
    return fleet.sql("SELECT coalesce(sum(in_flight), 0) FROM registry_nodemodel WHERE model_name = %s", (MODEL,))[0][0]


# ----- report -----------------------------------------------------------------------------------


def report(phases: list[Phase], args, load_avg: float, started_in: float) -> tuple[str, float | None]:
    def of(kind, streams):
        return [p for p in phases if p.kind == kind and p.streams == streams]

    def ttfts(kind, streams):
        return [s.ttft * 1000 for p in of(kind, streams) for s in p.samples if not s.error]

    kinds = ["direct"] + ([] if args.direct_only else ["gateway"])
    lines = [
        "| streams | direct tokens/s | gateway tokens/s | gateway / direct | direct / gateway "
        "| TTFT p50 direct / gateway / added ms | TTFT p99 direct / gateway / added ms | streams run direct / gateway |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = []
    for streams in CONCURRENCY:
        rate = {k: statistics.median(p.tokens_per_s for p in of(k, streams)) for k in kinds}
        p50 = {k: percentile(ttfts(k, streams), 0.50) for k in kinds}
        p99 = {k: percentile(ttfts(k, streams), 0.99) for k in kinds}
        runs = {k: sum(len(p.samples) for p in of(k, streams)) for k in kinds}
        if "gateway" in rate:
            ratio = rate["direct"] / rate["gateway"] if rate["gateway"] else float("inf")
            ratios.append(ratio)
            lines.append(
                f"| {streams} | {rate['direct']:.0f} | {rate['gateway']:.0f} | {1 / ratio:.2f}x | {ratio:.2f}x "
                f"| {p50['direct']:.1f} / {p50['gateway']:.1f} / {p50['gateway'] - p50['direct']:+.1f} "
                f"| {p99['direct']:.1f} / {p99['gateway']:.1f} / {p99['gateway'] - p99['direct']:+.1f} "
                f"| {runs['direct']} / {runs['gateway']} |"
            )
        else:
            lines.append(
                f"| {streams} | {rate['direct']:.0f} | - | - | - | {p50['direct']:.1f} / - / - "
                f"| {p99['direct']:.1f} / - / - | {runs['direct']} / - |"
            )
    if "gateway" in kinds:
        lines.append("")
        for streams in CONCURRENCY:
            total = sum(p.server_ttft[0] for p in of("gateway", streams))
            count = sum(p.server_ttft[1] for p in of("gateway", streams))
            client = ttfts("gateway", streams)
            lines.append(
                f"- {streams} stream(s): the gateway's own time to first token (its metrics: request arrived -> first "
                f"text sent) averaged {total / max(count, 1) * 1000:.1f} ms over {count} requests; this client saw "
                f"{statistics.mean(client) if client else float('nan'):.1f} ms on average."
            )
    lines += [
        "",
        "| CPU per token (µs, summed over rounds) | streams | client | echo backend | gateway | all three |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for streams in CONCURRENCY:
        for kind in kinds:
            tokens = sum(p.tokens for p in of(kind, streams)) or 1
            cpu = {n: sum(p.cpu.get(n, 0.0) for p in of(kind, streams)) * 1e6 / tokens for n in ("client", "backend")}
            cpu["gateway"] = (
                sum(p.cpu.get("gateway", 0.0) for p in of(kind, streams)) * 1e6 / tokens if kind == "gateway" else 0.0
            )
            lines.append(
                f"| {kind} | {streams} | {cpu['client']:.0f} | {cpu['backend']:.0f} "
                f"| {cpu['gateway']:.0f} | {sum(cpu.values()):.0f} |"
            )
    command = "bench/bench_gateway.py" + (
        " --quick" if args.quick else f" --rounds {args.rounds} --seconds {args.seconds}"
    )
    command += f" --tokens {args.tokens}" + (" --direct-only" if args.direct_only else "")
    command += " --tuned-direct" if args.tuned_direct else ""
    header = (
        f"`.venv/bin/python {command}` on CPython {platform.python_version()}, local PostgreSQL, "
        f"{os.cpu_count()} shared CPUs (load average {load_avg:.2f} at the start; the fleet, the "
        f"backend and this client share them). Fleet up in {started_in:.0f} s. {args.rounds} round(s) "
        f"of {args.seconds:g} s phases; streams of {args.tokens} tokens; tokens/s is the median over rounds, "
        "TTFT percentiles pool every stream of every round."
    )
    return header + "\n\n" + "\n".join(lines), (max(ratios) if ratios else None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round of 3 s phases (< 60 s with start-up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each phase")
    parser.add_argument("--tokens", type=int, default=256, help="tokens (words) per stream")
    parser.add_argument("--direct-only", action="store_true", help="no gateway: measure the direct half alone")
    parser.add_argument(
        "--tuned-direct",
        action="store_true",
        help="the direct client runs with the gateway process's gRPC configuration (gateway/grpc_environment.py)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 3.0
    load_avg = os.getloadavg()[0]
    url = urlparse(os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
    admin = {"HOST": url.hostname or "127.0.0.1", "PORT": url.port or 5432, "USER": url.username or "postgres"}
    fleet = Fleet(admin_url=admin, workdir=Path(tempfile.mkdtemp(prefix="bench-gateway-")))
    (fleet.workdir / "var").mkdir()
    began = time.monotonic()
    try:
        info = start_fleet(fleet, args.direct_only)
        started_in = time.monotonic() - began
        print(
            f"# fleet up in {started_in:.1f}s ({fleet.workdir}); load average {load_avg:.2f} at the start", flush=True
        )

        async def run():
            clients = {"direct": await DirectClient(info["address"], info["backend_token"]).open()}
            if not args.direct_only:
                clients["gateway"] = await GatewayClient("127.0.0.1", info["gateway_port"], info["frontend_key"]).open()
            try:
                return await measure(clients, args.rounds, args.seconds, args.tokens, CpuMeter(info["pids"]))
            finally:
                for client in clients.values():
                    await client.close()

        phases = asyncio.run(run())
        try:
            wait_for(lambda: in_flight(fleet) == 0, timeout=30, what="in-flight back to 0")
        except AssertionError:
            pass  # reported below
        left = in_flight(fleet)
        jobs = fleet.sql(
            "SELECT state, error_code, count(*) FROM registry_loadjob WHERE model_name = %s GROUP BY 1, 2 ORDER BY 1, 2",
            (MODEL,),
        )
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        closing = time.monotonic()
        fleet.close()
        print(f"# fleet stopped in {time.monotonic() - closing:.1f}s", flush=True)
    table, ratio = report(phases, args, load_avg, started_in)
    errors = sum(len(p.errors) for p in phases)
    print()
    print(table)
    print(f"\nerrors: {errors}; in-flight after the run: {left}; total {time.monotonic() - began:.0f} s")
    print("load jobs of the model (state, error code, count; the first one loaded it):", jobs)
    if ratio is not None:
        print(f"RATIO gateway: {ratio:.2f}x (goal <= {GOAL_RATIO}x)")
    return 1 if errors or left else 0


if __name__ == "__main__":
    sys.exit(main())
