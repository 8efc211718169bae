"""JSONL records: prompts in, probes and per-sample results out.

Every file the output-space commands read or write is JSON Lines, so a user
can ``head`` it and a crashed job leaves whole lines behind. Reading names
the file and line of the first bad record; appending flushes each line to
disk, and a resumed job drops a torn last line instead of choking on it.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

Fields = Mapping[str, type | tuple[type, ...]]


def _check(rec: Any, required: Fields, optional: Fields, where: str) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise PipelineError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for name, kind in {**required, **optional}.items():
        if name not in rec:
            if name in required:
                raise PipelineError(f"{where}: missing field {name!r}")
            continue
        value = rec[name]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise PipelineError(f"{where}: field {name!r} must be {_kind(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise PipelineError(f"{where}: field {name!r} must be {_kind(kind)}, "
                                f"got {type(value).__name__}")
    return rec


def _kind(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def iter_jsonl(path: str | Path, required: Fields, optional: Fields | None = None,
               ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line, each checked against the fields."""
    path = Path(path)
    try:
        fh = open(path, encoding="utf-8")
    except OSError as e:
        raise PipelineError(f"cannot read: {e.strerror or e}", path) from None
    with fh:
        for no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{no}"
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise PipelineError(f"{where}: not valid JSON ({e.msg if hasattr(e, 'msg') else e})"
                                    ) from None
            yield no, _check(rec, required, optional or {}, where)


def read_jsonl(path: str | Path, required: Fields, optional: Fields | None = None,
               ) -> list[dict[str, Any]]:
    return [rec for _, rec in iter_jsonl(path, required, optional)]


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write all records at once through a temporary file: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class Appender:
    """Append records one line at a time, each flushed to disk before the next.

    Opening an existing file keeps its complete lines (they are what a resumed
    job skips) and cuts a torn last line left by a crash.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.existing: list[dict[str, Any]] = []
        if self.path.exists():
            data = self.path.read_bytes()
            keep = data.rfind(b"\n") + 1
            for line in data[:keep].splitlines():
                if line.strip():
                    self.existing.append(json.loads(line))
            if keep != len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(keep)
        self._fh = open(self.path, "a", encoding="utf-8")

    def append(self, rec: Mapping[str, Any]) -> None:
        self._fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Prompt:
    """One line of a prompts file: ``{"prompt": ..., "answer"?: ..., "id"?: ...}``."""

    text: str
    answer: str | None = None
    id: str = ""


def read_prompts(path: str | Path) -> list[Prompt]:
    out = []
    optional: Fields = {"answer": (str, int, float), "id": (str, int)}
    for no, rec in iter_jsonl(path, {"prompt": str}, optional):
        answer = rec.get("answer")
        out.append(Prompt(rec["prompt"], None if answer is None else str(answer),
                          str(rec.get("id", no))))
    if not out:
        raise PipelineError("no prompts in the file", path)
    return out


@dataclass(frozen=True)
class Probe:
    """A fixed response to teacher-force: the token ids are the truth, the texts are for people.

    ``prompt_ids`` and ``response_ids`` are exactly what the sampling model saw
    and wrote, so the log-prob pass never re-tokenises (re-tokenising a
    decoded text need not give the same ids back).
    """

    prompt_index: int
    sample: int
    prompt: str
    prompt_ids: list[int]
    response: str
    response_ids: list[int]
    meta: dict[str, Any] = field(default_factory=dict)


PROBE_FIELDS: Fields = {"prompt_index": int, "sample": int, "prompt": str, "prompt_ids": list,
                        "response": str, "response_ids": list}


def read_probes(path: str | Path) -> list[Probe]:
    out = []
    for no, rec in iter_jsonl(path, PROBE_FIELDS, {"meta": dict}):
        for key in ("prompt_ids", "response_ids"):
            ids = rec[key]
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise PipelineError(f"{path}:{no}: field {key!r} must be a list of token ids")
        if not rec["prompt_ids"]:
            raise PipelineError(f"{path}:{no}: field 'prompt_ids' is empty")
        out.append(Probe(**{k: rec[k] for k in PROBE_FIELDS}, meta=rec.get("meta", {})))
    if not out:
        raise PipelineError("no probes in the file", path)
    return out


def write_probes(path: str | Path, probes: Iterable[Probe]) -> Path:
    return write_jsonl(path, (asdict(p) for p in probes))
