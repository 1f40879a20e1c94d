"""Control-plane project package: settings, URLs, WSGI/ASGI and the wiring of the apps."""
