"""Hostile requests for the property-based API fuzz: the input classes that found the issue-12
defects (numbers that overflow, deep nesting, huge strings, invalid UTF-8, wrong content types,
malformed names in paths), with the right credential, a wrong one, or none.

Used in process by ``tests/api/test_schemathesis.py`` and through the real web process by
``tests/security/test_http_edge.py``. Operations are read from the served OpenAPI schema, so a
new endpoint is fuzzed without touching this file.
"""

from __future__ import annotations

import json
import urllib.parse
import uuid
from dataclasses import dataclass

from hypothesis import strategies as st

HOSTILE_NUMBERS = [
    "1e999", "-1e999", "1e400", "-1e400", "1" + "0" * 400, "-" + "9" * 4400, "NaN", "Infinity", "-Infinity",
    str(2**63), str(2**64), str(10**40), str(-(10**40)), "1e308", "-0", "1e-999", "0.5", "-1",
]  # fmt: skip
NESTING_DEPTHS = [5000, 950, 100_000, 33]  # the first is what every run tries first
STRING_LENGTHS = [256, 513, 4096, 70_000]
HOSTILE_NAMES = [
    "../x", "a/../b", "/a", "a/", "a//b", ".", "..", " a", "a ", "a\r\nb", "a\x00b", "a\x85b", "a\x7f",
    "x" * 256, "x" * 3000, "日本/語-7b", "%FF%FE", "a%2F..%2Fb", "\ud800", "org/llama-3.1-8b.gguf",
]  # fmt: skip
CONTENT_TYPES = [
    "application/json", "application/json", "application/json", "application/json", "text/plain", "text/html", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz", "application/problem+json", "application/json; charset=utf-16",
    "application/json; charset=bogus", "application/xml", None,
]  # fmt: skip
# Mostly acceptable and the right credential, so that most requests reach the parser and the
# validators; the rest check that refusals come first and are problems too.
ACCEPTS = [None, None, None, None, "application/json", "*/*", "text/html", "application/xml"]
CREDENTIALS = ["right", "right", "right", "right", "wrong", "none", "garbage"]


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # template, e.g. /api/v1/models/{model}/route
    schemes: frozenset[str]
    fields: tuple[str, ...]  # top-level fields of its JSON body, if any

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"


def operations_of(schema: dict) -> list[Operation]:
    components = schema.get("components", {}).get("schemas", {})
    found = []
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if "$ref" in body:
                body = components.get(body["$ref"].rsplit("/", 1)[-1], {})
            schemes = frozenset(name for requirement in operation.get("security", []) for name in requirement)
            found.append(Operation(method.upper(), path, schemes, tuple(body.get("properties", {}))))
    return found


@dataclass
class HostileRequest:
    model: str
    body: bytes | None
    content_type: str | None
    credential: str  # right, wrong, none, garbage
    accept: str | None
    kind: str

    def __repr__(self) -> str:  # bodies may be a megabyte: keep failure reports readable
        body = None if self.body is None else self.body[:120] + (b"..." if len(self.body) > 120 else b"")
        return (
            f"HostileRequest(kind={self.kind!r}, model={self.model[:60]!r}, body={body!r} ({len(self.body or b'')} "
            f"bytes), content_type={self.content_type!r}, credential={self.credential!r}, accept={self.accept!r})"
        )

    def path(self, operation: Operation, values: dict[str, str], *, raw: bool = False) -> bytes:
        """The request target. ``raw``: the model name's non-ASCII characters unescaped (what
        only a real server receives); otherwise everything outside ASCII is percent-encoded."""
        model = self.model
        if raw:
            # Raw UTF-8 for printable characters; only what would break the request line escaped.
            encoded = "".join(
                c if c.isprintable() and c != " " else urllib.parse.quote(c, errors="surrogatepass") for c in model
            )
            model_bytes = encoded.encode("utf-8", "surrogatepass")
        else:
            model_bytes = urllib.parse.quote(model, safe="/%", errors="surrogatepass").encode("ascii")
        target = operation.path
        for name, value in values.items():
            target = target.replace("{" + name + "}", value)
        before, _, after = target.partition("{model}")
        if "{model}" not in operation.path:
            return target.encode("ascii")
        return before.encode("ascii") + model_bytes + after.encode("ascii")


