"""gdlab's version, importable without the package face (gdlab/__init__.py) or anything heavy."""

__version__ = "0.1.0"
