"""Markdown tables for reports (samples.md, evaluation tables): one place that escapes cells.

Generated text holds pipes and newlines; unescaped, one reply would break a table into several rows.
"""

from __future__ import annotations

from collections.abc import Sequence


def cell(text: object) -> str:
    return ("" if text is None else str(text)).replace("|", "\\|").replace("\n", "<br>")


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """The lines of a markdown table; every cell escaped so each row stays one row."""
    return ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(c) for c in row) + " |" for row in rows)]
