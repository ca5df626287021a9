"""Prometheus exporter and read-only caching proxy for the Exlogare Read API v1."""

__version__ = "0.1.0"
