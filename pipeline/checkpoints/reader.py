"""Lazy reads from one checkpoint folder: single-file or sharded safetensors, or opted-in pickle.

Opening a folder reads only headers, so it is cheap and it is the
completeness check: every shard the index lists must exist and every header
must agree with its file's size. Tensor data is read by row block on demand.

A pickle (only with ``allow_pickle``, always ``weights_only=True``) must hold
a flat state dict: string names to dense tensors, as ``torch.save(model.state_dict())``
and HF's ``pytorch_model.bin`` do. A nested one (``{"state_dict": {...}}``,
``{"model": {...}}`` as Lightning or DeepSpeed write them, with optimizer
state and counters beside it) is refused with the key to unwrap, not guessed
at: which entry is the model is the trainer's convention, not ours.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from pipeline.checkpoints.format import (
    TensorInfo,
    read_header,
    read_rows_bits,
    short,
)
from pipeline.dtypes import ST_DTYPES, bits_dtype, logical_dtype
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
        weight_map = json.loads(path.read_bytes().decode("utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise PipelineError("corrupt index file (no weight_map)", path) from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise PipelineError("corrupt index file (weight_map is not a map of tensor names to "
                            "shard file names)", path)
    names = sorted(set(weight_map.values()))
    for n in names:
        if "/" in n or "\\" in n or n in ("", ".", "..") or "\0" in n:
            raise PipelineError(f"index lists an unsafe shard name {short(n)}", path)
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
        for f in self.files:
            for name, t in _load_state_dict(f).items():
                if name in self.tensors:
                    raise PipelineError(f"tensor {short(name)} appears in two files", f)
                self.tensors[name] = TensorInfo(name, f, _pickled_dtype(name, t, f),
                                                tuple(t.shape), -1, t.numel() * t.element_size())

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
        """``config.json`` of the model (a JSON object), if the folder has one."""
        p = self.folder / "config.json"
        if not p.exists():
            return None
        try:
            cfg = json.loads(p.read_bytes().decode("utf-8"))
        except OSError as e:
            raise PipelineError(f"cannot read config.json: {e.strerror}", p) from None
        except RecursionError:
            raise PipelineError("config.json is nested too deeply", p) from None
        except ValueError as e:  # not UTF-8, not JSON
            raise PipelineError(f"config.json is not valid JSON: {e}", p) from None
        if not isinstance(cfg, dict):
            raise PipelineError("config.json is not a JSON object", p)
        return cfg

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


def _load_state_dict(f: Path) -> dict:
    """A pickle's flat state dict (``weights_only=True``: no code runs), or a named error."""
    import torch

    try:
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for bad pickles
        raise PipelineError(f"cannot load pickle checkpoint: {e}", f) from None
    if not isinstance(sd, dict):
        raise PipelineError(f"pickle holds a {type(sd).__name__}, not a state dict of "
                            "tensors", f)
    for name, t in sd.items():
        if isinstance(t, dict):
            raise PipelineError(f"pickle holds a nested dict under {short(name)}, not a flat "
                                f"state dict; save sd[{short(name)}] (model.state_dict()) "
                                "itself", f)
        if not isinstance(name, str):
            raise PipelineError(f"pickle has a key {short(name)} that is not a tensor name", f)
        if not isinstance(t, torch.Tensor):
            raise PipelineError(f"pickle entry {short(name)} is not a tensor "
                                f"({type(t).__name__})", f)
    return sd


def _pickled_dtype(name: str, t: object, f: Path) -> str:
    """Logical dtype name of a pickled tensor; those a safetensors file could not hold fail."""
    import torch

    if not isinstance(t, torch.Tensor):  # _validate_pickle refuses these first; never trust it
        raise PipelineError(f"pickle entry {short(name)} is not a tensor ({type(t).__name__})", f)
    dtype = str(t.dtype).removeprefix("torch.")
    if t.layout != torch.strided or t.is_quantized:
        raise PipelineError(f"tensor {short(name)} is {t.layout} / quantized; only dense "
                            "tensors can be stored", f)
    if dtype not in ST_DTYPES.values():  # the dtypes a safetensors checkpoint may hold
        raise PipelineError(f"tensor {short(name)} has dtype {dtype}, which cannot be stored", f)
    return dtype
