"""RL-Extra (Eq. 3, "periodic re-grounding") inside a running TRL ``GRPOTrainer``.

Every ``m`` real optimizer steps the trainable weights jump along the line of
the segment just trained: theta <- theta_start + ((m + n) / m) (theta_end -
theta_start), i.e. ``n`` steps for free, and training continues from there.
theta_start is the model at the start of the segment, snapshotted in float32
on the CPU (the master weights when training in fp32 or mixed precision).

Why the checks below exist:

- GRPO buffers rollouts: completions (and, when they are reused, their "old"
  log-probs) are generated once every ``steps_per_generation x num_iterations``
  micro-steps and then consumed over several optimizer steps. A jump inside a
  buffer would leave the next updates training on completions sampled from a
  model that no longer exists, so ``m`` must be a whole number of generation
  periods. A mismatch is refused at ``on_train_begin`` (not rounded: ``m`` is
  in the formula, and silently changing it changes the jump).
- The callback fires in ``on_step_end``, after ``optimizer.step()`` and
  ``global_step += 1`` and before the next micro-step's ``_prepare_inputs``
  (where TRL generates), so the next rollouts come from the jumped model.
- The data order is the trainer's sampler's: nothing is restarted, the next
  segment sees the next prompts (``tests/test_rl_extra.py`` checks this).
- Norm layers are not moved by default, as in the export (the same
  ``pipeline.extrapolate.plan`` patterns); the jump itself is the export's
  float32 kernel (``pipeline.extrapolate.kernels.two_point``), so an
  in-process jump and an exported two-point model agree bit for bit.

Checkpoints of an RL-Extra run are named by the real step (what the trainer
counts) and carry a :data:`STEP_META_FILE` with the nominal step (real +
``n`` x jumps so far), which ``pipeline.checkpoints.discover`` uses as the step.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline.checkpoints.discover import STEP_META_FILE
from pipeline.errors import PipelineError, check_int, check_number
from pipeline.extrapolate.kernels import two_point
from pipeline.extrapolate.plan import DEFAULT_EXCLUDE, matches

try:  # a TrainerCallback subclass is what Trainer.add_callback expects
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a dependency
    TrainerCallback = object  # type: ignore[assignment,misc]

__all__ = ["STEP_META_FILE", "Adaptive", "Decision", "JumpRecord", "RLExtra", "RLExtraCallback",
           "check_alignment", "generation_period", "reset_optimizer_state", "step_meta_json"]

OptimizerMode = Literal["keep", "reset"]
OPTIMIZER_MODES: tuple[str, ...] = ("keep", "reset")
# what the adaptive policy did with a segment, by its forecast error (see Adaptive.decide)
Action = Literal["grow", "keep", "shrink", "skip"]


@dataclass(frozen=True)
class Decision:
    """The policy's verdict on one segment: the n to jump by (0 when skipped) and why."""

    action: Action
    n: int  # extra steps of this jump (0: skipped)
    n_next: int  # the policy's n for the next segment