def _json(document) -> bytes:
    return json.dumps(document, allow_nan=True).encode()


def _with_number(field: str, number: str, nested: bool) -> bytes:
    value = f'{{"k": {number}}}' if nested else number
    return f'{{"{field}": {value}}}'.encode()


def _nested(opener: str, depth: int, closed: bool) -> bytes:
    closer = {"[": "]", '{"a":': "}"}[opener]
    return (opener * depth + "1" + (closer * depth if closed else "")).encode()


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def body_kinds(fields: tuple[str, ...]) -> dict[str, st.SearchStrategy[bytes]]:
    """Body strategies by input class (every class is run against every operation)."""
    field = st.sampled_from(fields or ("name",))
    return {
        "number": st.builds(_with_number, field, st.sampled_from(HOSTILE_NUMBERS), st.booleans()),
        "nesting": st.builds(_nested, st.sampled_from(["[", '{"a":']), st.sampled_from(NESTING_DEPTHS), st.booleans()),
        "huge-string": st.builds(lambda f, n: _json({f: "x" * n}), field, st.sampled_from(STRING_LENGTHS)),
        "invalid-utf8": st.builds(lambda f: b'{"' + f.encode() + b'": "\xff\xfe\xc0\xaf"}', field),
        "surrogate": st.builds(lambda f: f'{{"{f}": "\\udc00"}}'.encode(), field),
        "random-json": st.one_of(
            st.builds(lambda f, v: _json({f: v}), field, json_values), st.builds(_json, json_values)
        ),
        "bytes": st.binary(max_size=64),
        "oversized": st.just(b'{"x": "' + b"y" * (1024 * 1024 + 16) + b'"}'),
        "no-body": st.none(),
    }


KINDS = (
    "number",
    "nesting",
    "huge-string",
    "invalid-utf8",
    "surrogate",
    "random-json",
    "bytes",
    "oversized",
    "no-body",
)


def hostile_requests(operation: Operation, kind: str) -> st.SearchStrategy[HostileRequest]:
    return st.builds(
        HostileRequest,
        model=st.sampled_from(HOSTILE_NAMES),
        body=body_kinds(operation.fields)[kind],
        content_type=st.sampled_from(CONTENT_TYPES),
        credential=st.sampled_from(CREDENTIALS),
        accept=st.sampled_from(ACCEPTS),
        kind=st.just(kind),
    )


def path_values(node_id: str) -> dict[str, str]:
    return {"node_id": node_id, "lease_id": str(uuid.uuid4()), "job_id": str(uuid.uuid4()), "key": "zone"}


def credential_for(
    request: HostileRequest, operation: Operation, *, api_key: str, node_token: str, registration_token: str
) -> str | None:
    """The Authorization header value for the request's credential mode."""
    if request.credential == "none":
        return None
    if request.credential == "garbage":
        return "Bearer \x7f\x01" if operation.method == "GET" else "Basic Zm9vOmJhcg=="
    if "NodeToken" in operation.schemes:
        right, wrong = node_token, api_key
    elif "RegistrationToken" in operation.schemes:
        right, wrong = registration_token, node_token
    else:
        right, wrong = api_key, registration_token
    return f"Bearer {right if request.credential == 'right' else wrong}"


def is_retry_later(status: int, headers: dict[str, str], body: bytes) -> bool:
    """A documented 503 with Retry-After (a model no node can serve yet) is back-pressure, not a
    crash; ``database_unavailable`` is a failure here, the database is up."""
    if status != 503 or "retry-after" not in {name.lower() for name in headers}:
        return False
    try:
        return json.loads(body).get("code") != "database_unavailable"
    except ValueError:
        return False
