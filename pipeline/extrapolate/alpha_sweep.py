"""The paper's Figure 5 for our run: accuracy of extrapolated models vs alpha.

For two checkpoints t0 < t1 and a range of alphas, export the extrapolated
model (the real export path, so what is scored is what a user would load),
score its greedy held-out accuracy on the run's verifiable task, and put it
next to the real checkpoint at the same step when the run has one.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import PipelineError, check_number
from pipeline.extrapolate import methods as M
from pipeline.extrapolate.export import export, make_spec
from pipeline.extrapolate.sources import CheckpointSource

RUN_CONFIG = "run_config.json"


@dataclass(frozen=True)
class SweepRow:
    method: str
    t0: int
    t1: int
    alpha: float
    target: float
    accuracy: float
    real_accuracy: float | None  # the real checkpoint at ``target``, when the run has one
    t1_accuracy: float


def heldout_problems(run_dir: Path) -> list:
    """The run's held-out split (seed and size from its run_config.json)."""
    from pipeline.rl.tasks import run_problems

    cfg_path = run_dir / RUN_CONFIG
    if not cfg_path.is_file():
        raise PipelineError("no run_config.json: the alpha sweep needs a tiny RLVR run "
                            "(its task and held-out seed)", run_dir)
    cfg = json.loads(cfg_path.read_text())
    return run_problems(cfg)[1]


def score_folder(folder: Path, problems: list) -> float:
    """Greedy held-out accuracy of the model saved in ``folder`` (loaded as users load it)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.rl.evaluate import greedy_accuracy

    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    return greedy_accuracy(model, tok, problems)


def alpha_sweep(
    run_dir: str | Path,
    t0: int | None = None,
    t1: int | None = None,
    alphas: Sequence[float] | None = None,
    methods: Sequence[str] = (M.DEFAULT_METHOD,),
    params: Mapping[str, float] | None = None,
    log: object = None,
) -> list[SweepRow]:
    """Score extrapolated models for each alpha (and method) against the real run.

    Defaults: t0 = first checkpoint, t1 = the middle one, and alphas that
    land on every later real checkpoint, so each row has a real comparison.
    Window methods use every checkpoint from t0 to t1 and the same target
    step. ``params`` (e.g. ``r2_min``) go to the methods that take them;
    one a method needs and is not given takes its registered typical value.
    """
    run_dir = Path(run_dir)
    chosen = [M.get(m) for m in methods]
    given = {k: M.param(k).check(v) for k, v in (params or {}).items()}
    if alphas is not None:
        alphas = [check_number(a, "--alpha") for a in alphas]
        if not alphas:
            raise PipelineError("no --alpha given")
    problems = heldout_problems(run_dir)
    src = CheckpointSource.from_run_dir(run_dir)
    steps = src.steps
    t0 = steps[0] if t0 is None else t0
    t1 = steps[len(steps) // 2] if t1 is None else t1
    for s in (t0, t1):
        if s not in steps:
            raise PipelineError(f"step {s} is not a checkpoint of the run (has {steps})", run_dir)
    if t1 <= t0:
        raise PipelineError(f"need t0 < t1, got {t0}, {t1}")
    if alphas is None:
        alphas = [(s - t0) / (t1 - t0) for s in steps if s >= t1]
    real_cache: dict[int, float] = {}

    def real(step: int) -> float:
        if step not in real_cache:
            real_cache[step] = score_folder(src.reader(step).folder, problems)
        return real_cache[step]

    rows: list[SweepRow] = []
    window = [s for s in steps if t0 <= s <= t1]
    with tempfile.TemporaryDirectory(prefix="alpha-sweep-") as tmp:
        for m in chosen:
            kw = {**m.typical_params(), **m.select(given)}
            for a in alphas:
                target = t0 + a * (t1 - t0)
                if m.step_rule == "pair":
                    spec = make_spec(src, m.name, alpha=a, steps=[t0, t1],
                                     allow_interpolation=True, **kw)
                else:
                    spec = make_spec(src, m.name, to=target, steps=window,
                                     allow_interpolation=True, **kw)
                out = Path(tmp) / f"{m.name}-{a:g}"
                export(src, out, spec)
                acc = score_folder(out, problems)
                t_int = round(target)
                real_acc = real(t_int) if abs(target - t_int) < 1e-9 and t_int in steps else None
                rows.append(SweepRow(m.label(spec.param_values), t0, t1, float(a),
                                     float(target), acc, real_acc, real(t1)))
                if callable(log):
                    log(rows[-1])
    return rows


def rows_as_dicts(rows: Sequence[SweepRow]) -> list[dict]:
    return [asdict(r) for r in rows]
