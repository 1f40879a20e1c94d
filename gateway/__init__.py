"""The OpenAI-compatible gateway: an ASGI app (``gateway.asgi:application``, served by uvicorn
through ``manage.py gateway``) that answers ``/v1/models``, ``/v1/chat/completions``,
``/v1/completions`` and ``/v1/embeddings`` by routing each request through the registry (a lease
per request) to a replica's LocalAI backend over gRPC. See docs/gateway.md.
"""
