"""A faithful fake of the Exlogare Read API v1: many tenants, seeded history, faults, a control API.

Used by the exporter's demo mode, its integration and fault-injection tests, and benchmarks. Only the
standard library. Run it with `python -m exlogare_exporter.simulator --help`.
"""

from __future__ import annotations

from ..apirules import SEVERITIES, ApiError
from .app import WSGIApp, make_app
from .core import Fault, Reply, RequestRecord, Simulator
from .server import DEMO_TENANTS, Arrivals, SimulatorServer, demo_simulator, main

__all__ = [
    "DEMO_TENANTS", "SEVERITIES", "ApiError", "Arrivals", "Fault", "Reply", "RequestRecord", "Simulator",
    "SimulatorServer", "WSGIApp", "demo_simulator", "main", "make_app",
]
