"""URL converters of the registry API."""

from django.urls import register_converter


class ModelNameConverter:
    """A model name in a path: any non-empty text, slashes included, and unlike Django's
    ``path`` converter also line breaks, so that every malformed name reaches the view and is
    answered by the name validator (a 400 naming ``model``) rather than by a 404 for a path no
    route matched."""

    regex = r"[\s\S]+"

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value


register_converter(ModelNameConverter, "model_name")
