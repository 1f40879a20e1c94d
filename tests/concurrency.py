"""Real threads for concurrency tests: each has its own database connection (closed when the
thread ends). ``run_in_threads`` releases many at once; ``start_in_thread`` runs one in the
background; ``held_in_another_thread`` holds a lock or a transaction on another connection
while the test acts. (Where the other shared test helpers live: ``tests/clients.py``.)"""

import threading
from concurrent.futures import Future
from contextlib import contextmanager

THREADS = 8


def run_in_threads(target, close_thread_connections, count=THREADS, *, return_exceptions=False, timeout=60):
    """Run ``target(i)`` for i in range(count), each in its own thread, released together by a
    barrier; every thread closes its database connection when done. Returns the results in
    index order. An exception raised in a thread fails the test, unless ``return_exceptions``
    (for tests that expect typed errors), which puts it in that thread's slot instead."""
    barrier = threading.Barrier(count)
    results = [None] * count
    errors = []

    def run(index):
        try:
            barrier.wait(timeout=10)
            results[index] = target(index)
        except Exception as exc:  # handed to the test below, with the thread's index
            results[index] = exc
            errors.append((index, exc))
        finally:
            close_thread_connections()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
    if not return_exceptions:
        assert not errors, errors
    return results


def start_in_thread(target, close_thread_connections) -> Future:
    """Run ``target()`` in a thread of its own (its own database connection, closed when done);
    the returned future carries its result or its exception."""
    future = Future()

    def run():
        try:
            future.set_result(target())
        except BaseException as exc:  # noqa: BLE001 - handed to the test through the future
            future.set_exception(exc)
        finally:
            close_thread_connections()

    threading.Thread(target=run, daemon=True).start()
    return future


@contextmanager
def held_in_another_thread(context, close_thread_connections):
    """Enter ``context()`` (an advisory lock, a transaction that has taken row locks) in
    another thread, on another connection, and hold it while the with-block runs. Yields
    ``release()``: it lets go and waits for the thread (the block's end does that too). An
    exception in the thread fails the test."""
    taken, release = threading.Event(), threading.Event()
    errors = []

    def hold():
        with context():
            taken.set()
            release.wait(timeout=30)

    def run():
        try:
            hold()
        except BaseException as exc:  # noqa: BLE001 - handed to the test below
            errors.append(exc)
        finally:
            taken.set()
            close_thread_connections()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def let_go():
        release.set()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the holding thread did not finish"

    assert taken.wait(timeout=10) and not errors, errors
    try:
        yield let_go
    finally:
        let_go()
    assert not errors, errors
