"""ASGI entry point.

Refuses to load (ImproperlyConfigured) without a registration token unless open registration is
explicitly allowed: see ``core.checks``.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

application = get_asgi_application()

from core.checks import require_serving_configuration  # noqa: E402  (needs settings loaded)

require_serving_configuration()
