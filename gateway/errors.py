"""The gateway's errors, in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``.

OpenAI's clients read ``error.message`` and ``error.code`` and pick their exception class by the
HTTP status (``openai.AuthenticationError`` for 401, ``NotFoundError`` for 404, ...), so each
error here is a status, a ``type`` (OpenAI's words: ``invalid_request_error``,
``authentication_error``, ``server_error``, ...) and a stable ``code``. docs/gateway.md lists them.
"""

from __future__ import annotations


class GatewayError(Exception):
    """An answer other than 200: ``status``, OpenAI ``type``, stable ``code``, a message for
    people, the request field at fault (``param``) and extra headers (``Retry-After``)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, *, param: str | None = None, code: str = "invalid_value") -> GatewayError:
    """400: the request body is not what the endpoint takes."""
    return GatewayError(400, message, code=code, param=param)


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model `{model}` does not exist: it has no load info and no loaded replica.",
        code="model_not_found",
        param="model",
    )


def unavailable(message: str, *, code: str, retry_after: int) -> GatewayError:
    """503 with ``Retry-After``: no replica can serve now (cold load not done, no capacity)."""
    return GatewayError(503, message, type="server_error", code=code, headers={"Retry-After": str(int(retry_after))})


def backend_failed(message: str, *, code: str = "backend_error") -> GatewayError:
    """502: the replica's backend answered the call with an error (its message is passed on)."""
    return GatewayError(502, message, type="server_error", code=code)
