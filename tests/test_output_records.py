"""JSONL records and model loading shared by the output-space commands."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import PipelineError
from pipeline.outputs.models import check_same_vocab, load_model
from pipeline.outputs.records import Appender, Probe, read_probes, read_prompts, write_probes


def test_prompts_and_probes_round_trip(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "12+34=", "answer": 46}\n\n{"prompt": "1+1=", "id": "x"}\n')
    ps = read_prompts(f)
    assert [(p.text, p.answer, p.id) for p in ps] == [("12+34=", "46", "1"), ("1+1=", None, "x")]
    probes = [Probe(0, 1, "1+1=", [1, 5, 4], "2", [6, 2], {"step": 3})]
    write_probes(tmp_path / "probes.jsonl", probes)
    assert read_probes(tmp_path / "probes.jsonl") == probes


@pytest.mark.parametrize("text, needle", [
    ('{"prompt": "a"}\n{"prompt": 3}\n', ":2: field 'prompt' must be str"),
    ('{"prompt": "a"}\nnot json\n', ":2: not valid JSON"),
    ('{"answer": "a"}\n', ":1: missing field 'prompt'"),
    ('[1, 2]\n', ":1: expected a JSON object"),
    ('\n\n', "no prompts"),
])
def test_bad_prompt_files_name_the_line(tmp_path, text, needle):
    f = tmp_path / "p.jsonl"
    f.write_text(text)
    with pytest.raises(PipelineError, match=None) as e:
        read_prompts(f)
    assert needle in str(e.value) and str(f) in str(e.value)


def test_bad_probe_ids_are_refused(tmp_path):
    rec = {"prompt_index": 0, "sample": 0, "prompt": "a", "prompt_ids": [1, -2],
           "response": "b", "response_ids": [3]}
    f = tmp_path / "probes.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    with pytest.raises(PipelineError, match=r":1: field 'prompt_ids' must be a list of token ids"):
        read_probes(f)


def test_appender_keeps_whole_lines_and_cuts_a_torn_one(tmp_path):
    f = tmp_path / "r.jsonl"
    with Appender(f) as a:
        a.append({"i": 0})
        a.append({"i": 1})
    with open(f, "a") as fh:
        fh.write('{"i": 2')  # a crash mid-line
    with Appender(f) as a:
        assert a.existing == [{"i": 0}, {"i": 1}]
        a.append({"i": 2})
    assert [json.loads(x) for x in f.read_text().splitlines()] == [{"i": i} for i in range(3)]


def test_models_with_different_vocabularies_are_refused(tmp_path, tiny_run_fp32):
    from transformers import AutoTokenizer

    from pipeline.rl.char_tokenizer import build_char_tokenizer

    step0 = tiny_run_fp32 / "global_step_0"
    a = load_model(step0)
    check_same_vocab(a, load_model(tiny_run_fp32 / "global_step_40"))
    other = tmp_path / "other"
    a.model.save_pretrained(other)
    build_char_tokenizer("0123456789+-*=?! ").save_pretrained(other)  # one more character
    b = load_model(other)
    assert len(AutoTokenizer.from_pretrained(other)) == len(a.tokenizer) + 1
    with pytest.raises(PipelineError, match="tokenizers differ"):
        check_same_vocab(a, b)
    with pytest.raises(PipelineError, match="not a model folder"):
        load_model(tmp_path)
