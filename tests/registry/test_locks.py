"""Advisory locks (PostgreSQL) and their file-lock fallback (SQLite)."""

import pytest

from registry.locks import LockKey, LockTimeout, advisory_lock, try_advisory_lock, xact_advisory_lock
from tests.concurrency import held_in_another_thread, start_in_thread


def held_elsewhere(key, close_thread_connections):
    """``key`` taken by another connection (another thread) for the with-block."""
    return held_in_another_thread(lambda: advisory_lock(key, timeout=5), close_thread_connections)


@pytest.mark.django_db(transaction=True)
def test_try_lock_fails_while_another_connection_holds_it(close_thread_connections):
    with held_elsewhere(LockKey.RECONCILE, close_thread_connections), try_advisory_lock(LockKey.RECONCILE) as held:
        assert held is False
    with try_advisory_lock(LockKey.RECONCILE) as held:
        assert held is True


@pytest.mark.django_db(transaction=True)
def test_blocking_lock_times_out_instead_of_hanging(close_thread_connections):
    with held_elsewhere(LockKey.MIGRATE, close_thread_connections):
        with pytest.raises(LockTimeout), advisory_lock(LockKey.MIGRATE, timeout=0.3):
            pass
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
        other = start_in_thread(lambda: _try_in_new_connection(LockKey.RECONCILE), close_thread_connections)
        assert other.result(timeout=10) is False
    with try_advisory_lock(LockKey.RECONCILE) as held:
        assert held


def _try_in_new_connection(key):
    with try_advisory_lock(key) as held:
        return held


@pytest.mark.django_db(transaction=True)
def test_transaction_lock_needs_a_transaction():
    with pytest.raises(RuntimeError):
        xact_advisory_lock(LockKey.RECONCILE)
