"""Verifiable tasks: a prompt, one exact answer, and a 0/1 reward.

RLVR needs a reward a program can check. The tasks sit in a registry so a
run names its task in ``run_config.json`` and every later stage (held-out
scoring, the alpha sweep) rebuilds the same problems from the name and seed.
Difficulty matters for the science: a task the policy saturates early gives
curved weight trajectories (learning stops), one it keeps learning gives
straight ones.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


Split = tuple[list[Problem], list[Problem]]


@dataclass(frozen=True)
class Task:
    """A named problem generator: ``make(seed, n_heldout) -> (train, held-out)``."""

    name: str
    description: str
    make: Callable[[int, int], Split]


def _split(problems: list[Problem], seed: int, n_heldout: int) -> Split:
    """Shuffle by ``seed`` and hold the first ``n_heldout`` out (never trained on)."""
    random.Random(seed).shuffle(problems)
    return problems[n_heldout:], problems[:n_heldout]


def addition_problems(seed: int, n_heldout: int = 256) -> Split:
    """All ``ab+cd=`` problems with two-digit operands, split into (train, held-out).

    The split depends only on ``seed`` so the held-out set never leaks into the
    warm start or the RL prompts of the same run.
    """
    problems = [Problem(f"{a}+{b}=", str(a + b)) for a in range(10, 100) for b in range(10, 100)]
    return _split(problems, seed, n_heldout)


def three_digit_addition(seed: int, n_heldout: int = 256, n_total: int = 40_000) -> Split:
    """A seeded sample of ``abc+def=`` problems: carries over three columns, harder to saturate."""
    rng = random.Random(f"add3:{seed}")
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < n_total:
        pairs.add((rng.randrange(100, 1000), rng.randrange(100, 1000)))
    problems = [Problem(f"{a}+{b}=", str(a + b)) for a, b in sorted(pairs)]
    return _split(problems, seed, n_heldout)


def add_subtract_problems(seed: int, n_heldout: int = 256) -> Split:
    """Two-digit ``a+b`` and ``a-b`` (answers may be negative): two skills to learn at once."""
    problems = [Problem(f"{a}{op}{b}=", str(a + b if op == "+" else a - b))
                for a in range(10, 100) for b in range(10, 100) for op in "+-"]
    return _split(problems, seed, n_heldout)


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("add2", "two-digit addition (8,100 problems)", addition_problems),
    Task("add3", "three-digit addition (40,000 sampled problems)", three_digit_addition),
    Task("addsub2", "two-digit addition and subtraction (16,200 problems)",
         add_subtract_problems),
]}


def task_problems(task: str, seed: int, n_heldout: int = 256) -> Split:
    """(train, held-out) problems of a registered task."""
    if task not in TASKS:
        raise PipelineError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    return TASKS[task].make(seed, n_heldout)


def run_problems(run_config: Mapping[str, Any]) -> Split:
    """The problems of a generated run, from its ``run_config.json`` (older runs: add2)."""
    return task_problems(str(run_config.get("task", "add2")), int(run_config["seed"]),
                         int(run_config.get("n_heldout", 256)))


def exact_match_reward(completions: list[str], answer: list[str], **_: object) -> list[float]:
    """1.0 when the completion (up to end of sequence/whitespace) is the answer, else 0.0.

    Signature follows TRL's reward-function convention: dataset columns come
    in as keyword lists aligned with ``completions``.
    """
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer, strict=True)]
