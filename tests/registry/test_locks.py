"""Advisory locks (PostgreSQL) and their file-lock fallback (SQLite)."""

import threading

import pytest

from registry.locks import LockKey, LockTimeout, advisory_lock, try_advisory_lock, xact_advisory_lock


def hold_in_thread(key, close_thread_connections):
    """Take ``key`` in another thread (another connection); returns (taken, release) events."""
    taken, release = threading.Event(), threading.Event()

    def hold():
        try:
            with advisory_lock(key, timeout=5):
                taken.set()
                release.wait(timeout=10)
        finally:
            close_thread_connections()

    thread = threading.Thread(target=hold)
    thread.start()
    assert taken.wait(timeout=10)
    return thread, release


@pytest.mark.django_db(transaction=True)
def test_try_lock_fails_while_another_connection_holds_it(close_thread_connections):
    thread, release = hold_in_thread(LockKey.RECONCILE, close_thread_connections)
    try:
        with try_advisory_lock(LockKey.RECONCILE) as held:
            assert held is False
    finally:
        release.set()
        thread.join()
    with try_advisory_lock(LockKey.RECONCILE) as held:
        assert held is True


@pytest.mark.django_db(transaction=True)
def test_blocking_lock_times_out_instead_of_hanging(close_thread_connections):
    thread, release = hold_in_thread(LockKey.MIGRATE, close_thread_connections)
    try:
        with pytest.raises(LockTimeout), advisory_lock(LockKey.MIGRATE, timeout=0.3):
            pass
    finally:
        release.set()
        thread.join()
    with advisory_lock(LockKey.MIGRATE, timeout=1):
        pass


@pytest.mark.django_db(transaction=True)
def test_locks_are_reentrant_free_after_release():
    for _ in range(3):
        with try_advisory_lock(LockKey.RECONCILE) as held:
            assert held


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_transaction_lock_is_released_at_commit(close_thread_connections):
    from django.db import transaction

    with transaction.atomic():
        xact_advisory_lock(LockKey.RECONCILE)
        result = []
        worker = threading.Thread(
            target=lambda: (result.append(_try_in_new_connection(LockKey.RECONCILE)), close_thread_connections())
        )
        worker.start()
        worker.join()
        assert result == [False]
    with try_advisory_lock(LockKey.RECONCILE) as held:
        assert held


def _try_in_new_connection(key):
    with try_advisory_lock(key) as held:
        return held


@pytest.mark.django_db(transaction=True)
def test_transaction_lock_needs_a_transaction():
    with pytest.raises(RuntimeError):
        xact_advisory_lock(LockKey.RECONCILE)
