"""The level-triggered reconciler that keeps every model at its desired replica count."""
