"""Independent references for tests: checkpoints read by safetensors/torch, not by our code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file


def torch_bits(t: torch.Tensor) -> np.ndarray:
    """A tensor's raw bit patterns as unsigned ints, via torch (not our header parser)."""
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(width).numpy().view(f"<u{t.element_size()}")


def load_checkpoint_torch(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (single file or shards) via safetensors' loader."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out
