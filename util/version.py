"""The qtc version: recorded in every compiled model's provenance."""

__version__ = "0.1.0"
