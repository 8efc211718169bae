"""Decoding and logits extrapolation on real tiny checkpoints, against transformers itself.

References: ``model.generate`` (greedy, left-padded batches),
``UnbatchedClassifierFreeGuidanceLogitsProcessor`` (the same mix written as
log-prob guidance), ``TopK/TopPLogitsWarper`` and plain ``torch.softmax``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import (
    LogitsProcessorList,
    TopKLogitsWarper,
    TopPLogitsWarper,
    UnbatchedClassifierFreeGuidanceLogitsProcessor,
)

from pipeline.errors import PipelineError
from pipeline.outputs.generate import (
    Completion,
    LogitsExtrapolation,
    Sampling,
    decode,
    extrapolation_processors,
    mix_logits,
)
from pipeline.outputs.models import load_model
from pipeline.outputs.sampling import choose, uniforms, warp

# different lengths (left padding matters), some outside the training range (longer answers)
PROMPTS = ["12+34=", "5+7=", "99+99=", "3+45=", "70+30=", "1+1=", "88+9=", "47+56="]
SAMPLED = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=6, seed=7)


@pytest.fixture(scope="module")
def pair(tiny_run_linear):
    """Early and late checkpoints of the linear run (float32)."""
    return (load_model(tiny_run_linear / "global_step_100"),
            load_model(tiny_run_linear / "global_step_200"))


@pytest.fixture(scope="module")
def first(tiny_run_linear):
    return load_model(tiny_run_linear / "global_step_0")


def hf_greedy(m, prompts, max_new_tokens, **kw) -> list[list[int]]:
    """transformers' own greedy generate on a left-padded batch, cut at EOS."""
    tok = m.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = m.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)
    return until_eos(out[:, enc.input_ids.shape[1]:], tok.eos_token_id)


def until_eos(new_ids: torch.Tensor, eos: int) -> list[list[int]]:
    return [r[:r.index(eos)] if eos in r else r for r in new_ids.tolist()]


def ids(cs: list[Completion]) -> list[list[int]]:
    return [c.token_ids for c in cs]


@pytest.mark.parametrize("max_new, batch_size", [(8, 3), (2, 16)])
def test_greedy_decode_equals_transformers_generate(pair, max_new, batch_size):
    late = pair[1]
    ref = hf_greedy(late, PROMPTS, max_new)
    got = list(decode([late], PROMPTS, 2, Sampling(temperature=0.0, max_new_tokens=max_new),
                      batch_size=batch_size))
    assert [(c.prompt_index, c.sample) for c in got] == [(p, s) for p in range(8) for s in (0, 1)]
    assert ids(got) == [r for r in ref for _ in (0, 1)]
    for c in got:
        assert c.prompt_ids == late.tokenizer(PROMPTS[c.prompt_index])["input_ids"]
        assert c.text == late.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert c.finish == ("length" if len(c.token_ids) == max_new else "eos")
    # the warm-started model writes 2-3 digits then EOS: both endings are exercised
    assert ("eos" if max_new == 8 else "length") in {c.finish for c in got}


def test_pair_at_alpha_1_and_0_is_each_model_bitwise(pair, first):
    """alpha 1 = the late model's own decoding, alpha 0 = the early one's, greedy and sampled."""
    early, late = first, pair[1]
    for s in (Sampling(temperature=0.0, max_new_tokens=6), SAMPLED,
              replace(SAMPLED, temperature=1.7, top_k=5, top_p=1.0)):
        own_late = list(decode([late], PROMPTS, 3, s, batch_size=5))
        own_early = list(decode([early], PROMPTS, 3, s, batch_size=5))
        assert list(decode([early, late], PROMPTS, 3, s, alpha=1.0, batch_size=5)) == own_late
        assert list(decode([early, late], PROMPTS, 3, s, alpha=0.0, batch_size=5)) == own_early
        assert ids(own_late) != ids(own_early)  # the two models really decode differently


def test_mix_is_exact_at_the_ends_and_linear_between():
    g = torch.Generator().manual_seed(0)
    za, zb = torch.randn(4, 50, generator=g) * 9, torch.randn(4, 50, generator=g) * 9
    assert torch.equal(mix_logits(za, zb, 1.0), zb) and torch.equal(mix_logits(za, zb, 0.0), za)
    torch.testing.assert_close(mix_logits(za, zb, 1.5), za + 1.5 * (zb - za))
    assert not torch.equal(za + 1.0 * (zb - za), zb)  # why lerp: the textbook form rounds


