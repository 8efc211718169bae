"""Where extrapolation reads weights from: checkpoint folders or an ingested store.

Export, backtest and the alpha sweep only need "the value of tensor X at
step s, rows a:b" plus the folder holding config and tokenizer files. Both
back ends answer that through the readers the ingest stage owns
(``CheckpointReader`` and ``pipeline.open_run``); this module only adapts
them to one small interface so the extrapolation code has one code path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.checkpoints import Checkpoint, CheckpointReader, discover_checkpoints
from pipeline.checkpoints.format import logical_dtype
from pipeline.errors import PipelineError, check_output


class WeightSource(Protocol):
    """Step-indexed tensors, readable by row block."""

    @property
    def steps(self) -> list[int]: ...

    @property
    def tensor_names(self) -> list[str]: ...

    def shape(self, name: str, step: int) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> np.dtype: ...

    def read(self, name: str, step: int, rows: slice | None = None) -> np.ndarray: ...

    @property
    def files_folder(self) -> Path | None:
        """Newest checkpoint folder (config.json, tokenizer files), if known."""
        ...

    @property
    def config(self) -> dict[str, Any] | None: ...

    def input_paths(self) -> list[tuple[str, Path]]:
        """(description, path) of what the source reads: an output must never land there."""
        ...


class CheckpointSource:
    """A set of checkpoint folders with known steps, read lazily by row block."""

    def __init__(self, checkpoints: Sequence[Checkpoint]) -> None:
        if not checkpoints:
            raise PipelineError("no checkpoints given")
        steps = [c.step for c in checkpoints]
        if len(set(steps)) != len(steps):
            raise PipelineError(f"duplicate source steps {steps}")
        self._ckpts = {c.step: c.path for c in sorted(checkpoints)}
        self._readers: dict[int, CheckpointReader] = {}
        self.run_dir: Path | None = None  # set when the folders were discovered in a run

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, step_pattern: str | None = None
                     ) -> CheckpointSource:
        found = discover_checkpoints(run_dir, step_pattern)
        if not found:
            raise PipelineError("no checkpoint folders (global_step_N, checkpoint-N) found",
                                run_dir)
        src = cls(found)
        src.run_dir = Path(run_dir)
        return src

    @classmethod
    def from_folders(cls, folders: Sequence[str | Path], steps: Sequence[int] | None
                     ) -> CheckpointSource:
        """Explicit folders; steps given, or parsed from names like ``global_step_100``."""
        paths = [Path(f) for f in folders]
        for p in paths:
            if not p.is_dir():
                raise PipelineError("checkpoint folder not found", p)
        if steps is None:
            steps = [_step_from_name(p) for p in paths]
        if len(steps) != len(paths):
            raise PipelineError(f"{len(paths)} folders but {len(steps)} steps")
        return cls([Checkpoint(int(s), p) for s, p in zip(steps, paths, strict=True)])

    def reader(self, step: int) -> CheckpointReader:
        if step not in self._ckpts:
            raise PipelineError(f"step {step} not in the source (has {self.steps})")
        if step not in self._readers:
            self._readers[step] = CheckpointReader(self._ckpts[step])
        return self._readers[step]

    @property
    def steps(self) -> list[int]:
        return sorted(self._ckpts)

    @property
    def tensor_names(self) -> list[str]:
        """Names of the newest checkpoint; other steps are checked when planned."""
        return self.reader(self.steps[-1]).tensor_names

    def names_at(self, step: int) -> list[str]:
        return self.reader(step).tensor_names

    def shape(self, name: str, step: int) -> tuple[int, ...]:
        return tuple(self.reader(step).shape(name))

    def dtype(self, name: str) -> np.dtype:
        return logical_dtype(self.reader(self.steps[-1]).dtype(name))

    def read(self, name: str, step: int, rows: slice | None = None) -> np.ndarray:
        return self.reader(step).read(name, rows)

    @property
    def files_folder(self) -> Path | None:
        return self._ckpts[self.steps[-1]]

    @cached_property
    def config(self) -> dict[str, Any] | None:
        return self.reader(self.steps[-1]).config

    def input_paths(self) -> list[tuple[str, Path]]:
        """The run folder (when discovered in one) and every checkpoint folder."""
        out = [("the run folder", self.run_dir)] if self.run_dir is not None else []
        return out + [(f"the checkpoint folder of step {s}", p) for s, p in self._ckpts.items()]

    def folders(self) -> list[Path]:
        return list(self._ckpts.values())


def _step_from_name(path: Path) -> int:
    import re

    from pipeline.checkpoints.discover import DEFAULT_PATTERNS

    for part in reversed(path.resolve().parts):
        for pat in DEFAULT_PATTERNS:
            m = re.fullmatch(pat, part)
            if m:
                return int(m.group("step"))
    raise PipelineError("cannot tell the step of this folder; pass --source-steps", path)


class StoreSource:
    """An ingested zarr run store (``pipeline.open_run``), read by row block."""

    def __init__(self, store: str | Path, checkpoints_dir: str | Path | None = None) -> None:
        import pipeline

        self.path = Path(store)
        if not self.path.exists():
            raise PipelineError("store not found", self.path)
        self.run = pipeline.open_run(self.path)
        self._checkpoints_dir = Path(checkpoints_dir) if checkpoints_dir else None

    @property
    def steps(self) -> list[int]:
        return [int(s) for s in self.run.steps]

    @property
    def tensor_names(self) -> list[str]:
        return list(self.run.tensor_names)

    def shape(self, name: str, step: int) -> tuple[int, ...]:
        return tuple(self.run.shape(name))  # the store holds one shape for every step

    def dtype(self, name: str) -> np.dtype:
        return logical_dtype(self.run.dtype(name))

    def read(self, name: str, step: int, rows: slice | None = None) -> np.ndarray:
        return self.run.read(name, step, rows)

    @cached_property
    def files_folder(self) -> Path | None:
        """Newest checkpoint folder that still has a config.json.

        Ingest records each step's folder relative to the run directory; a
        catalog entry's checkpoint folder is tried first (the run may have
        moved since ingest).
        """
        source = self.run.attrs.get("source") or {}
        bases = [b for b in (self._checkpoints_dir, source.get("run_dir")) if b]
        for rec in reversed(self.run.records):
            for base in bases:
                cand = Path(base) / rec["folder"]
                if (cand / "config.json").is_file():
                    return cand
        return None

    @cached_property
    def config(self) -> dict[str, Any] | None:
        folder = self.files_folder
        if folder is not None:
            return json.loads((folder / "config.json").read_text())
        return self.run.config

    def input_paths(self) -> list[tuple[str, Path]]:
        """The store, the run folder it was ingested from (and the catalog's), each step's."""
        from pipeline.fit.source import store_inputs

        source = self.run.attrs.get("source") or {}
        runs = [b for b in (source.get("run_dir"), self._checkpoints_dir) if b]
        return [*store_inputs(self.path, self.run),
                *(("the run folder the store was ingested from", Path(b)) for b in runs)]


def open_source(
    source: str | Path | None = None,
    folders: Sequence[str | Path] | None = None,
    steps: Sequence[int] | None = None,
    catalog: str | Path | None = None,
) -> WeightSource:
    """Resolve a CLI source: checkpoint folders, a catalog name, a store, or a run dir.

    A catalog entry is read from its store when ingested, else straight from
    its checkpoints (extrapolation needs no store for two checkpoints).
    """
    from pipeline.catalog import resolve

    if folders:
        if source is not None:
            raise PipelineError("give a SOURCE or --from-checkpoints, not both")
        return CheckpointSource.from_folders(folders, steps)
    if source is None:
        raise PipelineError("no source given (a store, a run folder, a catalog name, "
                            "or --from-checkpoints DIR0 DIR1)")
    target = resolve(str(source), catalog)
    if target.entry is not None:
        entry = target.entry
        if entry.store.exists():
            return StoreSource(entry.store, entry.checkpoints)
        return CheckpointSource.from_run_dir(entry.checkpoints, entry.step_pattern)
    path = Path(source)
    if not path.exists():
        raise PipelineError("source not found", path)
    if _is_zarr(path):
        return StoreSource(path)
    return CheckpointSource.from_run_dir(path)


def check_export_out(source: WeightSource, out: str | Path) -> None:
    """Refuse an export folder on top of the source, or posing as one of its checkpoints.

    The export replaces ``out`` as a whole (``--force``), so it may not be,
    contain or sit inside anything the source reads. A folder named like a
    checkpoint beside the source's checkpoints would be ingested later as a
    real training step, so it is refused as well.
    """
    import re

    from pipeline.checkpoints.discover import DEFAULT_PATTERNS

    paths = source.input_paths() if hasattr(source, "input_paths") else []
    check_output(out, paths, replaces=True)
    target = Path(os.path.realpath(out))
    for folder in getattr(source, "folders", list)():
        if (Path(os.path.realpath(folder)).parent == target.parent
                and any(re.fullmatch(p, target.name) for p in DEFAULT_PATTERNS)):
            raise PipelineError("output would pose as a checkpoint of the run it is computed "
                                f"from (beside {folder}); a later ingest would take it for a "
                                "real training step; choose another --out", out)


def _is_zarr(path: Path) -> bool:
    return (path / "zarr.json").exists() or (path / ".zgroup").exists()
