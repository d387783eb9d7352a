"""The built-in decoders. Each module is a plugin shaped exactly like a user's:
imports from ``peftgen``, one class, one ``@hookimpl``. ``peftgen.plugins``
registers them through the same call that loads installed plugins."""