def test_sampling_is_reproducible_and_independent_of_batching(pair):
    late = pair[1]
    a = list(decode([late], PROMPTS, 4, SAMPLED, batch_size=3))
    assert list(decode([late], PROMPTS, 4, SAMPLED, batch_size=32)) == a
    assert list(decode([late], PROMPTS[:1], 4, SAMPLED, batch_size=1)) == a[:4]
    other = list(decode([late], PROMPTS, 4, replace(SAMPLED, seed=8), batch_size=3))
    assert ids(other) != ids(a)
    assert len({tuple(c.token_ids) for c in a}) > len(PROMPTS)  # samples of a prompt differ


def test_prefill_runs_once_per_unique_prompt(pair):
    """k samples share one prefill: the first forward pass sees one row per prompt."""
    late = pair[1]
    seen: list[tuple[int, int]] = []
    hook = late.model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        list(decode([late], PROMPTS[:3], 5, SAMPLED, batch_size=15))
    finally:
        hook.remove()
    assert seen[0] == (3, 6)  # 3 unique prompts, left-padded to 6 tokens
    assert all(s[1] == 1 for s in seen[1:]) and seen[1][0] == 15


def test_processor_matches_cfg_guidance_and_decode(pair):
    """Our mix = transformers' CFG processor (early model unconditional) after log_softmax.

    log_softmax(z_a + alpha (z_b - z_a)) = log_softmax(alpha lp_b + (1 - alpha) lp_a), which
    is exactly what ``UnbatchedClassifierFreeGuidanceLogitsProcessor`` returns (before its
    own renormalisation); it runs the early model without our code.
    """
    early, late = pair
    alpha = 1.5
    prompts = ["12+34=", "57+68=", "90+11=", "23+23="]  # one length: CFG takes no padding
    enc = late.tokenizer(prompts, return_tensors="pt")
    kw = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True,
              pad_token_id=late.tokenizer.pad_token_id, eos_token_id=late.tokenizer.eos_token_id)
    cfg = UnbatchedClassifierFreeGuidanceLogitsProcessor(
        alpha, early.model, unconditional_ids=enc.input_ids, use_cache=False)
    ref = late.model.generate(**enc, logits_processor=LogitsProcessorList([cfg]), **kw)
    ours = late.model.generate(**enc, logits_processor=extrapolation_processors(early, alpha), **kw)
    assert torch.equal(ours.sequences, ref.sequences)
    for s_ref, s_ours in zip(ref.scores, ours.scores, strict=True):
        torch.testing.assert_close(s_ours.log_softmax(-1), s_ref.log_softmax(-1),
                                   atol=2e-5, rtol=1e-5)
    got = list(decode([early, late], prompts, 1, Sampling(temperature=0.0, max_new_tokens=5),
                      alpha=alpha))
    n = enc.input_ids.shape[1]
    want = until_eos(ours.sequences[:, n:], late.tokenizer.eos_token_id)
    assert ids(got) == want
    own = late.model.generate(**enc, **kw)  # alpha 1.5 really moves the scores: not vacuous
    assert (own.scores[0].log_softmax(-1) - ours.scores[0].log_softmax(-1)).abs().max() > 1e-2


def test_processor_with_left_padding(pair):
    early, late = pair
    enc = late.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    s = Sampling(temperature=0.0, max_new_tokens=6)
    procs = extrapolation_processors(early, 1.5, attention_mask=enc.attention_mask)
    via_hf = hf_greedy(late, PROMPTS, 6, logits_processor=procs)
    assert via_hf == ids(decode([early, late], PROMPTS, 1, s, alpha=1.5))
    # alpha 1: the processor leaves the late model's own greedy decoding unchanged
    at_1 = hf_greedy(late, PROMPTS, 6, logits_processor=[
        LogitsExtrapolation(early, 1.0, attention_mask=enc.attention_mask)])
    assert at_1 == hf_greedy(late, PROMPTS, 6)


