"""Assertions shared by the API tests."""

PROBLEM = "application/problem+json"


def assert_problem(response, status: int, code: str | None = None) -> dict:
    """The response is an RFC 9457 problem of ``status`` (and ``code``); returns its body."""
    assert response.status_code == status, (response.status_code, getattr(response, "content", b"")[:500])
    assert response["Content-Type"].startswith(PROBLEM), response["Content-Type"]
    body = response.json()
    assert set(body) >= {"type", "title", "status", "detail", "code"}, body
    assert body["status"] == status
    assert body["type"] == f"urn:controlplane:problem:{body['code']}"
    if code is not None:
        assert body["code"] == code, body
    return body


def bearer(token: str) -> dict:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}
