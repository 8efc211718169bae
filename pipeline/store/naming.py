"""Tensor names -> array paths inside the store: reversible, and never outside the store.

A tensor name is arbitrary text from a checkpoint header. It becomes ONE
path component under ``tensors/``: every byte outside ``[A-Za-z0-9._-]`` is
percent-encoded (so ``/`` and ``\\`` cannot make a second component), and a
leading ``.`` or ``_`` is encoded too (``..`` cannot climb, ``__`` is
reserved by zarr, hidden files stay impossible). Names that still cannot be
made safe (empty, or too long for a file name) are refused.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from pipeline.errors import PipelineError

SAFE = re.compile(r"[A-Za-z0-9._-]")
MAX_COMPONENT_BYTES = 200  # leaves room for zarr's own suffixes under the usual 255


def escape_name(name: str) -> str:
    """The single safe path component for ``name`` (``unescape_name`` inverts it)."""
    if not name:
        raise PipelineError("empty tensor name cannot be stored")
    out = []
    for i, ch in enumerate(name):
        if SAFE.fullmatch(ch) and not (i == 0 and ch in "._"):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    comp = "".join(out)
    if len(comp.encode()) > MAX_COMPONENT_BYTES:
        raise PipelineError(f"tensor name too long to store safely ({len(comp)} bytes escaped): "
                            f"{name[:60]!r}...")
    return comp


def unescape_name(component: str) -> str:
    """Inverse of ``escape_name``."""
    return unquote(component, encoding="utf-8", errors="surrogatepass")


def check_names(names: list[str]) -> dict[str, str]:
    """Escape every name; refuse two names that would share a path on a case-blind disk."""
    paths: dict[str, str] = {}
    seen: dict[str, str] = {}
    for n in names:
        comp = escape_name(n)
        key = comp.casefold()
        if key in seen:
            raise PipelineError(f"tensor names {seen[key]!r} and {n!r} map to the same "
                                "array path on a case-insensitive file system")
        seen[key] = n
        paths[n] = comp
    return paths
