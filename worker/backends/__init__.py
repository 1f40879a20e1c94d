"""Backends shipped with the worker. ``echo`` is always available to ``StartBackend``."""
