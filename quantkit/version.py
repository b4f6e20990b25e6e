"""The package version (a module of its own: quantkit/__init__.py imports the API, which needs it)."""

__version__ = "0.1.0"
