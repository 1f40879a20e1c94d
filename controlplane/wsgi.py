"""WSGI entry point (gunicorn controlplane.wsgi).

Refuses to load (ImproperlyConfigured) without a registration token unless open registration is
explicitly allowed: see ``controlplane.checks``.
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

application = get_wsgi_application()

from controlplane.checks import require_serving_configuration  # noqa: E402  (needs settings loaded)

require_serving_configuration()
