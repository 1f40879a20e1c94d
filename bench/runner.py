"""``make bench``: quick versions of the four hot-path benchmarks, each ratio against its goal.

    scripts/bench [--only NAME ...] [--timeout SECONDS]      (what ``make bench`` runs)

Runs ``bench_heartbeat.py``, ``bench_route.py``, ``bench_reconcile.py`` and
``bench_schedule.py`` one after the other, each with ``--quick``, on PostgreSQL
(``DATABASE_URL``, default ``postgres://postgres@127.0.0.1:5432/postgres``: the server on which
each benchmark creates and drops its own throwaway database) and with the settings ``make run``
ships: environment variables that override a shipped setting are removed from the benchmarks'
environment (and named). It prints the machine's load average at the start, each benchmark's
output as it comes, then a summary: each ratio against its goal (issue 14), MET or NOT MET.

Contract with the benchmarks: each accepts ``--quick`` and prints exactly one line
``RATIO <name>: <float>x (goal <= <float>x)``. A benchmark that exits non-zero, times out, or
prints no such line (or several) fails the run (exit status 1); a goal not met is reported, not
a failure (exit status 0).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/postgres"
TOTAL_GOAL_S = 300  # issue 14: all four quick benchmarks in under 5 minutes


@dataclass(frozen=True)
class Benchmark:
    name: str  # the name in its RATIO line
    script: str
    goal: float  # issue 14's goal: the ratio at most this
    what: str


BENCHMARKS = (
    Benchmark("heartbeat", "bench_heartbeat.py", 2, "heartbeats through the API vs pgbench of the same UPDATE"),
    Benchmark("route", "bench_route.py", 3, "warm route + release vs the raw SQL pick + release"),
    Benchmark("pass", "bench_reconcile.py", 2, "steady reconcile pass (10,000 models) vs its raw snapshot SQL"),
    Benchmark("placements", "bench_schedule.py", 7, "placements by the reconciler vs raw INSERT + UPDATE"),
)

RATIO_LINE = re.compile(r"^RATIO (?P<name>[\w-]+): (?P<ratio>\d+(?:\.\d+)?)x \(goal <= (?P<goal>\d+(?:\.\d+)?)x\)$")

# Environment variables that change a setting ``make run`` ships (controlplane/settings.py,
# controlplane/gunicorn.conf.py); DATABASE_URL is set by the runner itself.
_SETTING_OVERRIDE = re.compile(r"^(CONTROLPLANE_|WEB_|Q_|READYZ_|SQLITE_|DATABASE_|DJANGO_DEBUG$)")
_KEPT = {"DATABASE_URL", "CONTROLPLANE_VAR_DIR"}


@dataclass(frozen=True)
class Result:
    benchmark: Benchmark
    seconds: float
    ratio: float | None = None
    error: str = ""  # why the benchmark failed (crash, timeout, no or bad RATIO line)

    @property
    def met(self) -> bool:
        return self.ratio is not None and self.ratio <= self.benchmark.goal


def parse_ratio(output: str, benchmark: Benchmark) -> tuple[float | None, str]:
    """``(ratio, "")`` from a benchmark's output, or ``(None, why)`` when it does not hold
    exactly one RATIO line for ``benchmark`` with the goal of issue 14."""
    matches = [RATIO_LINE.match(line.rstrip("\r")) for line in output.splitlines()]
    found = [match for match in matches if match]
    loose = [line for line in output.splitlines() if line.startswith("RATIO")]
    if not found:
        if loose:
            return None, f"malformed RATIO line: {loose[0]!r}"
        return None, "no RATIO line"
    if len(found) > 1 or len(loose) > 1:
        return None, f"{len(loose)} RATIO lines, expected exactly one"
    match = found[0]
    if match["name"] != benchmark.name:
        return None, f"RATIO line names {match['name']!r}, expected {benchmark.name!r}"
    if float(match["goal"]) != benchmark.goal:
        return None, f"RATIO line states goal {match['goal']}x, issue 14's is {benchmark.goal:g}x"
    return float(match["ratio"]), ""


def result_of(benchmark: Benchmark, output: str, *, returncode: int | None, seconds: float) -> Result:
    """Judge one run: ``returncode`` None means it timed out."""
    if returncode is None:
        return Result(benchmark, seconds, error="timed out")
    if returncode != 0:
        return Result(benchmark, seconds, error=f"exit status {returncode}")
    ratio, why = parse_ratio(output, benchmark)
    return Result(benchmark, seconds, ratio=ratio, error=why)


def summary(results: list[Result], *, load: str, total_s: float) -> tuple[str, int]:
    """The summary table and the exit status (1 when a benchmark failed, else 0)."""
    lines = [
        "",
        f"== make bench: summary (load average at the start: {load}) ==",
        "| benchmark | ratio | goal | verdict | seconds |",
        "|---|---:|---:|---|---:|",
    ]
    for result in results:
        bench = result.benchmark
        if result.error:
            ratio, verdict = "-", f"FAILED ({result.error})"
        else:
            ratio, verdict = f"{result.ratio:.2f}x", "MET" if result.met else "NOT MET"
        lines.append(
            f"| {bench.name} ({bench.script}) | {ratio} | <= {bench.goal:g}x | {verdict} | {result.seconds:.0f} |"
        )
    within = "within" if total_s < TOTAL_GOAL_S else "OVER"
    lines.append(f"total {total_s:.0f} s ({within} the {TOTAL_GOAL_S} s budget of make bench)")
    failed = [result for result in results if result.error]
    met = sum(result.met for result in results)
    lines.append(f"goals met: {met} of {len(results)}")
    if failed:
        lines.append("FAILED: " + ", ".join(f"{r.benchmark.script} ({r.error})" for r in failed))
    return "\n".join(lines), 1 if failed else 0


def shipped_environment(environ: dict[str, str], database_url: str) -> tuple[dict[str, str], list[str]]:
    """The benchmarks' environment: ``environ`` without setting overrides, plus the server URL
    under both names the benchmarks read. Returns it and the names removed."""
    removed = sorted(name for name in environ if _SETTING_OVERRIDE.match(name) and name not in _KEPT)
    env = {name: value for name, value in environ.items() if name not in removed}
    env["DATABASE_URL"] = env["BENCH_DATABASE_URL"] = database_url
    env["PYTHONUNBUFFERED"] = "1"
    return env, removed


def run_one(benchmark: Benchmark, env: dict[str, str], *, timeout: float) -> Result:
    """Run one benchmark with ``--quick``, echoing its output as it comes."""
    print(f"\n== {benchmark.name}: {benchmark.script} --quick ({benchmark.what}) ==", flush=True)
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, str(BENCH_DIR / benchmark.script), "--quick"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    timed_out = threading.Event()

    def kill() -> None:  # its own session: the benchmark and whatever it started
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop() -> None:  # a hung benchmark
        timed_out.set()
        kill()

    watchdog = threading.Timer(timeout, stop)
    watchdog.start()
    output = []
    try:
        for line in process.stdout:
            output.append(line)
            print(f"  {line}", end="", flush=True)
        returncode = process.wait()
    except BaseException:  # Ctrl-C: the benchmark does not outlive the runner
        kill()
        raise
    finally:
        watchdog.cancel()
    if timed_out.is_set():
        returncode = None
    return result_of(benchmark, "".join(output), returncode=returncode, seconds=time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [bench.name for bench in BENCHMARKS]
    parser.add_argument("--only", action="append", choices=names, help="run only this benchmark (repeatable)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds before a benchmark counts as hung")
    args = parser.parse_args(argv)
    chosen = [bench for bench in BENCHMARKS if not args.only or bench.name in args.only]

    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    database_url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    env, removed = shipped_environment(dict(os.environ), database_url)
    print(f"make bench: load average at the start {load} ({os.cpu_count()} CPUs, Python {platform.python_version()})")
    print(f"PostgreSQL server: {database_url} (each benchmark creates and drops its own database)")
    print(
        "settings: as make run ships them"
        + (f" (removed from the environment: {', '.join(removed)})" if removed else "")
    )

    started = time.monotonic()
    results = [run_one(bench, env, timeout=args.timeout) for bench in chosen]
    text, status = summary(results, load=load, total_s=time.monotonic() - started)
    print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
