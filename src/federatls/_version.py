"""The version of federatls (one place)."""

__version__ = "0.1.0"