def test_stop_strings_end_a_completion_after_the_stop(pair):
    late = pair[1]
    s = Sampling(temperature=0.0, max_new_tokens=6)
    free = list(decode([late], PROMPTS, 1, s))
    stopped = list(decode([late], PROMPTS, 1, replace(s, stop=("1",))))
    for f, c in zip(free, stopped, strict=True):
        if "1" in f.text:
            cut = f.text.index("1") + 1  # one character per token here
            assert c.token_ids == f.token_ids[:cut] and c.finish == "stop"
            assert c.text.endswith("1") and "1" not in c.text[:-1]
        else:
            assert c == f
    assert any(c.finish == "stop" for c in stopped) and any(c.finish == "eos" for c in stopped)


def test_warpers_match_transformers():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 40, generator=g) * 3
    for top_k, top_p in ((5, 1.0), (0, 0.8), (7, 0.5), (0, 1e-6)):
        s = Sampling(temperature=0.7, top_k=top_k, top_p=top_p)
        ref = z / 0.7
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(None, ref)
        assert torch.equal(torch.isinf(warp(z, s)), torch.isinf(ref))
        torch.testing.assert_close(warp(z, s).softmax(-1), ref.double().softmax(-1))


def test_a_tiny_temperature_is_greedy_not_nan():
    z = torch.tensor([[1.0, 3.0, 2.0, 3.0 - 1e-6]])
    u = torch.tensor([0.999])
    assert choose(z, Sampling(temperature=1e-300), u).tolist() == [1]


def test_draws_follow_the_softmax():
    """Counter-based draws: frequencies match plain softmax; removed tokens never appear."""
    z = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0, -3.0]])
    n = 40_000
    rows = z.expand(n, -1)
    u = torch.from_numpy(uniforms(3, np.zeros(n, dtype=np.int64), np.arange(n), step=0))
    for s in (Sampling(temperature=1.3), Sampling(top_k=3), Sampling(top_p=0.7)):
        tok = choose(rows, s, u)
        freq = torch.bincount(tok, minlength=6).double() / n
        p = warp(z, s).double().softmax(-1)[0]
        assert torch.all(freq[p == 0] == 0)
        assert torch.allclose(freq, p, atol=4 * float(np.sqrt(0.25 / n)))
    assert torch.equal(choose(z, Sampling(temperature=0.0)), torch.tensor([0]))


def test_uniforms_depend_on_every_key():
    base = uniforms(0, np.array([1]), np.array([2]), 3)
    assert 0 <= base[0] < 1
    for other in (uniforms(1, np.array([1]), np.array([2]), 3),
                  uniforms(0, np.array([2]), np.array([2]), 3),
                  uniforms(0, np.array([1]), np.array([3]), 3),
                  uniforms(0, np.array([1]), np.array([2]), 4),
                  uniforms(0, np.array([2]), np.array([1]), 3)):
        assert other[0] != base[0]


@pytest.mark.parametrize("kw, needle", [
    (dict(k=0), "-k must be >= 1"),
    (dict(sampling=Sampling(top_p=0.0)), "--top-p must be > 0"),
    (dict(sampling=Sampling(top_p=1.5)), "--top-p must be <= 1"),
    (dict(sampling=Sampling(temperature=-1.0)), "--temperature must be >= 0"),
    (dict(sampling=Sampling(max_new_tokens=60)), "exceeds the model's context of 64"),
    (dict(alpha=float("nan")), "--alpha must be a finite number"),
    (dict(batch_size=0), "--batch-size must be >= 1"),
])
def test_bad_arguments_fail_before_decoding(pair, kw, needle):
    args = dict(models=list(pair), prompts=PROMPTS, k=2, sampling=Sampling(), alpha=1.5)
    with pytest.raises(PipelineError) as e:
        decode(**{**args, **kw})
    assert needle in str(e.value)


def test_one_model_takes_no_alpha_and_vocabularies_must_match(pair, tmp_path):
    from pipeline.rl.char_tokenizer import build_char_tokenizer
    from pipeline.rl.tiny_model import ModelSize, build_model

    with pytest.raises(PipelineError, match="needs two models"):
        decode([pair[1]], PROMPTS, 1, Sampling(), alpha=2.0)
    tok = build_char_tokenizer("0123456789+=")
    build_model("qwen2", ModelSize(), tok, tie=False, seed=0).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    other = load_model(tmp_path / "m")
    with pytest.raises(PipelineError, match="vocabularies differ|tokenizers differ"):
        decode([other, pair[1]], PROMPTS, 1, Sampling())


