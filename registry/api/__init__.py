"""REST API of the fleet registry: thin views over the registry verbs (``registry.managers``).

Routed by ``controlplane/urls.py`` (``routers.ApiRouter``): ``/api/node/`` worker-facing (node tokens),
``/api/v1/`` frontends and operators (API keys).
"""
