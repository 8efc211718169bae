"""Verifiable tasks: a prompt, one exact answer, and a 0/1 reward.

RLVR needs a reward a program can check. Two-digit addition is the smallest
task a tiny model can half-solve after a short warm start, which is what makes
the RL phase informative (reward has variance within a group).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


def addition_problems(seed: int, n_heldout: int = 256) -> tuple[list[Problem], list[Problem]]:
    """All ``ab+cd=`` problems with two-digit operands, split into (train, held-out).

    The split depends only on ``seed`` so the held-out set never leaks into the
    warm start or the RL prompts of the same run.
    """
    problems = [Problem(f"{a}+{b}=", str(a + b)) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(problems)
    return problems[n_heldout:], problems[:n_heldout]


def exact_match_reward(completions: list[str], answer: list[str], **_: object) -> list[float]:
    """1.0 when the completion (up to end of sequence/whitespace) is the answer, else 0.0.

    Signature follows TRL's reward-function convention: dataset columns come
    in as keyword lists aligned with ``completions``.
    """
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer, strict=True)]
