"""Plain-text tables: the layout of every table qatcore prints (graphs, ``describe``,
statistics summaries, parity reports).

Columns are left-aligned and two spaces apart, each as wide as its widest cell; a rule
of dashes follows the header row; trailing spaces are stripped.

>>> print("\\n".join(text_table([["name", "op"], ["x", "input"], ["fc", "call_module"]])))
name  op
----  -----------
x     input
fc    call_module
"""

from __future__ import annotations

__all__ = ["text_table"]


def text_table(rows: list[list[str]]) -> list[str]:
    """The lines of a table whose first row is the header (rows of equal length)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines
