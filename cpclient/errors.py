"""Exceptions of the client. Every HTTP error carries the problem document's ``code``."""

from __future__ import annotations

from typing import Any


class ControlPlaneError(Exception):
    """An error answer of the control plane (an RFC 9457 problem document).

    ``status``: the HTTP status; ``code``: the problem's stable ``code`` (``"no_load_info"``,
    ``"all_replicas_busy"``, ...); ``problem``: the whole document (``{}`` when the body was
    not a problem); ``retry_after``: seconds from ``Retry-After``, when sent."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str = "",
        *,
        problem: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        self.problem = problem or {}
        self.retry_after = retry_after
        super().__init__(f"{status} {code}: {detail}" if detail else f"{status} {code}")


class ValidationError(ControlPlaneError):
    """400: the request was malformed (``problem["errors"]`` maps fields to messages)."""


class AuthenticationError(ControlPlaneError):
    """401: no, or an invalid, API key."""


class PermissionError_(ControlPlaneError):  # noqa: N801 - the builtin name is taken
    """403: the key's role may not do this."""


class NotFoundError(ControlPlaneError):
    """404: no such model, lease, load job or load info."""


class ConflictError(ControlPlaneError):
    """409: e.g. ``lease_released``, ``no_capacity``, ``all_replicas_busy``."""


class UnavailableError(ControlPlaneError):
    """503 after the retries ran out (``database_unavailable``, ``load_in_progress``, ...)."""


class LoadFailed(ControlPlaneError):
    """The cold-load job of a route call failed; ``code`` is the job's ``error_code``."""


class DeadlineExceeded(ControlPlaneError, TimeoutError):
    """No lease (or answer) before the call's deadline; ``last`` is the last error seen."""

    def __init__(self, detail: str, *, last: Exception | None = None) -> None:
        super().__init__(0, "deadline_exceeded", detail)
        self.last = last


class TransportError(ControlPlaneError, OSError):
    """The control plane could not be reached (connection refused, reset, timeout)."""

    def __init__(self, detail: str) -> None:
        super().__init__(0, "transport_error", detail)


_BY_STATUS: dict[int, type[ControlPlaneError]] = {
    400: ValidationError,
    401: AuthenticationError,
    403: PermissionError_,
    404: NotFoundError,
    409: ConflictError,
    503: UnavailableError,
}


def error_for(status: int, problem: dict[str, Any], retry_after: float | None) -> ControlPlaneError:
    cls = _BY_STATUS.get(status, ControlPlaneError)
    code = str(problem.get("code") or f"http_{status}")
    return cls(status, code, str(problem.get("detail") or ""), problem=problem, retry_after=retry_after)
