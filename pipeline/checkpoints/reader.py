"""Lazy reads from one checkpoint folder: single-file or sharded safetensors, or opted-in pickle.

Opening a folder reads only headers, so it is cheap and it is the
completeness check: every shard the index lists must exist and every header
must agree with its file's size. Tensor data is read by row block on demand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from pipeline.checkpoints.format import (
    TensorInfo,
    bits_dtype,
    logical_dtype,
    read_header,
    read_rows_bits,
)
from pipeline.errors import PipelineError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# pickled weight files; anything else (training_args.bin, optimizer.pt, rng_state.pth) is ignored
PICKLE_WEIGHTS = re.compile(r"^(pytorch_model|model)(-\d+-of-\d+)?\.(bin|pt)$")
SHARD_NAME = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")


def weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickle weight files) directly inside ``folder``; never opens them."""
    st, pk = [], []
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix == ".safetensors":
            st.append(p)
        elif PICKLE_WEIGHTS.match(p.name):
            pk.append(p)
    return st, pk


def has_weights(folder: Path) -> bool:
    st, pk = weight_files(folder)
    return bool(st or pk or (folder / SAFETENSORS_INDEX).exists())


def _index_files(folder: Path, index_name: str) -> tuple[list[Path], dict[str, str]]:
    """Shard files listed by an HF index, refusing names that point outside the folder."""
    path = folder / index_name
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        assert isinstance(weight_map, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise PipelineError("corrupt index file (no weight_map)", path) from None
    names = sorted(set(weight_map.values()))
    for n in names:
        if not isinstance(n, str) or "/" in n or "\\" in n or n in ("", ".", ".."):
            raise PipelineError(f"index lists an unsafe shard name {n!r}", path)
    files = [folder / n for n in names]
    for f in files:
        if not f.is_file():
            raise PipelineError(f"shard {f.name} listed in {index_name} is missing", f)
    return files, weight_map


class CheckpointReader:
    """One checkpoint's tensors, read lazily; the header table is the only state held.

    ``tensor_names`` is sorted. ``read``/``read_bits`` take an optional
    leading-axis slice so big tensors are read block by block.
    """

    def __init__(self, folder: str | Path, allow_pickle: bool = False) -> None:
        self.folder = Path(folder)
        self.is_pickle = False
        st, pk = weight_files(self.folder)
        self.tensors: dict[str, TensorInfo] = {}
        self._pickled: dict[str, Path] = {}
        if (self.folder / SAFETENSORS_INDEX).exists():
            self.files, weight_map = _index_files(self.folder, SAFETENSORS_INDEX)
            self._load_headers()
            for name, shard in weight_map.items():
                if name not in self.tensors or self.tensors[name].file.name != shard:
                    raise PipelineError(f"tensor {name!r} listed in the index is not in {shard}",
                                        self.folder / shard)
        elif st:
            self.files = st
            self._check_shard_set()
            self._load_headers()
        elif pk:
            if not allow_pickle:
                raise PipelineError("pickle checkpoint (unsafe to load); convert it to "
                                    "safetensors or pass --allow-pickle", pk[0])
            self.is_pickle = True
            if (self.folder / PICKLE_INDEX).exists():
                self.files, _ = _index_files(self.folder, PICKLE_INDEX)
            else:
                self.files = pk
            self._load_pickles()
        else:
            raise PipelineError("no weight files (*.safetensors) in checkpoint folder",
                                self.folder)

    def _check_shard_set(self) -> None:
        """Without an index, ``-0000k-of-0000N`` names still say how many shards to expect."""
        totals = {int(m.group(2)) for f in self.files if (m := SHARD_NAME.search(f.name))}
        for total in totals:
            have = {int(m.group(1)) for f in self.files
                    if (m := SHARD_NAME.search(f.name)) and int(m.group(2)) == total}
            missing = sorted(set(range(1, total + 1)) - have)
            if missing:
                raise PipelineError(f"shard {missing[0]} of {total} is missing", self.folder)

    def _load_headers(self) -> None:
        for f in self.files:
            for name, info in read_header(f).items():
                if name in self.tensors:
                    raise PipelineError(f"tensor {name!r} appears in two shards", f)
                self.tensors[name] = info

    def _load_pickles(self) -> None:
        import torch

        for f in self.files:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for bad pickles
                raise PipelineError(f"cannot load pickle checkpoint: {e}", f) from None
            for name, t in sd.items():
                dtype = str(t.dtype).removeprefix("torch.")
                if name in self.tensors:
                    raise PipelineError(f"tensor {name!r} appears in two files", f)
                self.tensors[name] = TensorInfo(name, f, dtype, tuple(t.shape), -1,
                                                t.numel() * t.element_size())
                self._pickled[name] = f

    @property
    def tensor_names(self) -> list[str]:
        return sorted(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise PipelineError(f"no tensor {name!r} in checkpoint", self.folder) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> str:
        """Logical dtype name, e.g. ``"bfloat16"``."""
        return self.info(name).dtype

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    @property
    def config(self) -> dict | None:
        """``config.json`` of the model, if the folder has one."""
        p = self.folder / "config.json"
        try:
            return json.loads(p.read_text()) if p.exists() else None
        except (OSError, ValueError):
            raise PipelineError("config.json is not valid JSON", p) from None

    def read_bits(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Raw bit patterns (unsigned ints of the dtype's width) of a row block."""
        info = self.info(name)
        if not self.is_pickle:
            return read_rows_bits(info, rows)
        import torch

        sd = torch.load(info.file, map_location="cpu", weights_only=True, mmap=True)
        t = sd[name]
        if rows is not None and t.dim():
            t = t[rows]
        width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        return t.contiguous().view(width).numpy().view(bits_dtype(info.dtype))

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """A row block in its logical dtype (bfloat16 as ``ml_dtypes.bfloat16``)."""
        return self.read_bits(name, rows).view(logical_dtype(self.dtype(name)))