@dataclass(frozen=True)
class Adaptive:
    """Adaptive re-grounding: choose each jump's n from how linear the segment just was.

    Before a jump, the segment's end (its last real step) is forecast from
    snapshots taken earlier in the same segment: its start and ``probes``
    interior points, equally spaced (``probes=1``: the midpoint), with a
    method of the registry (``pipeline.extrapolate.methods``; a pair method
    uses the start and the last probe). The error is the backtest's,
    ``||pred - end|| / ||end - last probe||`` over the jumped tensors
    (``pipeline.extrapolate.alarm.forecast_error``): 0 on a perfect line, 1
    for "no change", about sqrt(2) for a random walk from a midpoint. Then,
    with the running n (``RLExtra.n`` at first):

    - error > ``skip_above``: no jump (the line does not hold; the weights,
      and the optimizer state, stay as trained), n <- max(n_min, n x shrink);
    - error > ``shrink_above``: n <- max(n_min, n x shrink), then jump;
    - error <= ``grow_below``: n <- min(n_max, n x grow), then jump;
    - otherwise jump with n unchanged.

    Why these defaults: the midpoint forecast of a random walk scores
    sqrt(2) ~ 1.41 and "no change" 1, so a segment scoring above 1.2 is
    indistinguishable from noise and is not extrapolated; below 0.7 the
    second half is predicted to within 70% of its own move, which on the
    tiny linear run (lr 3e-5) is where a jump helps; halving and 1.5x keep a
    single noisy segment from swinging n by more than one notch. The
    snapshots cost ``1 + probes`` float32 copies of the jumped tensors
    besides the segment start.
    """

    n_min: int = 1
    n_max: int = 1000
    grow_below: float = 0.7
    shrink_above: float = 1.0
    skip_above: float = 1.2
    grow: float = 1.5
    shrink: float = 0.5
    probes: int = 1
    method: str = "two-point"

    def __post_init__(self) -> None:
        check_int(self.n_min, "n_min", 0)
        check_int(self.n_max, "n_max", max(self.n_min, 1))
        check_int(self.probes, "probes", 1)
        check_number(self.grow_below, "grow_below", 0.0)
        check_number(self.shrink_above, "shrink_above", self.grow_below)
        check_number(self.skip_above, "skip_above", self.shrink_above)
        check_number(self.grow, "grow", 1.0, low_open=True)
        check_number(self.shrink, "shrink", 0.0, 1.0, low_open=True)
        if self.shrink == 1.0:
            raise PipelineError("shrink must be < 1, got 1")
        from pipeline.extrapolate.alarm import forecast_method

        forecast_method(self.method)

    def probe_offsets(self, m: int) -> tuple[int, ...]:
        """Real steps into a segment of ``m`` at which to snapshot (distinct, in 1..m-1)."""
        if m < self.probes + 1:
            raise PipelineError(f"the adaptive policy needs m >= probes + 1 = {self.probes + 1} "
                                f"(a snapshot inside the segment), got m={m}")
        return tuple(round(m * i / (self.probes + 1)) for i in range(1, self.probes + 1))

    def decide(self, error: float, n: int) -> Decision:
        """The action for a segment whose end was forecast with relative ``error``."""
        if not error <= self.skip_above:  # NaN/inf (a segment that did not move) too
            return Decision("skip", 0, self._shrunk(n))
        if error > self.shrink_above:
            k = self._shrunk(n)
            return Decision("shrink", k, k)
        if error <= self.grow_below:
            k = min(self.n_max, max(n + 1, math.ceil(n * self.grow)))
            return Decision("grow", k, k)
        return Decision("keep", n, n)

    def _shrunk(self, n: int) -> int:
        return max(self.n_min, math.floor(n * self.shrink))


