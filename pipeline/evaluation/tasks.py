"""Evaluation tasks: problems with reference answers, and how a completion is graded.

A task is named on the command line as ``KIND`` or ``KIND:ARG`` and built by
its kind in ``TASK_KINDS``, so the CLI's help and choices come from one
registry. Two kinds ship:

- ``heldout[:RUN]``: the held-out split of a tiny RLVR run, rebuilt from its
  ``run_config.json`` exactly as training split it, graded by the training
  reward (exact match), so evaluation scores what RL optimised.
- ``math-jsonl:PATH``: JSONL records ``{"prompt", "answer", "id"?}`` graded by
  math-verify on the last ``\\boxed{...}`` of the completion (the convention
  of reasoning models: the final boxed expression is the answer).

math-verify guards its parsing with ``signal.alarm`` timeouts, which only
work in the main thread: grading must never be moved into a worker thread.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class EvalProblem:
    id: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class EvalTask:
    """Problems, a grader, and the decoding length that fits the task."""

    spec: str  # as written on the command line, e.g. "math-jsonl:aime24.jsonl"
    problems: list[EvalProblem]
    grade: Callable[[str, EvalProblem], bool]
    max_new_tokens: int  # default generation budget for this task

    @property
    def fingerprint(self) -> str:
        """Hash of the grader's kind and every (id, prompt, answer).

        An edited problems file is another task; the same file moved is not.
        """
        h = hashlib.sha256(self.spec.partition(":")[0].encode())
        for p in self.problems:
            h.update(json.dumps([p.id, p.prompt, p.answer]).encode())
        return h.hexdigest()

    def head(self, n: int | None) -> EvalTask:
        """The first ``n`` problems (all when None), e.g. for a quick look."""
        if n is None or n >= len(self.problems):
            return self
        return EvalTask(self.spec, self.problems[:n], self.grade, self.max_new_tokens)


# ---------------------------------------------------------------- heldout
RUN_CONFIG = "run_config.json"


def find_run_dir(model_folder: Path) -> Path | None:
    """The run a checkpoint folder belongs to: the nearest parent with a run_config.json.

    Three levels cover ``RUN/global_step_N`` and verl's
    ``RUN/global_step_N/actor/huggingface``.
    """
    for p in list(Path(model_folder).resolve().parents)[:3]:
        if (p / RUN_CONFIG).is_file():
            return p
    return None


def _exact_match(text: str, problem: EvalProblem) -> bool:
    from pipeline.rl.tasks import exact_match_reward

    return exact_match_reward([text], [problem.answer])[0] == 1.0


def heldout_task(arg: str | None, models: Sequence[Path], catalog: Path | None = None
                 ) -> EvalTask:
    from pipeline.catalog import resolve
    from pipeline.extrapolate.alpha_sweep import heldout_problems

    if arg:
        run_dir = resolve(arg, catalog).checkpoints
    else:
        found = {find_run_dir(m) for m in models}
        if len(found) != 1 or None in found:
            raise PipelineError("--task heldout: cannot tell which run's held-out split to use "
                                "(no run_config.json above the model folder, or models of "
                                "different runs); name it: --task heldout:RUN")
        run_dir = found.pop()
    problems = [EvalProblem(str(i), p.prompt, p.answer)
                for i, p in enumerate(heldout_problems(Path(run_dir)))]
    # as in training and in greedy_accuracy: one character per token, then end of sequence
    budget = max((len(p.answer) for p in problems), default=0) + 1
    return EvalTask(f"heldout:{Path(run_dir).resolve()}", problems, _exact_match, budget)


# ---------------------------------------------------------------- math-jsonl
_BOXED = re.compile(r"\\boxed\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}``, nested braces included.

    Escaped braces (``\\{``, ``\\}``) do not count. A ``\\boxed{`` that never
    closes (a completion cut by the length limit) is no answer; an earlier
    complete one still is.
    """
    found = None
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            ch = text[i]
            if ch == "\\":
                i += 2
                continue
            depth += (ch == "{") - (ch == "}")
            i += 1
        if depth == 0:
            found = text[m.end():i - 1]
    return found


def _parse(expr: str) -> list:
    from math_verify import parse

    return parse(f"${expr}$") or parse(expr)


def math_verify_grade(text: str, problem: EvalProblem) -> bool:
    """True when math-verify finds the last boxed expression equal to the reference."""
    from math_verify import verify

    boxed = last_boxed(text)
    if boxed is None or not boxed.strip():
        return False
    pred = _parse(boxed)
    return bool(pred) and bool(verify(_parse(problem.answer), pred))


def math_jsonl_task(arg: str | None, models: Sequence[Path], catalog: Path | None = None
                    ) -> EvalTask:
    from pipeline.outputs.records import iter_jsonl

    if not arg:
        raise PipelineError("--task math-jsonl needs a file: --task math-jsonl:PATH")
    path = Path(arg)
    problems, seen = [], {}
    for no, rec in iter_jsonl(path, {"prompt": str, "answer": (str, int, float)},
                              {"id": (str, int)}):
        pid = str(rec.get("id", no))
        if pid in seen:
            raise PipelineError(f"{path}:{no}: id {pid!r} already used on line {seen[pid]}")
        seen[pid] = no
        answer = str(rec["answer"])
        if not _parse(answer):
            raise PipelineError(f"{path}:{no}: math-verify cannot parse the answer {answer!r}")
        problems.append(EvalProblem(pid, rec["prompt"], answer))
    if not problems:
        raise PipelineError("no problems in the file", path)
    return EvalTask(f"math-jsonl:{path.resolve()}", problems, math_verify_grade, 1024)


# ---------------------------------------------------------------- registry
@dataclass(frozen=True)
class TaskKind:
    name: str
    syntax: str
    summary: str
    build: Callable[[str | None, Sequence[Path], Path | None], EvalTask]  # arg, models, catalog


TASK_KINDS: dict[str, TaskKind] = {k.name: k for k in [
    TaskKind("heldout", "heldout[:RUN]",
             "held-out split of a tiny RLVR run (run_config.json), exact-match reward; RUN "
             "defaults to the run holding the model", heldout_task),
    TaskKind("math-jsonl", "math-jsonl:PATH",
             'JSONL {"prompt", "answer", "id"?}, math-verify on the last \\boxed{}',
             math_jsonl_task),
]}


def tasks_help() -> str:
    return "; ".join(f"{k.syntax}: {k.summary}" for k in TASK_KINDS.values())


def get_task(spec: str, models: Sequence[Path] = (), catalog: Path | None = None) -> EvalTask:
    """Build ``KIND[:ARG]``; ``heldout`` finds its run from ``models`` or a name in ``catalog``."""
    kind, _, arg = spec.partition(":")
    if kind not in TASK_KINDS:
        raise PipelineError(f"unknown --task {spec!r} (known: "
                            f"{', '.join(k.syntax for k in TASK_KINDS.values())})")
    return TASK_KINDS[kind].build(arg or None, [Path(m) for m in models], catalog)
