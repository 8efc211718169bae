"""What the terminal shows: aligned tables and progress bars (users look before they read).

Every long job takes its bar from ``progress_bar`` so they all look and
behave alike: off when ``enabled`` is False (tests, nested jobs), cleared
when done, bytes shown with SI prefixes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

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


def progress_bar(total: float | None = None, desc: str = "", *, unit: str = "it",
                 enabled: bool = True, iterable: Iterable[Any] | None = None) -> Any:
    """A tqdm bar (a context manager; iterate it when ``iterable`` is given).

    ``unit="B"`` scales to kB/MB/GB. Bars go to stderr and are left off the
    screen when finished, so the tables that follow stay readable.
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit == "B",
                disable=not enabled, leave=False)
