"""Find a run's checkpoints and their steps, in the layouts trainers write.

Recognised step folders directly under the run directory: ``global_step_N``
(verl, OpenRLHF, this project's generator), ``checkpoint-N`` (HF Trainer /
TRL), ``step_N``. Inside a step folder the weights are in the folder itself
or in verl's ``actor/huggingface``. A catalog may give its own regex with a
named group ``step``; it is matched against the folder path relative to the
run directory. Hidden folders (``.global_step_10.partial``) are never steps.
Only paths are returned: opening and validating is the reader's job.

A step folder may carry ``nominal_step.json`` (RL-Extra runs: the folder is
named by the real step the trainer counted, the model is at a later nominal
step because of the jumps). Its ``nominal_step`` is then the checkpoint's
step, the one every later stage (store, fit, report) uses; the real step is
kept beside it as ``real_step``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.checkpoints.reader import has_weights
from pipeline.errors import PipelineError

DEFAULT_PATTERNS = (r"global_step_(?P<step>[0-9]+)", r"checkpoint-(?P<step>[0-9]+)",
                    r"step_(?P<step>[0-9]+)")
MAX_STEP = (1 << 63) - 1  # the store's step coordinate is int64
INNER = ("", "actor/huggingface", "huggingface")
MAX_DEPTH = 4
# nominal step metadata of a checkpoint (written by pipeline.rl.extra / extra_loop)
STEP_META_FILE = "nominal_step.json"


@dataclass(frozen=True, order=True)
class Checkpoint:
    """One checkpoint: its training step and the folder holding its weight files."""

    step: int
    path: Path
    # the trainer's own step count when it differs from ``step`` (an RL-Extra checkpoint,
    # whose ``step`` is the nominal one); None: the folder's step is the step
    real_step: int | None = field(default=None, compare=False)


def _weights_folder(folder: Path) -> Path:
    """The folder holding the weights inside a step folder (itself if nothing is there yet)."""
    for inner in INNER:
        cand = folder / inner if inner else folder
        if cand.is_dir() and has_weights(cand):
            return cand
    return folder


def _listdir(folder: Path) -> list[Path]:
    """Sorted entries of a folder; an unreadable one is a named error, not a traceback."""
    try:
        return sorted(folder.iterdir())
    except OSError as e:
        raise PipelineError(f"cannot list folder: {e.strerror}", folder) from None


def _candidates(run_dir: Path) -> list[Path]:
    """Folders up to MAX_DEPTH below ``run_dir``, skipping hidden ones; relative paths."""
    out, frontier = [], [run_dir]
    for _ in range(MAX_DEPTH):
        nxt = []
        for d in frontier:
            for p in _listdir(d):
                if p.is_dir() and not p.name.startswith("."):
                    out.append(p)
                    nxt.append(p)
        frontier = nxt
    return out


def parse_step(text: str | None, folder: Path, pattern: str) -> int:
    """The step a folder name gives, refused unless it is a non-negative int64.

    Refused here, at discovery, so a step the store cannot record is never
    written first (``-1`` would also read as the uncommitted marker).
    """
    if text is None or not (text.isascii() and text.isdigit()):
        raise PipelineError(f"step pattern {pattern!r} matched {text!r}, which is not a "
                            "step number (digits 0-9)", folder)
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(MAX_STEP)) or int(digits) > MAX_STEP:
        raise PipelineError(f"step {digits[:40]} is too large (the store's steps are int64, "
                            f"at most {MAX_STEP})", folder)
    return int(digits)


def read_step_meta(step_folder: Path, weights: Path, real_step: int) -> int | None:
    """The nominal step recorded in a checkpoint's metadata file, or None if it has none.

    Looked for in the step folder, then beside the weights (verl's
    ``actor/huggingface``, also before its weights land). The file must say
    the same real step as the folder name and a nominal step >= it (jumps
    only add steps); anything else is refused, naming the file, not guessed.
    """
    inner = (step_folder / i for i in INNER if i)
    for folder in dict.fromkeys((step_folder, weights, *inner)):
        meta = folder / STEP_META_FILE
        if not meta.is_file():
            continue
        try:
            data = json.loads(meta.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise PipelineError(f"unreadable step metadata: {e}", meta) from None
        if not isinstance(data, dict):
            raise PipelineError("step metadata is not a JSON object", meta)
        nominal, real = data.get("nominal_step"), data.get("real_step")
        for key, v in (("nominal_step", nominal), ("real_step", real)):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_STEP:
                raise PipelineError(f"step metadata: {key} must be an integer in [0, "
                                    f"{MAX_STEP}], got {v!r}", meta)
        if real != real_step:
            raise PipelineError(f"step metadata says real_step {real} but the folder is step "
                                f"{real_step}", meta)
        if nominal < real:
            raise PipelineError(f"step metadata: nominal_step {nominal} is before real_step "
                                f"{real}", meta)
        return nominal
    return None


def compile_pattern(step_pattern: str) -> re.Pattern[str]:
    """A user's step regex, checked: it compiles and has a named group ``step``."""
    try:
        rx = re.compile(step_pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise PipelineError(f"invalid step_pattern {step_pattern!r}: {e}") from None
    if "step" not in rx.groupindex:
        raise PipelineError(f"step_pattern {step_pattern!r} has no named group 'step'")
    return rx


def discover_checkpoints(run_dir: str | Path, step_pattern: str | None = None) -> list[Checkpoint]:
    """All checkpoints of a run, sorted by step; a step found twice is an error.

    With ``step_pattern`` the regex must fullmatch the folder's path relative
    to ``run_dir`` (posix separators) and have a group named ``step``.
    Folders that exist but have no weights yet are still returned (their
    reader will say what is missing), so ``--watch`` can wait for them.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PipelineError("run directory not found", run_dir)
    found: dict[int, Path] = {}
    real: dict[int, int] = {}

    def add(step: int, folder: Path, step_folder: Path | None = None) -> None:
        nominal = read_step_meta(step_folder or folder, folder, step)
        if nominal is not None:
            real[nominal] = step
            step = nominal
        if step in found and found[step] != folder:
            raise PipelineError(f"step {step} found twice: {found[step]} and {folder}", run_dir)
        found[step] = folder

    if step_pattern is not None:
        rx = compile_pattern(step_pattern)
        for p in _candidates(run_dir):
            m = rx.fullmatch(p.relative_to(run_dir).as_posix())
            if m:
                add(parse_step(m.group("step"), p, step_pattern), _weights_folder(p), p)
    else:
        rxs = [re.compile(p) for p in DEFAULT_PATTERNS]
        for p in _listdir(run_dir):
            if not p.is_dir() or p.name.startswith("."):
                continue
            for rx in rxs:
                m = rx.fullmatch(p.name)
                if m:
                    add(parse_step(m.group("step"), p, rx.pattern), _weights_folder(p), p)
                    break
    return [Checkpoint(s, f, real.get(s)) for s, f in sorted(found.items())]
