"""The router of every API URL: DRF's ``SimpleRouter`` with this API's three rules.

1. No trailing slash, and ``path()`` converters: a viewset names its lookup's converter in
   ``lookup_value_converter`` (``uuid``, or ``model_name`` for model names, which may contain
   slashes and dots: ``org/llama-3.1-8b.gguf``).
2. Sub-resources before details: every route of the form ``{prefix}/{lookup}/{action}``, of
   whichever registered viewset, is tried before any plain detail route ``{prefix}/{lookup}``.
   So ``models/org/llama/route`` is the route call of model ``org/llama``, never the status of
   a model named ``org/llama/route``: a model whose name ends in ``/route``, ``/scheduling`` or
   ``/load-info`` has no status URL of its own (its sub-resources still work:
   ``models/x/route/route``). Several viewsets may share a prefix (``models``: the registry's
   sub-resources and the reconciler's status).
3. Published URL names stay: ``{basename}-list``, ``{basename}-detail`` and
   ``{basename}-{action url_name}`` as in DRF, unless a registration renames its list or detail
   route (``list_name=``, ``detail_name=``); a name used twice is a configuration error.
"""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured
from django.urls import register_converter
from rest_framework.routers import Route, SimpleRouter


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


class ApiRouter(SimpleRouter):
    def __init__(self):
        super().__init__(trailing_slash=False, use_regex_path=False)
        self._renames: dict[int, dict[str, str]] = {}

    def register(self, prefix, viewset, basename, *, list_name: str | None = None, detail_name: str | None = None):
        # Not DRF's: its one-viewset-per-basename check would keep ``models`` in two viewsets
        # from sharing the ``model-`` names; get_urls checks the names themselves instead.
        self.registry.append((prefix, viewset, basename))
        self._renames[len(self.registry) - 1] = {
            name: rename
            for name, rename in ((f"{basename}-list", list_name), (f"{basename}-detail", detail_name))
            if rename
        }
        if hasattr(self, "_urls"):
            del self._urls

    def get_urls(self):
        plain_detail = next(route for route in self.routes if isinstance(route, Route) and route.detail)
        first, last, names = [], [], set()
        for index, (prefix, viewset, basename) in enumerate(self.registry):
            lookup = self.get_lookup_regex(viewset)
            for route in self.get_routes(viewset):
                mapping = self.get_method_map(viewset, route.mapping)
                if not mapping:
                    continue
                url = route.url.format(prefix=prefix, lookup=lookup, trailing_slash=self.trailing_slash).lstrip("/")
                name = route.name.format(basename=basename)
                name = self._renames[index].get(name, name)
                if name in names:
                    raise ImproperlyConfigured(f"URL name {name!r} is routed twice")
                names.add(name)
                initkwargs = {**route.initkwargs, "basename": basename, "detail": route.detail}
                pattern = self._url_conf(url, viewset.as_view(mapping, **initkwargs), name=name)
                (last if route is plain_detail else first).append(pattern)
        return first + last
