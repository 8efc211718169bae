"""The registry of extrapolation methods: the one module that knows their names.

Export, backtest, the alpha sweep, the demo and the CLI's ``--method``
choices all look methods up here, so adding a method is one ``register``
call: it then shows up in ``--help``, is exported, backtested and swept
without touching those modules. A method declares what it needs (how it
picks its steps, whether it uses the per-element least-squares fit, a
per-matrix pre-pass, its parameters, its scratch memory) and computes one
row block from arrays, by calling the pure kernels of ``kernels.py`` and
``rank1.py``; all I/O stays with the callers.

The CLI builds its ``--method`` choices from this module when it starts, so
numpy and the kernels (ml_dtypes alone takes seconds on a busy machine) are
imported only when a block is computed.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pipeline.errors import PipelineError, check_number

if TYPE_CHECKING:
    import numpy as np

    from pipeline.extrapolate.kernels import Line
    from pipeline.extrapolate.plan import TensorPlan
    from pipeline.extrapolate.rank1 import BlockReader
    from pipeline.workspace import Workspace

# how a method picks its steps: Eq. 2's two endpoints, or every step of a window
StepRule = Literal["pair", "window"]
DEFAULT_METHOD = "two-point"  # what --method defaults to: the paper's Eq. 2
Params = Mapping[str, float]
if TYPE_CHECKING:
    # (read, matrix shape, steps, block_bytes) -> what the method needs to know of a matrix
    Prepass = Callable[[BlockReader, tuple[int, ...], tuple[int, ...], int], Any]


@dataclass(frozen=True)
class BlockInput:
    """One row block of one tensor, as a method's ``predict`` sees it.

    ``blocks`` are the source arrays (source dtype) at :meth:`Method.input_steps`
    in step order: every step used, or only the last one for a tensor the
    pre-pass ``prepared``. ``fits`` is a cache shared by the methods scoring the
    same block (a backtest fits each window once for lstsq, gated and rank1).
    """

    blocks: tuple[np.ndarray, ...]
    steps: tuple[int, ...]  # every step the method uses (the window, or t0 and t1)
    target: float
    alpha: float | None  # Eq. 2's alpha as the user gave it (rounding it again changes bits)
    rows: slice | None = None
    prepared: Any = None  # the pre-pass result of this tensor, or None
    out_dtype: np.dtype | None = None  # None: float32
    ws: Workspace | None = None
    threads: int | None = None
    fits: dict[tuple[int, ...], tuple[Line, np.ndarray]] = field(default_factory=dict)

    def fit(self) -> tuple[Line, np.ndarray]:
        """Per-element least-squares line through ``blocks`` (computed once per block)."""
        from pipeline.extrapolate import kernels as K

        if self.steps not in self.fits:
            self.fits[self.steps] = K.fit_line(self.blocks, self.steps)
        return self.fits[self.steps]

    def output(self) -> np.ndarray:
        """A buffer of the output dtype and block shape (a workspace's when there is one)."""
        import numpy as np

        shape, dtype = self.blocks[0].shape, np.dtype(self.out_dtype or np.float32)
        if self.ws is not None:
            return self.ws.get("output", shape, dtype)
        return np.empty(shape, dtype)


@dataclass(frozen=True)
class Param:
    """A numeric parameter of a method, with its CLI option and its checks."""

    name: str  # keyword of make_spec / key of the params mapping
    option: str  # the CLI option that sets it, named in errors
    lo: float | None = None
    hi: float | None = None
    label: str = "{:g}"  # how a value shows in a backtest table
    typical: float | None = None  # what the demo and the alpha sweep use
    sweep: tuple[float, ...] = ()  # what a backtest tries by default

    def check(self, value: object) -> float:
        return check_number(value, self.option, self.lo, self.hi)


@dataclass(frozen=True)
class Method:
    """An extrapolation method: what it needs, and how it predicts one block.

    ``predict(block, params)`` returns the block's prediction, float32 or
    float64 (rounded by the caller), or already in ``block.out_dtype`` when
    the kernel rounds as it goes. ``scratch_bytes``: working bytes per
    element besides the inputs, for sizing row blocks.
    """

    name: str
    summary: str
    step_rule: StepRule  # "pair": two endpoints t0, t1; "window": every step of a window
    predict: Callable[[BlockInput, Params], np.ndarray]
    params: tuple[Param, ...] = ()
    needs_fit: bool = False  # uses the per-element least-squares fit (slope, R²)
    prepass: Prepass | None = None  # a pass over each moving matrix before any block
    scratch_bytes: int = 104

    def prepares(self, plan: TensorPlan) -> bool:
        """True where the pre-pass runs: moving matrices of a method that has one."""
        return self.prepass is not None and plan.is_matrix

    def input_steps(self, steps: Sequence[int], prepared: bool) -> tuple[int, ...]:
        """The steps a block is read at: a prepared tensor moves from the last step only."""
        return (steps[-1],) if prepared else tuple(steps)

    def choose_steps(self, available: Sequence[int], wanted: Sequence[int] | None,
                     window: int | None = None) -> list[int]:
        from pipeline.extrapolate.plan import choose_steps

        return choose_steps(available, wanted, self.step_rule, self.name, window)

    def steps_option(self, available: Sequence[int], lo: int, hi: int) -> list[int]:
        """``--steps LO HI``: the two steps of a pair method, the stored range of a window one."""
        from pipeline.extrapolate.plan import steps_in_range

        if self.step_rule == "pair":
            return [lo, hi]
        return steps_in_range(available, lo, hi, self.name)

    def check_params(self, given: Mapping[str, object]) -> dict[str, float]:
        """The method's parameters from ``given`` (None: not given), each checked.

        A parameter of another method is refused with the methods that take
        it, so a typo in the method is not silently ignored.
        """
        out: dict[str, float] = {}
        mine = {p.name: p for p in self.params}
        for key, value in given.items():
            if value is None:
                continue
            if key not in mine:
                raise not_applicable(key)
            out[key] = mine[key].check(value)
        for p in self.params:
            if p.name not in out:
                raise PipelineError(f"--method {self.name} needs {p.option}")
        return out

    def select(self, given: Mapping[str, float]) -> dict[str, float]:
        """The part of ``given`` this method takes (the alpha sweep's shared options)."""
        return {p.name: given[p.name] for p in self.params if p.name in given}

    def typical_params(self) -> dict[str, float]:
        """Parameters for a run without user choices (the demo)."""
        return {p.name: p.typical for p in self.params if p.typical is not None}

    def label(self, params: Params, used: Sequence[int] | None = None) -> str:
        """Display name in tables: parameters if any, else what the steps were."""
        if self.params:
            shown = ", ".join(p.label.format(params[p.name]) for p in self.params)
            return f"{self.name}({shown})"
        if used is None:
            return self.name
        if self.step_rule == "pair":
            return f"{self.name}(t0={used[0]})"
        return f"{self.name}({len(used)} steps)"


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method (its name must be new); returns it, so it can decorate a definition."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    if method.step_rule not in ("pair", "window"):
        raise ValueError(f"method {method.name!r}: step_rule must be 'pair' or 'window'")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (tests register throw-away methods)."""
    del _REGISTRY[name]


def get(name: str) -> Method:
    """The method called ``name``; a user-facing error naming the choices otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise PipelineError(f"unknown method {name!r} (expected one of "
                            f"{', '.join(_REGISTRY)})") from None


def methods() -> tuple[Method, ...]:
    """Every registered method, in registration order (the order of tables and plots)."""
    return tuple(_REGISTRY.values())


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def param(key: str) -> Param:
    """The parameter called ``key`` of the first method that takes it."""
    for m in _REGISTRY.values():
        for p in m.params:
            if p.name == key:
                return p
    raise PipelineError(f"unknown method parameter {key!r}")


def takers(key: str) -> tuple[str, ...]:
    """Names of the methods that take parameter ``key``."""
    return tuple(m.name for m in _REGISTRY.values() if any(p.name == key for p in m.params))


def with_steps(rule: StepRule) -> tuple[str, ...]:
    """Names of the methods that pick their steps by ``rule`` (for errors and help texts)."""
    return tuple(m.name for m in _REGISTRY.values() if m.step_rule == rule)


def not_applicable(key: str) -> PipelineError:
    """The error for a parameter given to a method that does not take it: who does."""
    return PipelineError(f"{param(key).option} only applies to --method "
                         f"{', '.join(takers(key))}")


def name_enum() -> type[enum.Enum]:
    """An Enum of the registered names, for Typer's ``--method`` choices."""
    return enum.Enum("MethodName", {n: n for n in _REGISTRY})  # type: ignore[return-value]


# ---- the built-in methods -------------------------------------------------------------


def _two_point(b: BlockInput, params: Params) -> np.ndarray:
    from pipeline.extrapolate import kernels as K

    if b.alpha is None:
        raise ValueError("two-point needs Eq. 2's alpha")
    # rounding to the output dtype is fused into the kernel, tile by tile
    return K.two_point(b.blocks[0], b.blocks[-1], b.alpha, out=b.output(), ws=b.ws,
                       threads=b.threads)


def _lstsq(b: BlockInput, params: Params) -> np.ndarray:
    from pipeline.extrapolate import kernels as K

    fit, last = b.fit()
    return K.line_value(fit.slope, fit.intercept, b.target).reshape(last.shape)


def _gated(b: BlockInput, params: Params) -> np.ndarray:
    from pipeline.extrapolate import kernels as K

    fit, last = b.fit()
    line = K.line_value(fit.slope, fit.intercept, b.target)
    return K.gate(line, last.reshape(-1), fit.r2, params["r2_min"]).reshape(last.shape)


def _rank1(b: BlockInput, params: Params) -> np.ndarray:
    if b.prepared is None:  # not a matrix: the per-element line
        return _lstsq(b, params)
    if b.rows is None:
        raise ValueError("rank1 predicts a matrix by row blocks")
    import numpy as np

    from pipeline.extrapolate import kernels as K

    drift = b.prepared.drift(b.rows, b.target - b.steps[-1])
    return K.to_float32(b.blocks[-1]).astype(np.float64) + drift


def _rank1_prepass(read: BlockReader, shape: tuple[int, ...], steps: tuple[int, ...],
                   block_bytes: int) -> Any:
    from pipeline.extrapolate.plan import rows_per_block
    from pipeline.extrapolate.rank1 import rank1_direction

    # two float64 copies of a block (the update and its product) dominate the working set
    rows = rows_per_block(shape, block_bytes, 16)
    return rank1_direction(read, (shape[0], shape[1]), steps, rows)


# scratch bytes per element besides the inputs: two-point writes one output element
# (its float32 temporaries are cache-sized tiles); the least-squares state of
# pipeline.fit holds ~80 bytes per element plus the float64 prediction, and the gate
# its R² mask; rank1's matrices need their last step and the float64 drift
register(Method("two-point", "Eq. 2 through two checkpoints", "pair", _two_point,
                scratch_bytes=4))
register(Method("lstsq", "least-squares line per element", "window", _lstsq,
                needs_fit=True, scratch_bytes=104))
register(Method("rank1", "rank-1 drift of every matrix", "window", _rank1, needs_fit=True,
                prepass=_rank1_prepass, scratch_bytes=104))
register(Method("gated", "lstsq where R² is high, else the last value",
                "window", _gated,
                params=(Param("r2_min", "--r2-min", 0.0, 1.0, label="r2>={:g}", typical=0.8,
                              sweep=(0.5, 0.8)),),
                needs_fit=True, scratch_bytes=112))
