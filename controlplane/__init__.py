"""Project package: settings, root URLs, WSGI/ASGI entry points, authentication and health views."""
