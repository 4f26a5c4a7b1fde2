"""Plain-text tables for terminals and reports: one formatter for every table the library prints.

Example:
    >>> print(text_table(["layer", "ms"], [["fc1", "1.25"], ["out", "10.5"]], right=True))
    layer    ms
    fc1    1.25
    out    10.5
"""
from __future__ import annotations

from collections.abc import Sequence


def text_table(headers: Sequence[object], rows: Sequence[Sequence[object]], *, right: bool = False) -> str:
    """Columns two spaces apart, each as wide as its longest cell; left-aligned, or with ``right`` every column
    after the first right-aligned (numbers). Trailing spaces are dropped."""
    table = [[str(c) for c in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in table if i < len(row)) for i in range(len(table[0]))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if right and i else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join(line(row) for row in table)
