"""The verifiable tasks: exact answers, deterministic disjoint splits, registry lookup."""

from __future__ import annotations

import pytest

from pipeline.errors import PipelineError
from pipeline.rl.char_tokenizer import DEFAULT_ALPHABET
from pipeline.rl.tasks import TASKS, exact_match_reward, run_problems, task_problems


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_has_exact_answers_and_a_disjoint_seeded_split(name):
    train, held = task_problems(name, seed=3, n_heldout=100)
    assert len(held) == 100 and len(train) > 1000
    assert not {p.prompt for p in held} & {p.prompt for p in train}
    assert task_problems(name, 3, 100) == (train, held)
    assert task_problems(name, 4, 100)[1] != held
    for p in held + train[:500]:
        assert set(p.prompt + p.answer) <= set(DEFAULT_ALPHABET)  # the tokenizer has them all
        assert eval(p.prompt[:-1]) == int(p.answer)  # noqa: S307 - our own digits and +/-
    assert exact_match_reward([held[0].answer, "x"], [held[0].answer, held[1].answer]) == \
        [1.0, 0.0]


def test_old_runs_without_a_task_are_two_digit_addition_and_unknown_tasks_fail():
    assert run_problems({"seed": 1}) == task_problems("add2", 1)
    with pytest.raises(PipelineError, match="unknown task"):
        task_problems("chess", 0)
