"""Tensor names -> array paths inside the store: reversible, and never outside the store.

A tensor name is arbitrary text from a checkpoint header. It becomes ONE
path component under ``tensors/``: every byte outside ``[A-Za-z0-9._-]`` is
percent-encoded (so ``/`` and ``\\`` cannot make a second component), and a
leading ``.`` or ``_`` is encoded too (``..`` cannot climb, ``__`` is
reserved by zarr, hidden files stay impossible). A name that would be a
file zarr itself writes in the parent group (``zarr.json``, in any letter
case, as a case-blind disk sees it) has its first character encoded too.
Names that still cannot be made safe (empty, not UTF-8, too long for a file
name) are refused; every refusal names the checkpoint file the name came from.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote

from pipeline.errors import PipelineError

SAFE = re.compile(r"[A-Za-z0-9._-]")
MAX_COMPONENT_BYTES = 200  # leaves room for zarr's own suffixes under the usual 255
RESERVED = frozenset({"zarr.json"})  # zarr's metadata file in the tensors/ group (casefolded)


def _preview(name: str) -> str:
    """A name short enough for a one-line error (repr escapes lone surrogates)."""
    return repr(name[:60]) + ("..." if len(name) > 60 else "")


def escape_name(name: str, source: str | Path | None = None) -> str:
    """The single safe path component for ``name`` (``unescape_name`` inverts it).

    ``source`` (the file the name came from) is named in the error when the
    name cannot be stored.
    """
    if not name:
        raise PipelineError("empty tensor name cannot be stored", source)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise PipelineError(f"tensor name {_preview(name)} is not valid UTF-8 (a lone "
                            "surrogate) and cannot be stored", source) from None
    out = []
    reserved = name.casefold() in RESERVED
    for i, ch in enumerate(name):
        if SAFE.fullmatch(ch) and not (i == 0 and (ch in "._" or reserved)):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    comp = "".join(out)
    if len(comp.encode()) > MAX_COMPONENT_BYTES:
        raise PipelineError(f"tensor name too long to store safely ({len(comp)} bytes escaped, "
                            f"at most {MAX_COMPONENT_BYTES}): {_preview(name)}", source)
    return comp


def unescape_name(component: str) -> str:
    """Inverse of ``escape_name``."""
    return unquote(component, encoding="utf-8", errors="surrogatepass")


def check_names(names: list[str],
                sources: Mapping[str, str | Path] | str | Path | None = None) -> dict[str, str]:
    """Escape every name; refuse two names that would share a path on a case-blind disk.

    ``sources`` is the file each name came from (a mapping), or one file or
    folder for all of them; errors name it.
    """
    def source(n: str) -> str | Path | None:
        return sources.get(n) if isinstance(sources, Mapping) else sources

    paths: dict[str, str] = {}
    seen: dict[str, str] = {}
    for n in names:
        comp = escape_name(n, source(n))
        key = comp.casefold()
        if key in seen:
            raise PipelineError(f"tensor names {_preview(seen[key])} and {_preview(n)} map to "
                                "the same array path on a case-insensitive file system",
                                source(n))
        seen[key] = n
        paths[n] = comp
    return paths