# ---- the command line -------------------------------------------------------------------------

def cli(*args: str):
    from typer.testing import CliRunner

    from pipeline.cli import app

    return CliRunner().invoke(app, ["generate", *args, "--no-progress"])


@pytest.fixture
def prompts_file(tmp_path):
    import json

    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "answer": str(eval(p[:-1]))}) + "\n"
                         for p in PROMPTS))
    return f


def test_generate_command_writes_decode_output(pair, tiny_run_linear, prompts_file, tmp_path):
    import json

    out = tmp_path / "out.jsonl"
    r = cli("--early", str(tiny_run_linear / "global_step_100"),
            "--late", str(tiny_run_linear / "global_step_200"), "--steps", "100", "200",
            "--to", "250", "--prompts", str(prompts_file), "--out", str(out), "-k", "2",
            "--temperature", "0.8", "--top-k", "6", "--max-new-tokens", "5", "--seed", "3",
            "--batch-size", "5")
    assert r.exit_code == 0, r.output
    assert "Completions written to" in r.output
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    s = Sampling(temperature=0.8, top_k=6, top_p=0.95, max_new_tokens=5, seed=3)
    ref = list(decode(list(pair), PROMPTS, 2, s, alpha=1.5))
    assert [(d["prompt_index"], d["sample"], d["prompt_ids"], d["token_ids"], d["text"],
             d["finish"]) for d in recs] == \
        [(c.prompt_index, c.sample, c.prompt_ids, c.token_ids, c.text, c.finish) for c in ref]
    assert all(d["alpha"] == 1.5 and d["answer"] == str(eval(d["prompt"][:-1])) for d in recs)


@pytest.mark.parametrize("args, needle", [
    (["--alpha", "-0.5"], "pass --allow-negative"),
    (["--steps", "100", "200", "--to", "50"], "alpha -0.5 is negative"),
    (["--steps", "100", "200"], "give --alpha or --to (one of them)"),
    (["--alpha", "2", "--to", "300"], "give --alpha or --to (one of them)"),
    (["--steps", "200", "100", "--to", "300"], "give the early model first"),
    (["--steps", "100", "100", "--to", "300"], "two different steps"),
    (["--alpha", "2", "-k", "0"], "-k must be >= 1"),
    (["--alpha", "2", "--top-p", "0"], "--top-p must be > 0"),
    (["--alpha", "2", "--temperature", "-1"], "--temperature must be >= 0"),
    (["--alpha", "2", "--max-new-tokens", "59"], "exceeds the model's context of 64"),
    (["--alpha", "nan"], "--alpha must be a finite number"),
    (["--alpha", "2", "--dtype", "float8"], "unknown dtype 'float8'"),
    (["--alpha", "2", "--device", "tpu"], "unknown --device 'tpu'"),
    (["--alpha", "2", "--stop", ""], "--stop must be non-empty strings"),
])
def test_generate_bad_input_is_one_line_and_writes_nothing(tiny_run_linear, prompts_file,
                                                           tmp_path, args, needle):
    out = tmp_path / "out.jsonl"
    r = cli("--early", str(tiny_run_linear / "global_step_100"),
            "--late", str(tiny_run_linear / "global_step_200"),
            "--prompts", str(prompts_file), "--out", str(out), *args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["prompts.jsonl"]


def test_generate_refuses_a_bad_prompts_file_and_other_vocabularies(tiny_run_linear, tmp_path):
    from pipeline.rl.char_tokenizer import build_char_tokenizer
    from pipeline.rl.tiny_model import ModelSize, build_model

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1="}\n{"prompt": 5}\n')
    late = str(tiny_run_linear / "global_step_200")
    r = cli("--late", late, "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl"))
    assert r.exit_code == 2 and f"{bad}:2: field 'prompt' must be str" in r.output
    tok = build_char_tokenizer("0123456789+=")
    build_model("qwen2", ModelSize(), tok, tie=False, seed=0).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    bad.write_text('{"prompt": "1+1="}\n')
    r = cli("--early", str(tmp_path / "m"), "--late", late, "--alpha", "2",
            "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl"))
    assert r.exit_code == 2 and "differ" in r.output
    r = cli("--late", late, "--prompts", str(bad), "--out", str(bad))
    assert r.exit_code == 2 and "choose another --out" in r.output
    assert not (tmp_path / "o.jsonl").exists() and bad.read_text() == '{"prompt": "1+1="}\n'


