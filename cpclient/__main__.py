"""``python -m cpclient``: the operator CLI (``cpclient.cli``)."""

from .cli import main

raise SystemExit(main())
