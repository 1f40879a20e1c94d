"""WSGI entry point (gunicorn controlplane.wsgi).

Refuses to load (ImproperlyConfigured) without a registration token unless open registration is
explicitly allowed: see ``core.checks``. ``RequestPathGuard`` undoes gunicorn's
re-encoding of raw UTF-8 bytes in the request path and marks paths that are not UTF-8
(``controlplane.httpserver``). ``HeartbeatLeanPath`` answers an ordinary node heartbeat
without Django's request cycle and hands every other request to it
(``registry/api/heartbeat.py``); ``LeanRoutePath`` does the same for a warm route and a
release (``registry/api/lean_route.py``).
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

from controlplane.httpserver import served_application  # noqa: E402

application = served_application(get_wsgi_application())

from core.checks import require_serving_configuration  # noqa: E402  (needs settings loaded)

require_serving_configuration()