def test_dropping_finished_rows_changes_nothing(pair, monkeypatch):
    """Compacting the caches (rows done at different steps) = decoding every row to the end."""
    import pipeline.outputs.generate as gen

    early, late = pair
    s = replace(SAMPLED, temperature=1.5, max_new_tokens=8)
    compacted = list(decode([early, late], PROMPTS, 3, s, alpha=1.5, batch_size=7))
    monkeypatch.setattr(gen, "COMPACT_FRACTION", 2.0)  # never compact
    assert list(decode([early, late], PROMPTS, 3, s, alpha=1.5, batch_size=7)) == compacted
    assert len({len(c.token_ids) for c in compacted}) > 1  # rows did finish at different steps


def test_processor_restarts_on_a_new_generate_call(pair):
    """One processor object reused across generate calls (new prompt, one token longer)."""
    early, late = pair
    proc = LogitsExtrapolation(early, 1.5)
    kw = dict(max_new_tokens=1, do_sample=False, pad_token_id=late.tokenizer.pad_token_id)
    first = late.tokenizer(["12+34="], return_tensors="pt")
    late.model.generate(**first, logits_processor=[proc], **kw)
    second = late.tokenizer(["1+2+34="], return_tensors="pt")  # one longer, not a continuation
    fresh = late.model.generate(**second, logits_processor=[LogitsExtrapolation(early, 1.5)],
                                output_scores=True, return_dict_in_generate=True, **kw)
    reused = late.model.generate(**second, logits_processor=[proc], output_scores=True,
                                 return_dict_in_generate=True, **kw)
    assert torch.equal(fresh.scores[0], reused.scores[0])


def test_processor_list_samples_after_the_mix(pair):
    """The documented sampled use: the warpers run after the mix (top-k 1 = greedy mix)."""
    early, late = pair
    enc = late.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    procs = extrapolation_processors(early, 1.5, Sampling(temperature=0.7, top_k=1),
                                     attention_mask=enc.attention_mask)
    tok = late.tokenizer
    out = late.model.generate(**enc, logits_processor=procs, do_sample=True, temperature=1.0,
                              top_p=1.0, top_k=0, max_new_tokens=6,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    sampled = until_eos(out[:, enc.input_ids.shape[1]:], tok.eos_token_id)
    greedy = decode([early, late], PROMPTS, 1, Sampling(temperature=0.0, max_new_tokens=6),
                    alpha=1.5)
    assert sampled == ids(greedy)


def test_bf16_checkpoints_keep_both_guarantees(tiny_run_bf16):
    """bf16 logits are mixed in float32: greedy = transformers, alpha 1 = the late model."""
    early = load_model(tiny_run_bf16 / "global_step_0")
    late = load_model(tiny_run_bf16 / "global_step_100")
    assert next(late.model.parameters()).dtype == torch.bfloat16
    greedy = Sampling(temperature=0.0, max_new_tokens=6)
    assert ids(decode([late], PROMPTS, 1, greedy, batch_size=3)) == hf_greedy(late, PROMPTS, 6)
    s = replace(SAMPLED, temperature=1.5)
    assert list(decode([early, late], PROMPTS, 2, s, alpha=1.0)) == \
        list(decode([late], PROMPTS, 2, s))


def test_sampled_first_tokens_follow_the_mixed_distribution(pair):
    """Frequencies of k draws = softmax of the mix from plain forward passes (no cache)."""
    early, late = pair
    prompt, n, alpha = "47+56=", 4000, 1.5
    s = Sampling(temperature=3.0, max_new_tokens=1, seed=11)
    got = list(decode([early, late], [prompt], n, s, alpha=alpha, batch_size=n))
    eos = late.tokenizer.eos_token_id
    first = torch.tensor([c.token_ids[0] if c.token_ids else eos for c in got])
    x = torch.tensor([late.tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        za, zb = early.model(x).logits[0, -1], late.model(x).logits[0, -1]
    p = ((za + alpha * (zb - za)) / 3.0).double().softmax(-1)
    freq = torch.bincount(first, minlength=p.numel()).double() / n
    assert (p > 0.02).sum() >= 2  # a spread distribution, or the check says little
    assert torch.allclose(freq, p, atol=4 * (0.25 / n) ** 0.5)
