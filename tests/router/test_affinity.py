"""The affinity preference (``registry.affinity``, pure): rendezvous order, the bounded-load cap,
the choice, key validation."""

from __future__ import annotations

import hashlib
import math
import random
import uuid
from collections import Counter

import pytest

from registry import affinity
from registry.affinity import Candidate


def fleet(loads):
    """Candidates on distinct nodes with the given in-flight counts (deterministic ids)."""
    return [Candidate(i + 1, uuid.UUID(int=i + 1), 0, load) for i, load in enumerate(loads)]


def test_the_score_is_the_md5_postgresql_computes():
    node = uuid.UUID("0f0e0d0c-0b0a-0908-0706-050403020100")
    # md5('session-1|0f0e0d0c-0b0a-0908-0706-050403020100|2'): the text PostgreSQL hashes.
    expected = hashlib.md5(b"session-1|0f0e0d0c-0b0a-0908-0706-050403020100|2").hexdigest()
    assert affinity.score("session-1", node, 2) == expected
    assert affinity.score("session-1", node, 2) != affinity.score("session-1", node, 3)


def test_the_preference_is_stable_and_independent_of_the_candidates_order():
    candidates = fleet([0, 0, 0, 0])
    first = affinity.preference("abc", candidates)
    assert affinity.preference("abc", list(reversed(candidates))) == first
    assert sorted(first) == sorted(candidates)


def test_keys_spread_over_the_replicas():
    candidates = fleet([0, 0, 0, 0])
    firsts = Counter(affinity.preference(f"session-{i}", candidates)[0].pk for i in range(4000))
    assert set(firsts) == {1, 2, 3, 4}
    assert min(firsts.values()) > 800  # 1000 each on average


def test_removing_a_replica_moves_only_the_keys_it_had():
    candidates = fleet([0, 0, 0, 0, 0])
    keys = [f"k{i}" for i in range(2000)]
    before = {key: affinity.preference(key, candidates)[0].pk for key in keys}
    after = {key: affinity.preference(key, candidates[:-1])[0].pk for key in keys}
    moved = [key for key in keys if before[key] != after[key]]
    assert moved and all(before[key] == 5 for key in moved)


def test_adding_a_replica_takes_keys_only_for_itself():
    candidates = fleet([0, 0, 0, 0, 0])
    keys = [f"k{i}" for i in range(2000)]
    before = {key: affinity.preference(key, candidates[:-1])[0].pk for key in keys}
    after = {key: affinity.preference(key, candidates)[0].pk for key in keys}
    assert all(after[key] in (before[key], 5) for key in keys)


@pytest.mark.parametrize(
    ("loads", "factor", "cap"),
    [
        ([0, 0, 0], 1.25, 2),  # idle: ceil(1.25 / 3) + 1, a replica serving one request still takes keys
        ([3, 3, 3], 1.25, 6),  # ceil(1.25 * 10 / 3) + 1 = ceil(4.17) + 1
        ([8, 0, 0, 0], 1.25, 4),  # ceil(1.25 * 9 / 4) + 1 = ceil(2.81) + 1
        ([4, 4], 1.0, 6),  # factor 1: ceil(9 / 2) + 1
        ([4, 4], 0.5, 6),  # below 1 counts as 1
        ([], 1.25, 0),
    ],
)
def test_the_cap(loads, factor, cap):
    assert affinity.load_cap(loads, factor) == cap


def test_an_idle_fleet_gives_every_key_its_first_choice():
    candidates = fleet([0, 0, 0])
    for key in ("a", "b", "c", "d"):
        assert affinity.choose(key, candidates, 1.25) == affinity.preference(key, candidates)[0]


def test_a_key_whose_replica_is_over_the_cap_goes_to_its_next_replica_under_it():
    key = "session-42"
    order = [c.pk for c in affinity.preference(key, fleet([0, 0, 0, 0]))]
    loads = {pk: 0 for pk in order}
    loads[order[0]] = 6  # total 6 + 1 over 4 replicas: cap ceil(1.25 * 7 / 4) + 1 = 4
    candidates = fleet([loads[pk] for pk in range(1, 5)])
    assert affinity.choose(key, candidates, 1.25).pk == order[1]

    loads[order[1]] = 4  # total 10 + 1: cap ceil(3.44) + 1 = 5, and 4 < 5: still taken
    candidates = fleet([loads[pk] for pk in range(1, 5)])
    assert affinity.choose(key, candidates, 1.25).pk == order[1]
    loads[order[1]] = 5  # total 11 + 1: cap ceil(3.75) + 1 = 5, and 5 >= 5
    candidates = fleet([loads[pk] for pk in range(1, 5)])
    assert affinity.choose(key, candidates, 1.25).pk == order[2]


def test_some_replica_is_always_under_the_cap():
    rng = random.Random(7)
    for _ in range(2000):
        loads = [rng.randrange(0, 50) for _ in range(rng.randrange(1, 9))]
        factor = rng.choice([1.0, 1.1, 1.25, 2.0])
        chosen = affinity.choose(f"k{rng.random()}", fleet(loads), factor)
        assert chosen is not None and chosen.in_flight < affinity.load_cap(loads, factor)


def test_no_candidates_no_choice():
    assert affinity.choose("k", [], 1.25) is None


def test_bounded_load_keeps_every_replica_within_the_cap_as_requests_pile_up():
    """Requests of a few hot keys arriving one after another, none released: each placement
    respects the cap at its time, so the busiest replica never exceeds the final cap."""
    loads = [0] * 5
    keys = ["hot"] * 60 + [f"k{i}" for i in range(40)]
    for key in keys:
        chosen = affinity.choose(key, fleet(loads), 1.25)
        assert chosen.in_flight < affinity.load_cap(loads, 1.25)
        loads[chosen.pk - 1] += 1
    assert sum(loads) == 100
    assert max(loads) <= math.ceil(1.25 * 100 / 5) + 1  # 26, although one key sent 60 requests


@pytest.mark.parametrize("key", [None, ""])
def test_no_key_is_no_affinity(key):
    assert affinity.validate_key(key) is None


@pytest.mark.parametrize("key", ["x" * 257, "a\x00b", "line\nbreak", 42])
def test_bad_keys_are_refused(key):
    with pytest.raises(ValueError):
        affinity.validate_key(key)


def test_a_long_unicode_key_is_accepted():
    key = "sessión-" + "é" * 248
    assert len(key) == 256 and affinity.validate_key(key) == key
