"""What an export does to each tensor, decided before any data is read.

Pure functions over names, shapes and dtypes: which tensors move (are
extrapolated), which are copied from the newest checkpoint used, which are
dropped (a duplicate ``lm_head`` of tied embeddings), and the alpha/target
step arithmetic. Keeping this apart from I/O means every rule is tested on
plain lists and every bad input fails before a byte is written.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline.dtypes import is_float
from pipeline.errors import PipelineError, check_int, check_number
from pipeline.extrapolate.methods import StepRule

Action = Literal["move", "copy"]

# The authors' rule: any name containing these (lower-cased) is a norm layer,
# copied from t1 instead of extrapolated.
DEFAULT_EXCLUDE: tuple[str, ...] = ("*layernorm*", "*rmsnorm*", "*ln_*", "*norm*")
TIED_HEADS: tuple[str, ...] = ("lm_head.weight",)
TIED_EMBEDDINGS: tuple[str, ...] = ("model.embed_tokens.weight", "transformer.wte.weight",
                                    "model.embeddings.weight")


def matches(name: str, patterns: Sequence[str]) -> bool:
    """True if ``name`` matches any pattern: ``re:REGEX`` (search) or an fnmatch glob.

    Globs are matched case-insensitively (``*norm*`` catches ``LayerNorm``);
    regexes are taken as written.
    """
    for pat in patterns:
        if pat.startswith("re:"):
            try:
                if re.search(pat[3:], name):
                    return True
            except re.error as e:
                raise PipelineError(f"bad regex {pat[3:]!r}: {e}") from None
        elif fnmatch.fnmatchcase(name.lower(), pat.lower()):
            return True
    return False


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its shape, source and output dtypes, and whether it moves."""

    name: str
    shape: tuple[int, ...]
    src_dtype: np.dtype
    out_dtype: np.dtype
    action: Action

    @property
    def is_matrix(self) -> bool:
        """A moving 2-D tensor: rank-1 extrapolation applies (others use the per-element line)."""
        return self.action == "move" and len(self.shape) == 2 and min(self.shape) > 1


def plan_tensors(
    names: Sequence[str],
    shapes: Mapping[str, Sequence[tuple[int, ...]]],
    dtypes: Mapping[str, np.dtype],
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    out_dtype: np.dtype | None = None,
    tied: bool = False,
) -> list[TensorPlan]:
    """Decide each tensor's fate.

    ``shapes[name]`` lists the tensor's shape at every step used; they must
    agree (a resized vocabulary cannot be extrapolated element-wise). A
    tensor moves when it matches ``include`` and not ``exclude`` and is a
    floating-point tensor; integer buffers are always copied. With ``tied``
    the output head is dropped when the embedding it is tied to is present,
    so transformers re-ties them instead of loading two diverging copies.
    """
    present = set(names)
    drop = set()
    if tied and any(e in present for e in TIED_EMBEDDINGS):
        drop = {h for h in TIED_HEADS if h in present}
    plans = []
    for name in names:
        if name in drop:
            continue
        seen = {tuple(s) for s in shapes[name]}
        if len(seen) != 1:
            listed = " vs ".join(str(list(s)) for s in sorted(seen))
            raise PipelineError(f"tensor {name!r} changes shape between steps: {listed}")
        src = np.dtype(dtypes[name])
        moves = is_float(src) and matches(name, include) and not matches(name, exclude)
        out = np.dtype(out_dtype) if (out_dtype is not None and is_float(src)) else src
        plans.append(TensorPlan(name, seen.pop(), src, out, "move" if moves else "copy"))
    return plans


def resolve_alpha(
    t0: int,
    t1: int,
    to: float | None = None,
    alpha: float | None = None,
    allow_interpolation: bool = False,
) -> tuple[float, float]:
    """``(alpha, target_step)`` for Eq. 2 from either ``--to`` or ``--alpha``.

    alpha = (t - t0) / (t1 - t0). A target at or before t1 is interpolation
    (or going back in time) and is refused unless ``allow_interpolation``.
    """
    if t1 <= t0:
        raise PipelineError(f"need two increasing steps, got t0={t0}, t1={t1}")
    if (to is None) == (alpha is None):
        raise PipelineError("give exactly one of --to STEP or --alpha A")
    if alpha is None:
        alpha = check_number(to, "--to") - t0  # type: ignore[arg-type]  (to is given here)
        alpha /= t1 - t0
    alpha = check_number(alpha, "--alpha")
    target = t0 + alpha * (t1 - t0)
    check_target(target, t1, allow_interpolation)
    return float(alpha), float(target)


def check_target(target: float, last_step: int, allow_interpolation: bool) -> None:
    """Refuse a target not beyond the newest step used unless interpolation is allowed.

    NaN is refused first: ``nan <= last_step`` is False, so it would pass as "beyond".
    """
    check_number(target, "target step")
    if target <= last_step and not allow_interpolation:
        raise PipelineError(
            f"target step {target:g} is not beyond the last source step {last_step};"
            " pass --allow-interpolation to predict inside the range"
        )


def steps_in_range(available: Sequence[int], lo: int, hi: int, method: str) -> list[int]:
    """The stored steps in [lo, hi] (``--steps T0 T1`` of a window method: a range, not a list)."""
    if lo > hi:
        raise PipelineError(f"--steps {lo} {hi}: the range must run from low to high")
    chosen = [s for s in sorted(available) if lo <= s <= hi]
    if len(chosen) < 2:
        raise PipelineError(f"--steps {lo} {hi}: {method} needs at least two stored steps in "
                            f"[{lo}, {hi}], the source has {', '.join(map(str, available))}")
    return chosen


def choose_steps(
    available: Sequence[int], wanted: Sequence[int] | None, rule: StepRule, name: str,
    window: int | None = None,
) -> list[int]:
    """The source steps a method (called ``name`` in errors) uses, checked against the source.

    pair: ``wanted`` = (t0, t1), default first and last stored step.
    window: ``wanted`` = explicit list (default all), of which the last
    ``window`` steps (default all).
    """
    if window is not None:
        check_int(window, "--window", 2)
    avail = sorted(available)
    if wanted:
        missing = [s for s in wanted if s not in avail]
        if missing:
            raise PipelineError(
                f"step(s) {', '.join(map(str, missing))} not in the source"
                f" (has {', '.join(map(str, avail))})"
            )
        steps = sorted(set(wanted))
    elif rule == "pair":
        steps = [avail[0], avail[-1]] if avail else []
    else:
        steps = avail
    if rule == "window" and window is not None:
        steps = steps[-window:]
    if rule == "pair" and len(steps) != 2:
        raise PipelineError(f"{name} needs exactly two distinct steps, got {steps}")
    if len(steps) < 2:
        raise PipelineError(f"{name} needs at least two steps, the source has {avail}")
    return steps


def rows_per_block(shape: tuple[int, ...], block_bytes: int, elem_bytes: int = 4) -> int:
    """Leading-axis rows whose working set (``elem_bytes`` per element) fits ``block_bytes``."""
    if not shape:
        return 1
    row = int(np.prod(shape[1:], dtype=np.int64)) * elem_bytes
    return max(1, block_bytes // max(row, 1))
