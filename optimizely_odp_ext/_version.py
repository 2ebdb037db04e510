"""The single source of this package's version (read by setup.cfg too)."""

__version__ = "0.1.0"
