"""REST API of the fleet registry: thin views over the registry verbs (``registry.managers``).

``urls.node_urlpatterns`` is mounted at ``/api/node/`` (worker-facing, node tokens);
``urls.urlpatterns`` at ``/api/v1/`` (frontends and operators, API keys).
"""
