"""Prints the tables of the fault and soak suites (tests/reporting.py) in pytest's terminal summary."""

from __future__ import annotations

from typing import Any

from tests.reporting import TABLES


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for title, lines in TABLES:
        terminalreporter.section(title)
        for line in lines:
            terminalreporter.write_line(line)
