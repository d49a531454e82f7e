"""jeplb's implementation. Private: the public names are those of `jeplb/__init__.py`."""
