"""``events --follow``'s cursor, against an event store that answers ``GET /api/v1/events`` the
way the server does (``since`` inclusive, ordering, limit) and commits events the way a
reconcile pass does: stamped when made, visible later, so an event can appear with an instant
older than one already printed. Each event is printed once, none is missed, Ctrl-C ends the follow with 0. The real follow against gunicorn is in
``test_cli.py``."""

from __future__ import annotations

import argparse
import io
import json
from datetime import UTC, datetime, timedelta

import pytest

from cpclient import commands

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def store_waits(monkeypatch):
    """``commands.pause`` hands over to the store under test (``EventStore.wait``)."""
    current: list[EventStore] = []
    monkeypatch.setattr(commands, "pause", lambda seconds: current[-1].wait(seconds))
    return current


def event(event_id: int, seconds: float, model: str = "m") -> dict:
    created = (T0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")
    return {
        "id": event_id,
        "created_at": created,
        "kind": "replica_added",
        "model_name": model,
        "node_id": None,
        "node_name": "",
        "message": f"event {event_id}",
        "details": {},
    }


class EventStore:
    """The committed events; ``commits`` lists what becomes visible during each wait between
    two polls (after the last, Ctrl-C)."""

    def __init__(self, committed: list[dict], commits: list[list[dict]], waits: list):
        waits.append(self)
        self.committed = list(committed)
        self.commits = list(commits)
        self.polls: list[dict] = []

    def wait(self, seconds: float) -> None:
        if not self.commits:
            raise KeyboardInterrupt  # Ctrl-C while the follow waits
        self.committed += self.commits.pop(0)

    def list_events(self, *, model=None, node=None, kind=None, since=None, oldest_first=False, limit=100):
        if oldest_first:
            self.polls.append({"since": since, "limit": limit})
        rows = [e for e in self.committed if model is None or e["model_name"] == model]
        if since is not None:
            rows = [e for e in rows if _instant(e["created_at"]) >= _instant(since)]
        rows.sort(key=lambda e: (e["created_at"], e["id"]), reverse=not oldest_first)
        return rows[:limit]


def _instant(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def follow(store: EventStore, output: str = "table", limit: int = 2, model: str | None = None) -> tuple[int, str]:
    options = argparse.Namespace(model=model, node=None, kind=None, limit=limit, follow=True, interval=0.001)
    stream = io.StringIO()
    code = commands.events(store, options, commands.Output(output, stream))
    return code, stream.getvalue()


def printed_ids(text: str) -> list[int]:
    return [int(line.rsplit(" ", 1)[1]) for line in text.splitlines()[1:]]


def test_each_event_is_printed_once_also_one_committed_late_with_an_older_instant(store_waits):
    store = EventStore(
        [event(1, 0), event(2, 10), event(3, 20)],
        [
            [],  # nothing new
            [event(4, 30)],
            [event(5, 25), event(6, 31)],  # 5 was made before 4 but committed after it was printed
            [event(7, 31)],  # the same instant as 6
            [],
        ],
        store_waits,
    )
    code, text = follow(store)
    assert code == 0
    lines = text.splitlines()
    assert lines[0].split() == ["AGE", "KIND", "MODEL", "NODE", "MESSAGE"]
    assert printed_ids(text) == [2, 3, 4, 5, 6, 7]  # the newest two first, then each new one once
    assert all(line.index("replica_added") == lines[0].index("KIND") for line in lines[1:])
    # Each poll looks back FOLLOW_OVERLAP from the newest instant printed.
    assert store.polls[0]["since"] == (T0 + timedelta(seconds=20) - commands.FOLLOW_OVERLAP).isoformat()
    assert store.polls[-1]["since"] == (T0 + timedelta(seconds=31) - commands.FOLLOW_OVERLAP).isoformat()


def test_json_follow_prints_one_event_per_line(store_waits):
    store = EventStore([event(1, 0)], [[event(2, 5)], []], store_waits)
    code, text = follow(store, output="json")
    assert code == 0
    assert [json.loads(line)["id"] for line in text.splitlines()] == [1, 2]


def test_a_follow_from_no_events_prints_what_comes_and_pages_through_a_burst(monkeypatch, store_waits):
    monkeypatch.setattr(commands, "FOLLOW_PAGE", 3)
    burst = [event(index, index) for index in range(1, 9)]
    store = EventStore([event(99, 0, model="other")], [burst, []], store_waits)
    code, text = follow(store, model="m")
    assert code == 0
    assert printed_ids(text) == list(range(1, 9))
    assert text.splitlines()[0].startswith("AGE")
    assert len(store.polls) >= 3  # the burst took several pages
