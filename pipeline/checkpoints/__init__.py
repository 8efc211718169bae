"""Checkpoint discovery and lazy, block-wise reads of safetensors checkpoints."""

from pipeline.checkpoints.discover import Checkpoint, discover_checkpoints
from pipeline.checkpoints.reader import CheckpointReader

__all__ = ["Checkpoint", "CheckpointReader", "discover_checkpoints"]
