"""Evaluation tasks: the math-verify grader on hand-written completions, and bad task input."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import PipelineError
from pipeline.evaluation.tasks import EvalProblem, get_task, last_boxed, math_verify_grade


def _jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.mark.parametrize("text, inner", [
    (r"so \boxed{1/2}.", "1/2"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are not nesting
    (r"first \boxed{3}, then \boxed{4}", "4"),  # the last one wins
    (r"\boxed{3} and then \boxed{\frac{1}{", "3"),  # an unclosed last box is no answer
    (r"\boxed {x^{2}}", "x^{2}"),
    ("no box: 5", None),
])
def test_last_boxed(text, inner):
    assert last_boxed(text) == inner


@pytest.mark.parametrize("completion, answer, ok", [
    (r"The answer is \boxed{1/2}.", "0.5", True),
    (r"\boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    (r"\boxed{1+x^2}", "x^2+1", True),
    (r"\boxed{\{2,1\}}", r"\{1,2\}", True),
    (r"I think \boxed{3}. Wait, no: \boxed{4}", "4", True),
    (r"I think \boxed{4}. Wait, no: \boxed{3}", "4", False),
    ("The answer is 4.", "4", False),  # no boxed answer = wrong, even when the text is right
    (r"\boxed{}", "4", False),
    (r"\boxed{5}", "4", False),
    (r"\boxed{\sqrt{2}}", "2^{1/2}", True),
])
def test_math_verify_grade_on_hand_written_completions(completion, answer, ok):
    assert math_verify_grade(completion, EvalProblem("0", "q", answer)) is ok


def test_math_jsonl_task_reads_ids_and_grades(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [{"prompt": "1/2 as a decimal?", "answer": "0.5"},
                                      {"prompt": "2+2?", "answer": 4, "id": "four"}])
    task = get_task(f"math-jsonl:{f}")
    assert [(p.id, p.answer) for p in task.problems] == [("1", "0.5"), ("four", "4")]
    assert task.grade(r"\boxed{4}", task.problems[1])
    assert task.head(1).problems == task.problems[:1]
    assert task.head(1).fingerprint != task.fingerprint


@pytest.mark.parametrize("lines, match", [
    (['{"prompt": "a", "answer": "1"}', '{"prompt": "b"}'], r"p\.jsonl:2: missing field 'answer'"),
    (['{"prompt": "a", "answer": "1"}', "{oops"], r"p\.jsonl:2: not valid JSON"),
    (['{"prompt": "a", "answer": "1", "id": 7}', '{"prompt": "b", "answer": "2", "id": "7"}'],
     r"p\.jsonl:2: id '7' already used on line 1"),
    (['{"prompt": "a", "answer": ""}'], r"p\.jsonl:1: math-verify cannot parse the answer"),
    ([""], r"no problems in the file"),
])
def test_bad_math_jsonl_is_named_by_file_and_line(tmp_path, lines, match):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(PipelineError, match=match):
        get_task(f"math-jsonl:{f}")


def test_unknown_task_names_the_known_ones():
    with pytest.raises(PipelineError, match=r"unknown --task 'gsm8k'.*heldout\[:RUN\].*math-jsonl"):
        get_task("gsm8k")


def test_math_jsonl_needs_a_path_and_heldout_needs_a_run(tmp_path):
    with pytest.raises(PipelineError, match="math-jsonl:PATH"):
        get_task("math-jsonl")
    with pytest.raises(PipelineError, match="cannot read"):
        get_task(f"math-jsonl:{tmp_path / 'missing.jsonl'}")
    with pytest.raises(PipelineError, match="heldout:RUN"):
        get_task("heldout", [tmp_path])
