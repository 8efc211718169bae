"""Terminal tables: users look before they read, so results come as aligned tables."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

from rich.console import Console
from rich.table import Table

# Tables are wider than 80 columns; when the output is not a terminal (a log, CI)
# keep them readable instead of truncating cells.
console = Console(width=None if sys.stdout.isatty() else 140)


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Print rows under a title; numbers are right-aligned, floats to 3 decimals."""
    table = Table(title=title, title_justify="left")
    rows = [list(r) for r in rows]
    for i, col in enumerate(columns):
        numeric = bool(rows) and all(isinstance(r[i], int | float) for r in rows)
        table.add_column(col, justify="right" if numeric else "left")
    for r in rows:
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r))
    console.print(table)
