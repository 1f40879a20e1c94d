"""Request parsers of the API."""

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser
from rest_framework.utils import json


class StrictJSONParser(JSONParser):
    """JSON whose strings can be stored: lone UTF-16 surrogates (``"\\ud800"`` is valid JSON but
    not valid Unicode text) are refused with a 400 instead of failing later in the database
    driver. NaN/Infinity are already refused (``STRICT_JSON``)."""

    def parse(self, stream, media_type=None, parser_context=None):
        data = super().parse(stream, media_type, parser_context)
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ParseError("JSON parse error - strings must be valid Unicode (lone surrogate)") from exc
        return data
