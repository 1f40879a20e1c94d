"""Real threads for concurrency tests: each has its own database connection, all start at once."""

import threading

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
