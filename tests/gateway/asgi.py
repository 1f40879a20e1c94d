"""A minimal ASGI client for the gateway's in-process tests: one request, its answer, and a
client that can hang up after some server-sent events (as a dropped connection looks to an
ASGI app under uvicorn: ``http.disconnect`` from ``receive``, an ``OSError`` from ``send``)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field


@dataclass
class Answer:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self):
        return json.loads(self.body)

    @property
    def events(self) -> list:
        """The ``data:`` payloads of a server-sent event stream (JSON decoded, ``[DONE]`` kept)."""
        found = []
        for block in self.body.decode().split("\n\n"):
            if block.startswith("data: "):
                data = block[len("data: ") :]
                found.append(data if data == "[DONE]" else json.loads(data))
        return found

    @property
    def error(self) -> dict:
        return self.json()["error"]


async def request(
    app,
    method: str,
    path: str,
    body=None,
    *,
    key: str | None = None,
    headers=None,
    hang_up_after_events: int | None = None,
    peer: str = "127.0.0.1",
) -> Answer:
    raw = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
    all_headers = {"content-type": "application/json", **(headers or {})}
    if key is not None:
        all_headers["authorization"] = f"Bearer {key}"
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in all_headers.items()],
        "client": (peer, 40000),
    }
    answer = Answer()
    gone = asyncio.Event()
    sent_body = False

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if gone.is_set():
            raise OSError("the client hung up")
        if message["type"] == "http.response.start":
            answer.status = message["status"]
            answer.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        else:
            answer.body += message.get("body", b"")
            if not message.get("more_body"):
                gone.set()  # answered: the connection's receive() says so from now on
            elif hang_up_after_events is not None and answer.body.count(b"\n\n") >= hang_up_after_events:
                gone.set()

    await app(scope, receive, send)
    return answer
