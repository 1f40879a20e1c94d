"""A real web process for the input-hardening tests, and a raw HTTP client for it.

The defects these tests pin live in parsing, headers and process handling, so they go through
gunicorn started exactly as in production (``gunicorn -c controlplane/gunicorn.conf.py``), on a
fresh database of the lane (PostgreSQL: a new database on the lane's server; SQLite: a file).
The client writes bytes on a socket, so requests that ``http.client`` would refuse to send
(raw UTF-8 in the path, 10,000-character request lines, broken headers) can be sent, and a
connection reset is reported as such instead of as an HTTP status.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.harness import TOKEN, Fleet, free_port, wait_for

REGISTRATION_TOKEN = TOKEN


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)

    def problem(self) -> dict:
        assert self.headers.get("content-type") == "application/problem+json", (self.status, self.headers, self.body)
        document = self.json()
        assert document["status"] == self.status and document["code"], document
        return document


class ConnectionReset(AssertionError):
    """The server reset the connection instead of answering."""


def send(port: int, request: bytes, *, timeout: float = 15) -> Answer:
    """Send raw request bytes (the request must ask for ``Connection: close``) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early and stopped reading: the answer may still be there
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError as exc:
            if not chunks:
                raise ConnectionReset("connection reset before any answer") from exc
    raw = b"".join(chunks)
    if not raw:
        raise ConnectionReset("connection closed without an answer")
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return Answer(int(status_line.split()[1]), headers, body)


def _dechunk(body: bytes) -> bytes:
    decoded = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        decoded, body = decoded + body[:size], body[size + 2 :]
    return decoded


def build_request(
    method: str, target: bytes | str, *, body: bytes | None = None, headers: dict[str, str] | None = None
) -> bytes:
    target = target if isinstance(target, bytes) else target.encode("ascii")
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Connection: close"]
    all_headers = {"Host": "127.0.0.1", **(headers or {})}
    if body is not None:
        all_headers.setdefault("Content-Type", "application/json")
        all_headers["Content-Length"] = str(len(body))
    lines += [f"{name}: {value}".encode("latin-1") for name, value in all_headers.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


@dataclass
class EdgeServer(Fleet):
    """``tests.e2e.harness.Fleet`` reduced to one web process, on either lane's database."""

    sqlite_path: str = ""
    log_offset: int = 0
    extra_env: dict = field(default_factory=dict)

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.sqlite_path}" if self.sqlite_path else super().database_url

    def prepare(self) -> None:
        if self.sqlite_path:
            self.manage("migrate_locked", "-v", "0")
            self.api_key = self.manage("create_api_key", "edge-operator", "--role", "operator").strip()
        else:
            self.create_database()

    def start(self) -> None:
        self.web_port = free_port()
        self.spawn(
            "web",
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                "controlplane/gunicorn.conf.py",
                "--bind",
                f"127.0.0.1:{self.web_port}",
                "--workers",
                "1",
            ],
        )
        wait_for(lambda: self._answers("/livez"), timeout=60, what="web up")

    @property
    def web_log(self) -> str:
        return self.processes[0].log() if self.processes else ""

    def mark_log(self) -> None:
        self.log_offset = len(self.web_log)

    def log_since_mark(self) -> str:
        time.sleep(0.2)  # the worker writes its log line right after the answer
        return self.web_log[self.log_offset :]

    def request(
        self,
        method: str,
        target: bytes | str,
        *,
        body: bytes | None = None,
        json_body=None,
        credential: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        all_headers = dict(headers or {})
        if credential is not None:
            all_headers["Authorization"] = f"Bearer {credential}"
        if json_body is not None:
            body = json.dumps(json_body).encode()
        return send(self.web_port, build_request(method, target, body=body, headers=all_headers))


def start_edge_server(workdir: Path, database: dict, **env) -> EdgeServer:
    (workdir / "var").mkdir(exist_ok=True)
    sqlite_path = "" if database["ENGINE"].endswith("postgresql") else str(workdir / "edge.sqlite3")
    server = EdgeServer(admin_url=database, workdir=workdir, settings_env=env, sqlite_path=sqlite_path)
    try:
        server.prepare()
        server.start()
    except BaseException:
        server.close()
        raise
    return server
