"""Probe sets: what ``rlvr-lin probes`` saves is exactly what decoding produced."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.outputs.generate import Sampling, decode
from pipeline.outputs.models import load_model
from pipeline.outputs.records import read_probes

PROMPTS = ["12+34=", "5+7=", "99+99=", "70+30="]


def write_prompts(path, prompts=PROMPTS):
    path.write_text("".join(json.dumps({"prompt": p, "answer": str(eval(p[:-1]))}) + "\n"
                            for p in prompts))
    return path


def probes(*args: str):
    return CliRunner().invoke(app, ["probes", *args, "--no-progress"])


@pytest.fixture(scope="module")
def ckpt(tiny_run_fp32):
    return tiny_run_fp32 / "global_step_40"


def test_probe_ids_are_decode_output(ckpt, tmp_path):
    f = write_prompts(tmp_path / "p.jsonl")
    r = probes(str(ckpt), "--prompts", str(f), "--out", str(tmp_path / "probes.jsonl"),
               "-k", "3", "--temperature", "1.0", "--top-p", "0.9", "--max-new-tokens", "5",
               "--seed", "4")
    assert r.exit_code == 0, r.output
    got = read_probes(tmp_path / "probes.jsonl")
    ref = list(decode([load_model(ckpt)], PROMPTS, 3,
                      Sampling(temperature=1.0, top_p=0.9, max_new_tokens=5, seed=4)))
    assert [(p.prompt_index, p.sample, p.prompt_ids, p.response_ids, p.response) for p in got] \
        == [(c.prompt_index, c.sample, c.prompt_ids, c.token_ids, c.text) for c in ref]
    assert all(p.prompt == PROMPTS[p.prompt_index] for p in got)
    m = got[0].meta
    assert m["checkpoint"] == str(ckpt) and m["temperature"] == 1.0 and m["top_p"] == 0.9
    assert m["seed"] == 4 and m["max_new_tokens"] == 5 and m["answer"] == "46"
    assert {p.meta["finish"] for p in got} <= {"eos", "length"}


def test_greedy_probe_is_the_teacher_forced_argmax(ckpt, tmp_path):
    """Plain transformers, no cache: argmax after prompt + response[:i] is response[i]."""
    f = write_prompts(tmp_path / "p.jsonl")
    r = probes(str(ckpt), "--prompts", str(f), "--out", str(tmp_path / "g.jsonl"),
               "-k", "1", "--temperature", "0", "--max-new-tokens", "6")
    assert r.exit_code == 0, r.output
    m = load_model(ckpt)
    eos = m.tokenizer.eos_token_id
    for p in read_probes(tmp_path / "g.jsonl"):
        tail = [eos] if p.meta["finish"] == "eos" else []
        seq = torch.tensor([p.prompt_ids + p.response_ids + tail])
        with torch.no_grad():
            logits = m.model(seq).logits[0]
        n = len(p.prompt_ids)
        pred = logits[n - 1:-1].argmax(-1).tolist()
        assert pred == p.response_ids + tail


@pytest.mark.parametrize("args, needle", [
    (["-k", "0"], "-k must be >= 1"),
    (["--top-p", "1.5"], "--top-p must be <= 1"),
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--max-new-tokens", "70"], "exceeds the model's context"),
    (["--device", "tpu"], "unknown --device"),
])
def test_bad_options_leave_no_file(ckpt, tmp_path, args, needle):
    f = write_prompts(tmp_path / "p.jsonl")
    out = tmp_path / "x.jsonl"
    r = probes(str(ckpt), "--prompts", str(f), "--out", str(out), *args)
    assert r.exit_code == 2 and needle in r.output
    assert not out.exists() and [x.name for x in tmp_path.iterdir()] == ["p.jsonl"]


def test_bad_prompt_file_names_the_line(ckpt, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "1+1="}\n{"text": "2+2="}\n')
    r = probes(str(ckpt), "--prompts", str(f), "--out", str(tmp_path / "x.jsonl"))
    assert r.exit_code == 2 and f"{f}:2: missing field 'prompt'" in r.output
    assert not (tmp_path / "x.jsonl").exists()
