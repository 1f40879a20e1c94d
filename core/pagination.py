"""Pagination of every list endpoint: ``?limit=&offset=``, answered as
``{count, next, previous, results}``. Lists are ordered by a unique key so pages are stable.

Unlike DRF's default, a malformed or out-of-range ``limit``/``offset`` is a 400 problem rather
than silently replaced by the default: a client that asks for page 3 and gets page 1 has a bug
it cannot see.
"""

from rest_framework.exceptions import ValidationError
from rest_framework.pagination import LimitOffsetPagination

MAX_OFFSET = 2**31 - 1


class LimitOffset(LimitOffsetPagination):
    default_limit = 100
    max_limit = 1000

    def get_limit(self, request):
        return self._read(
            request, self.limit_query_param, minimum=1, maximum=self.max_limit, default=self.default_limit
        )

    def get_offset(self, request):
        return self._read(request, self.offset_query_param, minimum=0, maximum=MAX_OFFSET, default=0)

    @staticmethod
    def _read(request, name: str, *, minimum: int, maximum: int, default: int) -> int:
        values = request.query_params.getlist(name)
        if not values:
            return default
        if len(values) > 1:
            raise ValidationError({name: ["Give this parameter at most once."]})
        raw = values[0]
        # The length check first: int() of thousands of digits is slow, then a ValueError.
        if len(raw) > len(str(maximum)) or not (raw.isascii() and raw.isdigit()) or not minimum <= int(raw) <= maximum:
            raise ValidationError({name: [f"Must be an integer from {minimum} to {maximum}."]})
        return int(raw)

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        bounds = {
            self.limit_query_param: {"minimum": 1, "maximum": self.max_limit, "default": self.default_limit},
            self.offset_query_param: {"minimum": 0, "maximum": MAX_OFFSET, "default": 0},
        }
        for parameter in parameters:
            parameter["schema"].update(bounds.get(parameter["name"], {}))
        return parameters
