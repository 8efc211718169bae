"""The two weight sources: checkpoint folders, and an ingested store.

Both are ``pipeline.steps.source.WeightSource``s: the fit, export, backtest
and the alpha sweep read "tensor X at these steps, rows a:b" plus the folder
holding config and tokenizer files through that one interface. Both back
ends answer through the readers the ingest stage owns (``CheckpointReader``
and ``pipeline.open_run``); this module only adapts them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.checkpoints import Checkpoint, CheckpointReader, discover_checkpoints
from pipeline.dtypes import logical_dtype
from pipeline.errors import PipelineError, check_output
from pipeline.steps.source import Positions, WeightSource, positions, weight_labels
from pipeline.store.location import RemotePath, as_location

__all__ = ["CheckpointSource", "StoreSource", "WeightSource", "open_source"]


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
        self._shapes: dict[str, tuple[int, ...]] = {}
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

    @cached_property
    def tensor_names(self) -> list[str]:
        """The tensors every step holds; steps that disagree are refused, naming the tensors."""
        last = self.steps[-1]
        names = self.reader(last).tensor_names
        for s in self.steps[:-1]:
            other = set(self.reader(s).tensor_names)
            if other != set(names):
                diff = sorted(set(names) ^ other)
                raise PipelineError(f"tensors differ between steps {last} and {s}: "
                                    f"{', '.join(diff[:5])}", self._ckpts[s])
        return names

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape at every step; a tensor that changes shape is refused, naming the shapes."""
        got = self._shapes.get(name)
        if got is None:
            seen: dict[tuple[int, ...], int] = {}
            for s in self.steps:
                seen.setdefault(tuple(self.reader(s).shape(name)), s)
            if len(seen) != 1:
                listed = " vs ".join(f"{list(sh)} (step {st})" for sh, st in seen.items())
                raise PipelineError(f"tensor {name!r} changes shape between steps: {listed}")
            got = self._shapes[name] = next(iter(seen))
        return got

    def dtype(self, name: str) -> np.dtype:
        return logical_dtype(self.reader(self.steps[-1]).dtype(name))

    def chunk_rows(self, name: str) -> int:
        """Checkpoints are read by ``pread`` of any row range: no chunk grid to respect."""
        shape = self.shape(name)
        return max(1, shape[0]) if shape else 1

    def labels(self, name: str) -> tuple[int, str]:
        return weight_labels(name)

    def read(self, name: str, step: int, rows: slice | None = None) -> np.ndarray:
        return self.reader(step).read(name, rows)

    def read_block(self, name: str, steps: Positions = None, rows: slice | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
        """Each step's rows from its own checkpoint, stacked (into ``out`` when given)."""
        pos = positions(steps, len(self.steps))
        shape = self.shape(name)
        if rows is not None and shape:
            shape = (len(range(*rows.indices(shape[0]))), *shape[1:])
        if out is None:
            out = np.empty((len(pos), *shape), self.dtype(name))
        for j, i in enumerate(pos):
            out[j] = self.read(name, self.steps[i], rows)
        return out

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
    """An ingested zarr run store (``pipeline.open_run``), read by row block: what the fit,
    export, backtest and alarm read. A store on object storage is a ``RemotePath``."""

    def __init__(self, store: str | Path | RemotePath,
                 checkpoints_dir: str | Path | None = None) -> None:
        import pipeline

        self.path = as_location(store)
        if isinstance(self.path, Path) and not self.path.exists():
            raise PipelineError("store not found", self.path)
        self.run = pipeline.open_run(self.path)
        self._checkpoints_dir = Path(checkpoints_dir) if checkpoints_dir else None

    def refresh(self) -> StoreSource:
        """Re-read which steps are committed (a long-lived worker's cached store)."""
        self.run.refresh()
        return self

    @property
    def attrs(self) -> dict[str, Any]:
        """The store's metadata (source run folder, schema, ...)."""
        return self.run.attrs

    @property
    def records(self) -> list[dict[str, Any]]:
        """Per-step records (checkpoint folder, file digests)."""
        return self.run.records

    @property
    def steps(self) -> list[int]:
        return [int(s) for s in self.run.steps]

    @property
    def tensor_names(self) -> list[str]:
        return list(self.run.tensor_names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.run.shape(name))  # the store holds one shape for every step

    def dtype(self, name: str) -> np.dtype:
        return logical_dtype(self.run.dtype(name))

    def chunk_rows(self, name: str) -> int:
        return int(self.run.chunk_rows(name))

    def labels(self, name: str) -> tuple[int, str]:
        return weight_labels(name)

    def read(self, name: str, step: int, rows: slice | None = None) -> np.ndarray:
        return self.run.read(name, step, rows)

    def read_block(self, name: str, steps: Positions = None, rows: slice | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
        if steps is not None and not isinstance(steps, slice):  # the run store takes a list
            all_steps = self.steps  # as training steps, a slice as positions
            steps = [all_steps[i] for i in positions(steps, len(all_steps))]
        if out is None:
            return self.run.read_block(name, steps, rows)
        return self.run.read_block(name, steps, rows, out=out)

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
