"""OpenAPI (drf-spectacular) glue: security schemes and problem responses.

- One security scheme per authentication class: ``ApiKey``, ``NodeToken``,
  ``RegistrationToken`` (all HTTP bearer) and ``session`` (staff cookie).
- ``ProblemAutoSchema`` (``REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"]``) adds the errors every
  operation can answer as ``application/problem+json``: 401/403 when it needs credentials,
  400/404 when its path has parameters, 400/413/415 when it takes a body, 400 when it is
  paginated, 503 always. Endpoint-specific
  problems are declared with ``problems()``::

      @extend_schema(responses={200: LoadInfoSerializer, **problems(404, 409)})
"""

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiResponse
from rest_framework.permissions import AllowAny

from core.problems import PROBLEM_CONTENT_TYPE
from core.serializers import ProblemSerializer

PROBLEM_DESCRIPTIONS = {
    400: "Invalid request (`validation_error` with `errors`: field -> messages, `parse_error`, or `invalid_path`)",
    401: "No credential (`not_authenticated`) or a wrong, unknown or revoked one (`invalid_token`)",
    403: "Valid credential without the right (`permission_denied`, `node_token_mismatch`)",
    404: "No such resource (`not_found`)",
    409: "Conflict with the current state or a concurrent change (`conflict`, `invalid_transition`)",
    413: "Request body too large (`payload_too_large`)",
    415: "Request body is not JSON (`unsupported_media_type`)",
    503: "Database unavailable (`database_unavailable`); retry after `Retry-After` seconds",
}

_BODY_METHODS = ("POST", "PUT", "PATCH")


def problems(*statuses: int, **descriptions: str) -> dict:
    """``extend_schema(responses=...)`` entries for problem answers, e.g. ``problems(404, 409)``;
    pass ``description_404="..."`` to say more than the generic text."""
    return {
        (status, PROBLEM_CONTENT_TYPE): OpenApiResponse(
            ProblemSerializer,
            description=descriptions.get(f"description_{status}", PROBLEM_DESCRIPTIONS.get(status, "")),
        )
        for status in statuses
    }


class ProblemAutoSchema(AutoSchema):
    def _default_problem_statuses(self) -> list[int]:
        statuses = [503]
        permissions = self.view.get_permissions() if hasattr(self.view, "get_permissions") else []
        if any(not isinstance(permission, AllowAny) for permission in permissions):
            statuses += [401, 403]
        if "{" in self.path:
            # 400: a path parameter that is not a valid name, or not UTF-8 (`invalid_path`).
            statuses += [400, 404]
        if self.method in _BODY_METHODS and self.get_request_serializer() is not None:
            statuses += [400, 413, 415]
        elif self._is_list_view() and self._get_paginator() is not None:
            statuses.append(400)  # malformed limit/offset
        return sorted(set(statuses))

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        for status in self._default_problem_statuses():
            key = str(status)
            if key in responses:
                continue
            response = self._get_response_for_code(ProblemSerializer, key, (PROBLEM_CONTENT_TYPE,), direction)
            response["description"] = PROBLEM_DESCRIPTIONS[status]
            responses[key] = response
        return dict(sorted(responses.items()))


class _BearerScheme(OpenApiAuthenticationExtension):
    description = ""
    bearer_format = ""

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "bearerFormat": self.bearer_format, "description": self.description}


class ApiKeyScheme(_BearerScheme):
    target_class = "core.auth.ApiKeyAuthentication"
    name = "ApiKey"
    bearer_format = "cpk_..."
    description = (
        "API key of role `frontend` or `operator` (`manage.py create_api_key NAME --role ROLE`), "
        "sent as `Authorization: Bearer cpk_...`."
    )


class NodeTokenScheme(_BearerScheme):
    target_class = "registry.api.auth.NodeTokenAuthentication"
    name = "NodeToken"
    bearer_format = "cpn_..."
    description = (
        "Per-node token returned by `POST /api/node/register` as `node_token`; valid only for "
        "`/api/node/{its id}/...` (another node's token: 403 `node_token_mismatch`)."
    )


class RegistrationTokenScheme(_BearerScheme):
    target_class = "registry.api.auth.RegistrationTokenAuthentication"
    name = "RegistrationToken"
    bearer_format = "opaque"
    description = (
        "The fleet's registration token (CONTROLPLANE_REGISTRATION_TOKEN); the body field `token` "
        "is accepted too. Not needed when open registration is allowed and no token is configured."
    )


class StaffSessionScheme(OpenApiAuthenticationExtension):
    target_class = "rest_framework.authentication.SessionAuthentication"
    name = "session"
    priority = 1  # replaces drf-spectacular's built-in "cookieAuth"

    def get_security_definition(self, auto_schema):
        from django.conf import settings

        return {
            "type": "apiKey",
            "in": "cookie",
            "name": settings.SESSION_COOKIE_NAME,
            "description": "Django admin session of a staff user; unsafe methods need the CSRF token.",
        }
