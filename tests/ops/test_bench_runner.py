"""``make bench`` (bench/runner.py): how it reads each benchmark's RATIO line and judges the run,
on sample outputs (the benchmarks themselves take minutes and run as ``make bench``); and the
contract every benchmark script keeps with it (a ``--quick`` flag, one RATIO line)."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def _load_runner():
    spec = importlib.util.spec_from_file_location("bench_runner", BENCH_DIR / "runner.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


runner = _load_runner()
BY_NAME = {bench.name: bench for bench in runner.BENCHMARKS}

RECONCILE_OUTPUT = """\
# reconcile pass, steady state, 1000 nodes, PostgreSQL, median of 3
| models | pass (ms) | queries | raw snapshot SQL (ms) | ratio pass/raw |
|---:|---:|---:|---:|---:|
| 10,000 | 512.3 | 31 | 270.1 | 1.90 |
RATIO pass: 1.90x (goal <= 2x)
"""


def test_the_four_benchmarks_and_their_goals_are_issue_14s():
    assert {bench.name: (bench.script, bench.goal) for bench in runner.BENCHMARKS} == {
        "heartbeat": ("bench_heartbeat.py", 2),
        "route": ("bench_route.py", 3),
        "pass": ("bench_reconcile.py", 2),
        "placements": ("bench_schedule.py", 7),
    }


def test_a_ratio_line_is_read_with_an_integer_or_a_decimal_goal():
    assert runner.parse_ratio(RECONCILE_OUTPUT, BY_NAME["pass"]) == (1.9, "")
    output = "warming up\nRATIO placements: 12.5x (goal <= 7.0x)\ndone\n"
    assert runner.parse_ratio(output, BY_NAME["placements"]) == (12.5, "")


@pytest.mark.parametrize(
    ("output", "why"),
    [
        ("| 10,000 | 512.3 | 31 | 270.1 | 1.90 |\n", "no RATIO line"),
        ("RATIO pass: 1.9 (goal <= 2x)\n", "malformed RATIO line"),
        ("RATIO pass: fast (goal <= 2x)\n", "malformed RATIO line"),
        ("RATIO pass: 1.9x (goal <= 2x)\nRATIO pass: 2.1x (goal <= 2x)\n", "2 RATIO lines"),
        ("RATIO pass: 1.9x (goal <= 2x)\nRATIO pass: 2.1x\n", "2 RATIO lines"),
        ("RATIO route: 1.9x (goal <= 2x)\n", "names 'route', expected 'pass'"),
        ("RATIO pass: 1.9x (goal <= 3x)\n", "goal 3x, issue 14's is 2x"),
    ],
)
def test_anything_but_exactly_one_well_formed_ratio_line_is_refused(output, why):
    ratio, error = runner.parse_ratio(output, BY_NAME["pass"])
    assert ratio is None
    assert why in error


def test_goals_met_and_not_met_are_reported_and_the_run_succeeds():
    results = [
        runner.result_of(BY_NAME["pass"], RECONCILE_OUTPUT, returncode=0, seconds=41.0),
        runner.result_of(BY_NAME["route"], "RATIO route: 4.25x (goal <= 3x)\n", returncode=0, seconds=30.0),
    ]
    text, status = runner.summary(results, load="0.52 0.40 0.31", total_s=71.0)

    assert status == 0
    assert "load average at the start: 0.52 0.40 0.31" in text
    assert "| pass (bench_reconcile.py) | 1.90x | <= 2x | MET | 41 |" in text
    assert "| route (bench_route.py) | 4.25x | <= 3x | NOT MET | 30 |" in text
    assert "goals met: 1 of 2" in text
    assert "within the 300 s budget" in text
    assert "FAILED" not in text


@pytest.mark.parametrize(
    ("output", "returncode", "reason"),
    [
        ("Traceback (most recent call last):\n  ...\nAssertionError\n", 1, "exit status 1"),
        ("| 10,000 | 512.3 | 31 | 270.1 | 1.90 |\n", 0, "no RATIO line"),
        ("RATIO pass: 1.90x (goal <= 2x)\n", None, "timed out"),
    ],
)
def test_a_crash_a_missing_ratio_or_a_hang_fails_the_run_loudly(output, returncode, reason):
    crashed = runner.result_of(BY_NAME["pass"], output, returncode=returncode, seconds=12.0)
    fine = runner.result_of(BY_NAME["placements"], "RATIO placements: 5x (goal <= 7x)\n", returncode=0, seconds=9.0)
    text, status = runner.summary([crashed, fine], load="1.00 1.00 1.00", total_s=400.0)

    assert status == 1
    assert f"| pass (bench_reconcile.py) | - | <= 2x | FAILED ({reason}) | 12 |" in text
    assert f"FAILED: bench_reconcile.py ({reason})" in text
    assert "| placements (bench_schedule.py) | 5.00x | <= 7x | MET | 9 |" in text
    assert "OVER the 300 s budget" in text


def test_the_benchmarks_run_with_the_shipped_settings_on_the_given_server():
    environ = {
        "PATH": "/usr/bin",
        "DATABASE_URL": "postgres://postgres@db:5432/postgres",
        "DATABASE_CONN_MAX_AGE": "0",
        "WEB_WORKERS": "1",
        "CONTROLPLANE_RECONCILE_PROBE_CONCURRENCY": "1",
        "CONTROLPLANE_VAR_DIR": "/tmp/x",
        "Q_WORKERS": "8",
        "DJANGO_DEBUG": "1",
    }
    env, removed = runner.shipped_environment(environ, "postgres://postgres@db:5432/postgres")

    assert removed == [
        "CONTROLPLANE_RECONCILE_PROBE_CONCURRENCY",
        "DATABASE_CONN_MAX_AGE",
        "DJANGO_DEBUG",
        "Q_WORKERS",
        "WEB_WORKERS",
    ]
    assert env["DATABASE_URL"] == env["BENCH_DATABASE_URL"] == "postgres://postgres@db:5432/postgres"
    assert env["PATH"] == "/usr/bin" and env["CONTROLPLANE_VAR_DIR"] == "/tmp/x"


@pytest.mark.parametrize("bench", runner.BENCHMARKS, ids=lambda bench: bench.name)
def test_every_benchmark_has_a_quick_flag_and_prints_its_ratio_line(bench):
    source = (BENCH_DIR / bench.script).read_text()

    assert re.search(r"""["']--quick["']""", source), f"{bench.script} has no --quick flag"
    assert f"RATIO {bench.name}: " in source, f"{bench.script} prints no 'RATIO {bench.name}: ...' line"
    assert "(goal <= " in source, f"{bench.script} does not state its goal in the RATIO line"
