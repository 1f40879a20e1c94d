"""``probes.fan_out``: the pass's parallel checks on real threads (no database, no network)."""

import threading
import time

from reconciler.probes import fan_out


def test_every_call_answers_with_its_result_or_its_exception_and_never_more_than_the_bound_run_at_once():
    running, most, lock = 0, 0, threading.Lock()
    started = threading.Barrier(4, timeout=10)  # the bound is reached: 4 calls run together

    def call(i):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            if i < 4:
                started.wait()
            if i % 5 == 0:
                raise ValueError(f"call {i} failed")
            return i * i
        finally:
            with lock:
                running -= 1

    answers = fan_out([(i, call, (i,), {}) for i in range(40)], concurrency=4)

    assert sorted(answers) == list(range(40))
    for i, (ok, value) in answers.items():
        if i % 5 == 0:
            assert not ok and isinstance(value, ValueError) and str(value) == f"call {i} failed"
        else:
            assert ok and value == i * i
    assert most == 4


def test_its_threads_are_gone_when_it_returns():
    answers = fan_out([(i, time.sleep, (0.01,), {}) for i in range(8)], concurrency=3, name="fan-out-test")

    assert answers == {i: (True, None) for i in range(8)}
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("fan-out-test")]


def test_no_calls_start_no_thread():
    assert fan_out([], concurrency=8) == {}
