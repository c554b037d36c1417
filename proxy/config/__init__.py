"""The config tree (settings.py) and its loading; value types live in proxy.schema."""