@dataclass(frozen=True)
class RLExtra:
    """The settings of Eq. 3: ``m`` real steps per segment, ``n`` free steps per jump.

    ``optimizer``: "reset" clears the optimizer state after every jump (the
    authors' runs: each cycle was a fresh trainer), "keep" carries Adam's
    moments across it. ``include``/``exclude``: which trainable tensors jump
    (globs or ``re:`` regexes, as ``extrapolate --include/--exclude``); the
    others keep their trained values.
    """

    m: int
    n: int
    optimizer: OptimizerMode = "reset"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    policy: Adaptive | None = None  # None: every jump is n steps (Eq. 3 as in the paper)

    def __post_init__(self) -> None:
        check_int(self.m, "m (real steps per segment)", 1)
        check_int(self.n, "n (extra steps per jump)", 0)
        if self.optimizer not in OPTIMIZER_MODES:
            raise PipelineError(f"optimizer must be one of {', '.join(OPTIMIZER_MODES)}, "
                                f"got {self.optimizer!r}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.policy is not None:
            if not isinstance(self.policy, Adaptive):
                raise PipelineError(f"policy must be an Adaptive, got {type(self.policy).__name__}")
            self.policy.probe_offsets(self.m)  # refuses an m with no room for a probe
            if not self.policy.n_min <= self.n <= self.policy.n_max:
                raise PipelineError(f"n={self.n} (the first jump's) must be within the policy's "
                                    f"[n_min, n_max] = [{self.policy.n_min}, "
                                    f"{self.policy.n_max}]")

    @property
    def alpha(self) -> float:
        """(m + n) / m: the factor of Eq. 3 (Eq. 2's alpha with t0, t1 the segment ends)."""
        return (self.m + self.n) / self.m

    def nominal_step(self, real_step: int) -> int:
        """Nominal step after ``real_step`` real steps, jumps at multiples of ``m`` included.

        Fixed n only: with a policy it depends on the run (the callback knows it).
        """
        if self.policy is not None:
            raise PipelineError("with an adaptive policy the nominal step depends on the "
                                "jumps taken: ask the callback (RLExtraCallback.nominal_step)")
        return real_step + self.n * (real_step // self.m)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "include": list(self.include), "exclude": list(self.exclude)}


def generation_period(grad_accum: int, steps_per_generation: int, num_iterations: int) -> int:
    """Optimizer steps between two GRPO generations (a jump may fall only on a multiple).

    TRL regenerates when its micro-step counter is a multiple of
    ``steps_per_generation x num_iterations``; an optimizer step is
    ``grad_accum`` micro-steps, so generations fall on optimizer-step
    boundaries every lcm(grad_accum, spg x ni) / grad_accum steps.
    """
    every = steps_per_generation * num_iterations
    return math.lcm(grad_accum, every) // grad_accum


def check_alignment(spec: RLExtra, args: Any) -> int:
    """Refuse an ``m`` that would jump inside a GRPO rollout buffer; returns the period."""
    gas = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
    spg = int(getattr(args, "steps_per_generation", None) or gas)
    ni = int(getattr(args, "num_iterations", 1) or 1)
    period = generation_period(gas, spg, ni)
    if spec.m % period:
        raise PipelineError(
            f"m={spec.m} does not end on a GRPO generation boundary: completions are generated "
            f"every steps_per_generation x num_iterations = {spg} x {ni} micro-steps, i.e. "
            f"every {period} optimizer steps with gradient_accumulation_steps={gas}; choose m "
            f"a multiple of {period}")
    return period


@dataclass
class JumpRecord:
    """One jump: when (real and nominal step), how far, and how long it took."""

    real_step: int
    nominal_step: int  # after this jump
    jumps: int  # jumps so far, this one included
    alpha: float
    tensors: int
    elements: int
    delta_norm: float  # ||theta_end - theta_start|| over the jumped tensors (float64)
    seconds: float
    n: int | None = None  # extra steps of this jump (0: skipped by the policy)
    forecast_error: float | None = None  # the policy's: end forecast from inside the segment
    forecast_steps: tuple[int, ...] = ()  # real steps the forecast used
    action: Action | None = None  # the policy's decision (None: fixed n)
    n_next: int | None = None  # the policy's n for the next segment
    skipped: bool = False  # the policy left the weights as trained

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        err = d["forecast_error"]
        if err is not None and not math.isfinite(err):  # JSON has no NaN: null
            d["forecast_error"] = None
        d["forecast_steps"] = list(d["forecast_steps"])
        return d


# hook(phase, record, model, optimizer): phase "before" (record of the jump about to
# happen) or "after"; tests save the segment end there, users may log or evaluate
JumpHook = Callable[[str, JumpRecord, Any, Any], None]


def _inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def reset_optimizer_state(optimizer: Any) -> int:
    """Forget every parameter's state (Adam: step, exp_avg, exp_avg_sq); returns how many.

    Torch optimizers initialise a parameter's state lazily when it is empty,
    so the next step is exactly a fresh optimizer's first step (learning-rate
    schedule aside: the scheduler keeps counting real steps).
    """
    opt = _inner_optimizer(optimizer)
    cleared = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if p in opt.state:
                del opt.state[p]
                cleared += 1
    return cleared


@dataclass
class _Tensor:
    name: str
    param: torch.nn.Parameter
    start: np.ndarray  # float32 on the CPU


class RLExtraCallback(TrainerCallback):
    """A ``TrainerCallback`` that jumps the weights every ``spec.m`` real steps (Eq. 3).

    Add it *before* any checkpoint-saving callback: callbacks run in order, so
    a checkpoint saved at a jump step then holds the jumped model, whose
    nominal step (:meth:`nominal_step`) includes the jump. A jump also
    happens at the last step when it is a multiple of ``m``: the final model
    is the jumped one, as after a cycle of the external loop.
    """

    def __init__(self, spec: RLExtra, hooks: Sequence[JumpHook] = ()) -> None:
        self.spec = spec
        self.hooks = list(hooks)
        self.records: list[JumpRecord] = []  # one per segment end: jumps and skips
        self.period: int | None = None
        self.n_current = spec.n  # the n of the next jump (the policy changes it)
        self._tensors: list[_Tensor] = []
        self._frozen: list[str] = []
        self._probes: dict[int, dict[str, np.ndarray]] = {}  # offset in segment -> snapshot
        self._offsets: tuple[int, ...] = (spec.policy.probe_offsets(spec.m)
                                          if spec.policy is not None else ())

    # -- what the rest of the run needs to know --------------------------------------------

    @property
    def jumps(self) -> int:
        """Jumps taken (segments the policy skipped do not count)."""
        return sum(not r.skipped for r in self.records)

    @property
    def jumped_names(self) -> list[str]:
        return [t.name for t in self._tensors]

    def nominal_step(self, real_step: int) -> int:
        """The nominal step of the live model after ``real_step`` real steps."""
        return real_step + self._extra_steps()

    def _extra_steps(self) -> int:
        return sum(self.spec.n if r.n is None else r.n for r in self.records if not r.skipped)

    def step_metadata(self, real_step: int) -> dict[str, Any]:
        """What :data:`STEP_META_FILE` holds for a checkpoint taken now at ``real_step``."""
        meta = {"real_step": real_step, "nominal_step": self.nominal_step(real_step),
                "jumps": self.jumps, "method": "rl-extra", "m": self.spec.m, "n": self.spec.n}
        if self.spec.policy is not None:  # n is the first jump's; the rest vary
            meta["adaptive"] = True
        return meta

    # -- trainer events --------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kw):
        if state.global_step != 0:
            raise PipelineError(
                f"RL-Extra cannot resume a trainer mid-run (global_step={state.global_step}): "
                "the segment start is not in the trainer's checkpoint; use `rlvr-lin rl-extra` "
                "(the external loop), which resumes by cycle")
        self.period = check_alignment(self.spec, args)
        self._tensors, self._frozen, self._probes = [], [], {}
        self.n_current = self.spec.n
        for name, p in model.named_parameters():
            movable = p.requires_grad and p.is_floating_point()
            if movable and matches(name, self.spec.include) and not matches(name,
                                                                            self.spec.exclude):
                self._tensors.append(_Tensor(name, p, _snapshot(p)))
            else:
                self._frozen.append(name)
        if not self._tensors:
            raise PipelineError("RL-Extra: no trainable tensor matches include="
                                f"{list(self.spec.include)} minus exclude="
                                f"{list(self.spec.exclude)}")

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        if state.global_step <= 0:
            return
        offset = state.global_step % self.spec.m
        if offset in self._offsets:  # the adaptive policy's snapshot inside the segment
            self._probes[offset] = {t.name: _snapshot(t.param) for t in self._tensors}
        if offset == 0:
            self.jump(state.global_step, model, optimizer)

    def on_save(self, args, state, control, **kw):
        """Give the trainer's own ``checkpoint-N/`` its nominal step (ingest reads it).

        The Trainer saves after ``on_step_end``, so a checkpoint at a jump step
        holds the jumped model and its nominal step includes the jump.
        """
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir() and getattr(args, "should_save", True):
            tmp = folder / f".{STEP_META_FILE}.partial"
            tmp.write_text(step_meta_json(self.step_metadata(state.global_step)))
            os.replace(tmp, folder / STEP_META_FILE)

    # -- the jump --------------------------------------------------------------------------

    def forecast(self, ends: dict[str, np.ndarray]) -> tuple[float, tuple[int, ...]]:
        """The policy's error: the segment's end forecast from its start and its probes.

        The backtest's measure on the jumped tensors (``alarm.forecast_error``);
        steps are real steps into the segment (0 = its start).
        """
        from pipeline.extrapolate.alarm import ArraySource, forecast_error

        policy = self.spec.policy
        assert policy is not None
        missing = [o for o in self._offsets if o not in self._probes]
        if missing:  # on_step_end always runs before; a direct jump() call may skip it
            raise PipelineError(f"adaptive RL-Extra: no snapshot at segment offsets {missing}")
        snaps = {0: {t.name: t.start for t in self._tensors}, self.spec.m: ends,
                 **{o: self._probes[o] for o in self._offsets}}
        f = forecast_error(ArraySource(snaps), (0, *self._offsets), self.spec.m,
                           policy.method, exclude=())
        # a segment whose second part did not move (a collapsed policy: every answer in a
        # group scores the same, zero advantage) has no line to forecast: NaN, skipped
        return (math.nan if f.move_sq == 0.0 else f.rel), f.used

    def jump(self, real_step: int, model: Any, optimizer: Any) -> JumpRecord:
        """End a segment: move every selected tensor to Eq. 3's point, in float32.

        With an adaptive policy the segment's end is first forecast from its
        start and probes; the policy's decision sets this jump's n (or skips
        it: the weights and the optimizer state stay as trained). Either way
        a new segment starts from what the model then holds.
        """
        t0 = time.perf_counter()
        ends = {t.name: _snapshot(t.param) for t in self._tensors}
        n, error, used, decision = self.n_current, None, (), None
        if self.spec.policy is not None:
            error, used = self.forecast(ends)
            decision = self.spec.policy.decide(error, self.n_current)
            n = decision.n
            self._probes = {}
        skipped = decision is not None and decision.action == "skip"
        alpha = (self.spec.m + n) / self.spec.m
        jumps = self.jumps + (0 if skipped else 1)
        rec = JumpRecord(real_step, real_step + self._extra_steps() + n, jumps, alpha,
                         len(self._tensors), sum(t.start.size for t in self._tensors),
                         0.0, 0.0, n=n, forecast_error=error,
                         forecast_steps=tuple(real_step - self.spec.m + s for s in used),
                         action=decision.action if decision else None,
                         n_next=decision.n_next if decision else None, skipped=skipped)
        for hook in self.hooks:
            hook("before", rec, model, optimizer)
        sq = 0.0
        with torch.no_grad():
            for t in self._tensors:
                end = ends[t.name]
                d = end.astype(np.float64) - t.start
                sq += float(np.dot(d.ravel(), d.ravel()))
                if not skipped:
                    new = two_point(t.start, end, alpha)  # float32, Eq. 2's kernel
                    t.param.copy_(torch.from_numpy(new).to(t.param.device, t.param.dtype))
                    t.start = _snapshot(t.param)  # what the model holds now (bf16: rounded)
                else:
                    t.start = end
        if not skipped and self.spec.optimizer == "reset" and optimizer is not None:
            reset_optimizer_state(optimizer)
        if decision is not None:
            self.n_current = decision.n_next
        rec.delta_norm = math.sqrt(sq)
        rec.seconds = time.perf_counter() - t0
        self.records.append(rec)
        for hook in self.hooks:
            hook("after", rec, model, optimizer)
        return rec

    def summary(self) -> dict[str, Any]:
        """The spec, what jumped and every jump (written beside an RL-Extra run)."""
        out = {"rl_extra": self.spec.as_dict(), "generation_period": self.period,
               "jumped": self.jumped_names, "not_jumped": list(self._frozen),
               "jumps": [r.as_dict() for r in self.records]}
        if self.spec.policy is not None:
            acts = [r.action for r in self.records]
            out["adaptive"] = {"n_next": self.n_current, "extra_steps": self._extra_steps(),
                               **{f"{a}s": acts.count(a) for a in ("grow", "keep", "shrink",
                                                                    "skip")}}
        return out


def _snapshot(p: torch.Tensor) -> np.ndarray:
    """A float32 CPU copy of a tensor (never a view of the live parameter)."""
    return p.detach().to(device="cpu", dtype=torch.float32, copy=True).numpy()


def step_meta_json(meta: dict[str, Any]) -> str:
    """The text of a :data:`STEP_META_FILE` (one format for the callback and the loop)."""
    return json.dumps(meta, indent=1, sort_keys=True) + "\n"

