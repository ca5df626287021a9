"""Tables that long-running suites (faults, soak) print at the end of the pytest run."""

from __future__ import annotations

TABLES: list[tuple[str, list[str]]] = []


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, the same text the README carries."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def add_table(title: str, lines: list[str]) -> None:
    TABLES.append((title, lines))
