"""The base app: problems, schema helpers, API-key authentication, tokens, logging, pagination.

It imports no other app of this project (``tests/test_layers.py``)."""
