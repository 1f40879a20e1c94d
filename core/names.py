"""What a name may be: model names, node names and label keys/values, checked in one place.

Every name the API accepts (in a URL path or a body) is stored, compared byte for byte, shown in
the admin, written to logs and, for node names, sent back in a response header. So a name is
refused (a 400 ``validation_error`` naming the field) unless it is:

* a string of 1 to 255 characters (the columns' width; a label value may be empty);
* free of control characters (C0 ``U+0000-U+001F``, ``DEL``, C1 ``U+0080-U+009F``) and of lone
  surrogates: a CR/LF would split a header or a log line, a NUL is refused by PostgreSQL;
* without leading or trailing whitespace (``" llama"`` and ``"llama"`` would be two models);
  label values are exempt from this one rule, and may be empty.

Model names may contain slashes (``org/llama-3.1-8b.gguf``) and have one canonical form: no
leading or trailing slash, no empty segment (``a//b``) and no ``.`` or ``..`` segment. ``/a``,
``a/``, ``a/../b`` and ``../x`` are refused instead of becoming separate models that a proxy or
client library may normalise into each other.

The validators raise ``django.core.exceptions.ValidationError``: DRF fields take them as
``validators=[...]`` and ``core.problems`` answers them as 400 problems.
"""

from __future__ import annotations

import unicodedata

from django.core.exceptions import ValidationError

MAX_NAME_LENGTH = 255
# Characters no name may contain: Unicode's "Cc" (C0, DEL, C1) and "Cs" (lone surrogates).
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs"})
_DOT_SEGMENTS = frozenset({".", ".."})


def _forbidden_character(value: str) -> str | None:
    for character in value:
        if unicodedata.category(character) in _FORBIDDEN_CATEGORIES:
            return character
    return None


def name_errors(
    value, *, what: str, allow_empty: bool = False, trimmed: bool = True, max_length: int = MAX_NAME_LENGTH
) -> list[str]:
    """Why ``value`` is not an acceptable name (``what`` starts each message); [] when it is.
    ``trimmed``: leading or trailing whitespace is refused too."""
    if not isinstance(value, str):
        return [f"{what} must be a string."]
    if not value:
        return [] if allow_empty else [f"{what} must not be empty."]
    errors = []
    if len(value) > max_length:
        errors.append(f"{what} must be at most {max_length} characters.")
    bad = _forbidden_character(value)
    if bad is not None:
        errors.append(f"{what} must not contain control characters (found U+{ord(bad):04X}).")
    if trimmed and value != value.strip():
        errors.append(f"{what} must not start or end with whitespace.")
    return errors


def model_name_errors(value) -> list[str]:
    """``name_errors`` plus the canonical form of names with slashes."""
    errors = name_errors(value, what="Model name")
    if errors:
        return errors
    if value.startswith("/") or value.endswith("/"):
        errors.append("Model name must not start or end with '/'.")
    segments = value.split("/")
    if "" in segments[1:-1]:
        errors.append("Model name must not contain an empty path segment ('//').")
    if _DOT_SEGMENTS.intersection(segments):
        errors.append("Model name must not contain '.' or '..' path segments.")
    return errors


def validate_model_name(value) -> str:
    """A model name in its canonical form, else ValidationError."""
    errors = model_name_errors(value)
    if errors:
        raise ValidationError(errors, code="invalid_name")
    return value


def validate_node_name(value) -> str:
    errors = name_errors(value, what="Node name")
    if errors:
        raise ValidationError(errors, code="invalid_name")
    return value


def validate_label_key(value) -> str:
    errors = name_errors(value, what="Label key")
    if errors:
        raise ValidationError(errors, code="invalid_name")
    return value


def validate_label_value(value) -> str:
    """Label values may be empty and may carry inner whitespace; never control characters."""
    errors = name_errors(value, what="Label value", allow_empty=True, trimmed=False)
    if errors:
        raise ValidationError(errors, code="invalid_name")
    return value
