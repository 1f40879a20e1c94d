"""Request parsers of the API.

``StrictJSONParser`` is the only parser (``REST_FRAMEWORK["DEFAULT_PARSER_CLASSES"]``). It runs
on attacker input before authentication (``POST /api/node/register`` reads its body to find
LocalAI's ``token`` field), so every way a body can be wrong is a 400 ``parse_error`` (or a 413
``payload_too_large``), decided before anything recursive or numeric touches the data:

* bodies over ``DATA_UPLOAD_MAX_MEMORY_SIZE`` (1 MiB by default) are refused unread;
* text that is not valid in its charset (UTF-8 unless the request says otherwise);
* arrays and objects nested deeper than ``MAX_JSON_DEPTH`` (32), measured by a linear scan of
  the text before parsing (Python's ``json`` recurses once per level);
* numbers that are not finite doubles: ``NaN``/``Infinity``, floats that overflow to infinity
  (``1e999``) and integers beyond the double range (``1`` followed by 400 zeros) -- those would
  otherwise reach ``int()``/``float()`` conversions as ``inf`` or overflow them. Integers within
  range but too large for a field (``10**40``) are that field's 400 ``validation_error``: every
  integer field of the API is bounded by its column (``StrictIntegerField(max_value=...)``);
* lone UTF-16 surrogates (``"\\ud800"`` is valid JSON but not storable Unicode text).
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

MAX_JSON_DEPTH = 32

_ESCAPE_PAIR = re.compile(r"\\.", re.DOTALL)
_STRING = re.compile(r'"[^"]*"')
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def nesting_depth(text: str) -> int:
    """How deeply arrays and objects nest in JSON ``text``; linear time, no recursion.

    Escape pairs are dropped first (left to right, as JSON reads them, so ``\\"`` and ``\\\\``
    never end or start a string), then whole strings, so only the structural brackets remain.
    Malformed text may be over-counted, never under-counted: it fails to parse anyway.
    """
    brackets = _NOT_A_BRACKET.sub("", _STRING.sub("", _ESCAPE_PAIR.sub("", text)))
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"number {literal[:40]} is out of range")
    return value


def _bounded_int(literal: str) -> int:
    # Python refuses integers of more than 4300 digits itself (ValueError). Beyond the range of a
    # double, a number cannot be exchanged as JSON (RFC 8259, section 6) and would overflow a
    # float conversion; within it, each field's own bounds decide (a 400 naming the field).
    value = int(literal)
    try:
        float(value)
    except OverflowError:
        raise ValueError(f"integer {literal[:40]}... is out of range") from None
    return value


def loads_strict(text: str):
    """``json.loads`` with the bounds above; ValueError for anything refused."""
    # Fewer brackets than the limit cannot nest too deep: ordinary bodies skip the scan.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and nesting_depth(text) > MAX_JSON_DEPTH:
        raise ValueError(f"arrays and objects nest deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError as exc:  # unreachable after the depth check; never a 500 either way
        raise ValueError("nesting too deep") from exc
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("strings must be valid Unicode (lone surrogate)") from exc
    return data


class StrictJSONParser(JSONParser):
    """JSON bodies within the bounds of this module's docstring; 400 ``parse_error`` otherwise."""

    def parse(self, stream, media_type=None, parser_context=None):
        parser_context = parser_context or {}
        encoding = parser_context.get("encoding", settings.DEFAULT_CHARSET)
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        raw = stream.read() if limit is None else stream.read(limit + 1)
        if limit is not None and len(raw) > limit:
            raise RequestDataTooBig("Request body exceeded settings.DATA_UPLOAD_MAX_MEMORY_SIZE.")
        try:
            return loads_strict(raw.decode(encoding))
        except (ValueError, LookupError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ParseError(f"JSON parse error - {exc}") from None
