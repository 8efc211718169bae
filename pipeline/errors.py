"""One exception type for every user-facing failure.

The CLI turns a ``PipelineError`` into a single line on stderr and a non-zero
exit code, so every message must name the file (or store) and the problem on
one line. Anything else escaping is a bug in this package, not bad input.
"""

from __future__ import annotations

from pathlib import Path


class PipelineError(Exception):
    """A problem with the user's input or environment, reported as one line."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        text = f"{self.path}: {message}" if self.path else message
        super().__init__(" ".join(text.split()))  # always one line
