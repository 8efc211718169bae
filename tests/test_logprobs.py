"""Token log-prob linearity on real tiny checkpoints, against an independent float64 reference.

The reference is the plain way: each sequence alone through the model's own
forward in float64, ``log_softmax`` over the whole vocabulary. Probes are
real completions of a checkpoint (``model.generate``, greedy and sampled)
plus hand-written ones of other lengths, an empty response and a blank line
in the file (so line numbers and token columns must be tracked, not assumed).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.checkpoints.discover import discover_checkpoints
from pipeline.errors import PipelineError
from pipeline.outputs.logprob_store import LogprobStore, compute_logprobs
from pipeline.outputs.models import load_model
from pipeline.outputs.records import Probe, write_probes
from pipeline.outputs.teacher_forcing import check_head, plan_batches, teacher_force
from pipeline.outputs.token_fit import SUMMARY_FILE, fit_tokens
from pipeline.rl.tasks import run_problems

ATOL = 3e-5  # float32 log-softmax of a ~100-dim hidden state vs float64


def make_probes(run: Path, n_prompts: int = 10) -> list[Probe]:
    """Greedy and sampled completions of held-out prompts by the run's first checkpoint."""
    cfg = json.loads((run / "run_config.json").read_text())
    _, held = run_problems(cfg)
    lm = load_model(run / "global_step_0")
    tok = lm.tokenizer
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    out = []
    for i, prob in enumerate(held[:n_prompts]):
        ids = tok(prob.prompt)["input_ids"]
        for s in range(2):
            with torch.no_grad():
                seq = lm.model.generate(torch.tensor([ids]), max_new_tokens=3 + 2 * s,
                                        do_sample=s == 1, pad_token_id=tok.pad_token_id)
            resp = seq[0, len(ids):].tolist()
            if tok.eos_token_id in resp:
                resp = resp[:resp.index(tok.eos_token_id) + 1]
            out.append(Probe(i, s, prob.prompt, ids, tok.decode(resp), resp))
    # other lengths: a long prompt with a long response, an empty response, a one-token prompt
    long_prompt = tok("12+34=46 56+11=67 20+")["input_ids"]
    rand = torch.randint(4, 20, (25,), generator=gen).tolist()
    out.insert(3, Probe(90, 0, "long", long_prompt, "", rand))
    out.insert(7, Probe(91, 0, "empty", long_prompt[:6], "", []))
    out.append(Probe(92, 0, "one", [5], "", torch.randint(4, 20, (9,), generator=gen).tolist()))
    return out


def write_with_blank(path: Path, probes: list[Probe]) -> Path:
    """The probes file with a blank second line (line numbers != probe index + 1)."""
    write_probes(path, probes)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "\n" + "".join(lines[1:]))
    return path


def reference(model_dir: Path, probes: list[Probe]) -> tuple[np.ndarray, np.ndarray]:
    """float64 (log-prob, logit): one sequence at a time, full log_softmax in float64."""
    model = copy.deepcopy(load_model(model_dir, dtype="auto").model).double()
    lps, zs = [], []
    for p in probes:
        if not p.response_ids:
            continue
        ids = torch.tensor([[*p.prompt_ids, *p.response_ids]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        lp = torch.log_softmax(logits, dim=-1)
        for j, t in enumerate(p.response_ids):
            lps.append(float(lp[len(p.prompt_ids) + j - 1, t]))
            zs.append(float(logits[len(p.prompt_ids) + j - 1, t]))
    return np.array(lps), np.array(zs)


def subset_run(run: Path, steps: list[int], dst: Path) -> Path:
    """A run folder with only some of ``run``'s checkpoints (copies: tests may edit them)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "run_config.json", dst)
    for s in steps:
        shutil.copytree(run / f"global_step_{s}", dst / f"global_step_{s}")
    return dst


@pytest.fixture(scope="module")
def probes(tiny_run_fp32) -> list[Probe]:
    return make_probes(tiny_run_fp32)


@pytest.fixture(scope="module")
def probes_file(probes, tmp_path_factory) -> Path:
    return write_with_blank(tmp_path_factory.mktemp("probes") / "probes.jsonl", probes)


@pytest.fixture(scope="module")
def references(tiny_run_fp32, probes) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    return {c.step: reference(c.path, probes) for c in discover_checkpoints(tiny_run_fp32)}


@pytest.fixture(scope="module")
def store(tiny_run_fp32, probes_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lp") / "run.logprobs.zarr"
    compute_logprobs(tiny_run_fp32, probes_file, out, batch_tokens=64, vocab_chunk=7,
                     progress=False)
    return out


# -- teacher forcing -------------------------------------------------------------------------


def test_plan_batches_packs_by_length_within_the_budget():
    lengths = [5, 0, 12, 3, 12, 7, 40, 1, 9]
    for budget in (1, 10, 24, 36, 100, 10_000):
        batches = plan_batches(lengths, budget)
        members = [i for b in batches for i in b.members]
        assert sorted(members) == [i for i, n in enumerate(lengths) if n > 0]
        assert [lengths[i] for i in members] == sorted((n for n in lengths if n), reverse=True)
        for b in batches:
            assert b.length == max(lengths[i] for i in b.members)
            assert len(b.members) == 1 or len(b.members) * b.length <= budget
            assert min(lengths[i] for i in b.members) >= 0.75 * b.length  # little padding
    assert len(plan_batches([10, 9, 8, 4, 3], 10_000)) == 2  # split where lengths jump


@pytest.mark.parametrize("vocab_chunk", [1, 3, 7, 20, 64])
def test_chunked_log_probs_equal_the_float64_reference(tiny_run_fp32, probes, references,
                                                       vocab_chunk):
    lm = load_model(tiny_run_fp32 / "global_step_40")
    want_lp, want_z = references[40]
    pairs = [(p.prompt_ids, p.response_ids) for p in probes]
    lengths = [len(a) + len(b) - 1 if b else 0 for a, b in pairs]
    for budget, fill in ((1, 0.75), (40, 0.75), (100_000, 0.75), (100_000, 0.0)):
        if fill == 0:  # every length in one right-padded batch
            assert len(plan_batches(lengths, budget, fill)) == 1
        lp, z = teacher_force(lm.model, pairs, batch_tokens=budget, vocab_chunk=vocab_chunk,
                              min_fill=fill)
        assert lp.dtype == z.dtype == np.float32 and lp.shape == want_lp.shape
        np.testing.assert_allclose(lp, want_lp, rtol=0, atol=ATOL)
        np.testing.assert_allclose(z, want_z, rtol=1e-5, atol=ATOL)
    assert np.all(lp <= 0) and len(np.unique(lp)) > len(lp) // 2  # real, varied values


def test_bf16_checkpoint_in_its_own_dtype_is_close_to_the_reference(tiny_run_bf16, probes):
    ck = tiny_run_bf16 / "global_step_100"
    lm = load_model(ck)
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    want, _ = reference(ck, probes)  # float64 of the same bf16 weights
    lp, _ = teacher_force(lm.model, [(p.prompt_ids, p.response_ids) for p in probes],
                          batch_tokens=50, vocab_chunk=6)
    err = np.abs(lp - want)
    assert err.max() < 0.1 and np.median(err) < 0.02  # bf16 activations, float32 softmax
    lm32 = load_model(ck, dtype="float32")
    lp32, _ = teacher_force(lm32.model, [(p.prompt_ids, p.response_ids) for p in probes])
    np.testing.assert_allclose(lp32, want, rtol=0, atol=ATOL)


def test_an_empty_prompt_is_refused(tiny_run_fp32):
    lm = load_model(tiny_run_fp32 / "global_step_0")
    with pytest.raises(PipelineError, match="empty prompt"):
        teacher_force(lm.model, [([5], [6]), ([], [6, 7])])


def test_a_tied_llama_checkpoint_equals_the_reference(tiny_run_tied, probes):
    ck = tiny_run_tied / "global_step_40"
    lm = load_model(ck, dtype="float32")
    head, embed = lm.model.get_output_embeddings().weight, lm.model.get_input_embeddings().weight
    assert head.data_ptr() == embed.data_ptr()  # the head is the embedding matrix
    want, _ = reference(ck, probes)
    lp, _ = teacher_force(lm.model, [(p.prompt_ids, p.response_ids) for p in probes],
                          batch_tokens=30, vocab_chunk=11)
    np.testing.assert_allclose(lp, want, rtol=0, atol=ATOL)


def test_a_model_whose_logits_are_not_the_plain_head_is_refused():
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    model = CohereForCausalLM(CohereConfig(  # real architecture: logits scaled by 0.0625
        vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    with pytest.raises(PipelineError, match="not lm_head"):
        check_head(model, ([5, 6, 7], [8, 9, 2]))


# -- the store -------------------------------------------------------------------------------


def test_stored_rows_and_token_table_equal_the_reference(store, probes, probes_file,
                                                          references, tiny_run_fp32):
    lps = LogprobStore(store)
    assert lps.steps == [0, 10, 20, 30, 40]
    for i, s in enumerate(lps.steps):
        np.testing.assert_allclose(lps.values("logprob")[i], references[s][0], rtol=0,
                                   atol=ATOL, err_msg=f"step {s}")
        np.testing.assert_allclose(lps.values("logit")[i], references[s][1], rtol=1e-5,
                                   atol=ATOL, err_msg=f"step {s}")
    t = lps.tokens
    tok = load_model(tiny_run_fp32 / "global_step_0").tokenizer
    assert t.token_id.tolist() == [i for p in probes for i in p.response_ids]
    assert t.text.tolist() == [tok.decode([i]) for p in probes for i in p.response_ids]
    assert t.probe.tolist() == [k for k, p in enumerate(probes) for _ in p.response_ids]
    assert t.position.tolist() == [j for p in probes for j in range(len(p.response_ids))]
    assert t.prompt_index.tolist() == [p.prompt_index for p in probes for _ in p.response_ids]
    assert t.sample.tolist() == [p.sample for p in probes for _ in p.response_ids]
    lines = [n for n, line in enumerate(probes_file.read_text().splitlines(), 1) if line]
    assert t.line.tolist() == lines and lines[1] == 3  # the blank second line is skipped
    k = int(np.flatnonzero(t.prompt_index == 0)[1])  # the second token of the first probe
    assert t.context(k) == probes[0].prompt + t.text[k - 1]


def test_a_new_checkpoint_adds_one_row_equal_to_a_fresh_run(tiny_run_fp32, probes_file, store,
                                                            tmp_path):
    run = subset_run(tiny_run_fp32, [0, 10, 20, 30], tmp_path / "run")
    out = tmp_path / "lp.zarr"
    kw = dict(batch_tokens=64, vocab_chunk=7, progress=False)
    assert compute_logprobs(run, probes_file, out, **kw).new_steps == [0, 10, 20, 30]
    again = compute_logprobs(run, probes_file, out, **kw)
    assert again.new_steps == [] and again.steps == [0, 10, 20, 30]  # nothing recomputed
    shutil.copytree(tiny_run_fp32 / "global_step_40", run / "global_step_40")
    rep = compute_logprobs(run, probes_file, out, **kw)
    assert rep.new_steps == [40] and rep.steps == [0, 10, 20, 30, 40]
    for name in ("logprob", "logit"):
        np.testing.assert_array_equal(LogprobStore(out).values(name),
                                      LogprobStore(store).values(name))


class Killed(BaseException):
    """Stands in for a kill: not an Exception, so nothing on the way catches it."""


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tiny_run_fp32, probes_file,
                                                                store, tmp_path, monkeypatch):
    from pipeline.steps.store import StepStore

    out = tmp_path / "lp.zarr"
    real_commit = StepStore.commit

    def die_before_committing_20(self, index, step, record=None):
        if step == 20:  # step 20's rows are written, its marker is not
            raise Killed
        real_commit(self, index, step, record)

    monkeypatch.setattr(StepStore, "commit", die_before_committing_20)
    with pytest.raises(Killed):
        compute_logprobs(tiny_run_fp32, probes_file, out, batch_tokens=64, vocab_chunk=7,
                         progress=False)
    monkeypatch.setattr(StepStore, "commit", real_commit)
    half = StepStore.open(out)
    assert half.steps == [0, 10] and half.array("logprob").shape[0] == 3  # a torn row 2
    rep = compute_logprobs(tiny_run_fp32, probes_file, out, batch_tokens=64, vocab_chunk=7,
                           progress=False)
    assert rep.new_steps == [20, 30, 40]
    for name in ("logprob", "logit"):
        np.testing.assert_array_equal(LogprobStore(out).values(name),
                                      LogprobStore(store).values(name))


@pytest.mark.slow
def test_a_killed_subprocess_resumes_to_the_uninterrupted_result(tiny_run_fp32, probes_file,
                                                                 store, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "lp.zarr"
    script = (
        "import os, sys\n"
        "from pipeline.steps.store import StepStore\n"
        "from pipeline.outputs.logprob_store import compute_logprobs\n"
        "real = StepStore.commit\n"
        "def commit(self, index, step, record=None):\n"
        "    if step == 30:\n"
        "        os._exit(17)\n"
        "    real(self, index, step, record)\n"
        "StepStore.commit = commit\n"
        "compute_logprobs(sys.argv[1], sys.argv[2], sys.argv[3], batch_tokens=64,\n"
        "                 vocab_chunk=7, progress=False)\n")
    r = subprocess.run([sys.executable, "-c", script, str(tiny_run_fp32), str(probes_file),
                        str(out)], cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert r.returncode == 17
    assert LogprobStore(out).steps == [0, 10, 20]
    compute_logprobs(tiny_run_fp32, probes_file, out, batch_tokens=64, vocab_chunk=7,
                     progress=False)
    np.testing.assert_array_equal(LogprobStore(out).values(), LogprobStore(store).values())


# -- the token fit ---------------------------------------------------------------------------


def test_token_fit_equals_numpy_least_squares_and_the_filter_is_exact(store, tmp_path):
    fit = fit_tokens(store, tmp_path / "fit")
    lps = LogprobStore(store)
    steps = np.array(lps.steps, np.float64)
    x = (steps - steps.min()) / (steps.max() - steps.min())  # PAPER.md's normalised step
    t = fit.table
    for name in ("logprob", "logit"):
        y = lps.values(name).astype(np.float64)
        design = np.stack([np.ones_like(x), x], axis=1)
        (b0, b1), *_ = np.linalg.lstsq(design, y, rcond=None)
        r2 = np.array([np.corrcoef(x, y[:, k])[0, 1] ** 2 for k in range(y.shape[1])])
        np.testing.assert_allclose(t[f"{name}_slope_normalised"], b1, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(t[f"{name}_intercept"], b0, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(t[f"{name}_r2"], r2, rtol=1e-4, atol=1e-6)
        null = t[f"{name}_null_r2"].to_numpy()
        assert np.all((null >= 0) & (null <= 1)) and np.std(null) > 0.05
    y = lps.values("logprob").astype(np.float64)
    change = y[-1] - y[0]
    np.testing.assert_array_equal(t["selected"], np.abs(change) > 0.2)
    assert 0 < t["selected"].sum() < len(t)  # the filter keeps some tokens, not all
    # the summary: exact medians and fractions of the engine's R², with and without the filter
    doc = json.loads((fit.fit_dir / SUMMARY_FILE).read_text())
    rows = {(r["array"], r["selection"]): r for r in doc["rows"]}
    sel = rows[("logprob", "|change| > 0.2")]
    r2 = t["logprob_r2"].to_numpy(np.float64)[np.abs(change) > 0.2]
    assert sel["n_tokens"] == len(r2) and sel["n_static"] == 0
    assert sel["median_r2"] == pytest.approx(np.median(r2))
    assert sel["frac_r2_gt_0.7"] == pytest.approx(np.mean(r2 > 0.7))
    assert rows[("logprob", "all")]["n_tokens"] == len(t)
    # the fit labels the token arrays by name (no layers): its tables say logprob and logit
    from pipeline.fit import open_fit

    h = open_fit(fit.fit_dir).histograms("moving")
    assert sorted(map(str, h.module.values)) == ["logit", "logprob"]
    assert set(h.layer.values.tolist()) == {-1}


def test_static_tokens_are_counted_not_folded_in():
    import pandas as pd

    from pipeline.outputs.token_fit import summarize

    t = pd.DataFrame({"selected": [True, False, True], "logprob_r2": [0.9, np.nan, 0.5],
                      "logprob_null_r2": [0.1, np.nan, 0.3], "logit_r2": [0.2, 0.4, 0.6],
                      "logit_null_r2": [0.5, 0.5, 0.5]})
    row = summarize(t, 0.2)[0]
    assert row["n_tokens"] == 3 and row["n_static"] == 1 and row["n_fitted"] == 2
    assert row["median_r2"] == pytest.approx(0.7)


# -- panels and the command ------------------------------------------------------------------


def test_cli_writes_store_fit_summary_and_panels(tiny_run_fp32, probes_file, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    out, fit, rep = tmp_path / "lp.zarr", tmp_path / "fit", tmp_path / "report"
    r = CliRunner().invoke(app, ["logprobs", str(tiny_run_fp32), "--probes", str(probes_file),
                                 "--out", str(out), "--fit-out", str(fit), "--report",
                                 str(rep), "--no-progress", "--vocab-chunk", "9",
                                 "--min-change", "0.1"])
    assert r.exit_code == 0, r.output
    assert "median R²" in r.output and "|change| > 0.1" in r.output
    assert json.loads((fit / SUMMARY_FILE).read_text())["min_change"] == 0.1
    for name in ("token_r2.png", "token_trajectories.png"):
        data = (rep / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_cli_takes_a_catalog_name_and_writes_into_its_outputs(tiny_run_fp32, probes_file,
                                                              tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    subset_run(tiny_run_fp32, [0, 40], tmp_path / "ckpts")
    cat = tmp_path / "catalog.yaml"
    cat.write_text("runs:\n  lp-mini:\n    checkpoints: ckpts\n    store: run.zarr\n"
                   "    outputs: outputs\n")
    r = CliRunner().invoke(app, ["logprobs", "lp-mini", "--probes", str(probes_file),
                                 "--catalog", str(cat), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert LogprobStore(tmp_path / "outputs" / "logprobs.zarr").steps == [0, 40]
    assert (tmp_path / "outputs" / "logprobs.fit" / SUMMARY_FILE).is_file()


def test_example_tokens_span_the_r2_range_of_the_selected_ones():
    import pandas as pd

    from pipeline.report.tokens import pick_examples

    r2 = np.linspace(0, 1, 50)
    t = pd.DataFrame({"logprob_r2": r2, "selected": np.arange(50) % 2 == 0})
    picks = pick_examples(t, 5)
    assert len(picks) == 5 and all(t["selected"][k] for k in picks)
    assert picks[0] == 0 and picks[-1] == 48 and picks == sorted(picks)


# -- bad input -------------------------------------------------------------------------------


def _probe(prompt_ids: list[int], response_ids: list[int]) -> Probe:
    return Probe(0, 0, "p", prompt_ids, "r", response_ids)


@pytest.mark.parametrize(("bad", "needle"), [
    (_probe([5, 6], [4, 99]), r"probes.jsonl:2: token id 99 is outside the model's vocabulary"),
    (_probe([5] * 60, [4] * 10), r"probes.jsonl:2: the model would read 69 tokens"),
])
def test_bad_probes_are_refused_naming_the_line(tiny_run_fp32, probes, tmp_path, bad, needle):
    path = tmp_path / "probes.jsonl"
    write_probes(path, [probes[0], bad])
    out = tmp_path / "lp.zarr"
    with pytest.raises(PipelineError, match=needle):
        compute_logprobs(tiny_run_fp32, path, out, progress=False)
    assert not out.exists()


def test_other_probes_on_an_existing_store_are_refused(tiny_run_fp32, probes, store,
                                                       tmp_path):
    before = LogprobStore(store).values()
    other = tmp_path / "other.jsonl"
    write_probes(other, probes[:-1])
    with pytest.raises(PipelineError, match="made from other probes"):
        compute_logprobs(tiny_run_fp32, other, store, progress=False)
    np.testing.assert_array_equal(LogprobStore(store).values(), before)


def test_a_checkpoint_with_another_vocabulary_is_refused(tiny_run_fp32, probes_file, tmp_path):
    run = subset_run(tiny_run_fp32, [0, 10], tmp_path / "run")
    tj = run / "global_step_10" / "tokenizer.json"
    doc = json.loads(tj.read_text())
    doc["model"]["vocab"] = {("!" if k == "?" else k): v for k, v in doc["model"]["vocab"].items()}
    tj.write_text(json.dumps(doc))
    out = tmp_path / "lp.zarr"
    with pytest.raises(PipelineError, match="step 10 .*tokenizer differs"):
        compute_logprobs(run, probes_file, out, progress=False)
    assert LogprobStore(out).steps == [0]  # the refused checkpoint left no row


def test_a_checkpoint_before_the_last_stored_step_is_refused(tiny_run_fp32, probes_file,
                                                             tmp_path):
    run = subset_run(tiny_run_fp32, [0, 20], tmp_path / "run")
    out = tmp_path / "lp.zarr"
    compute_logprobs(run, probes_file, out, progress=False)
    shutil.copytree(tiny_run_fp32 / "global_step_10", run / "global_step_10")
    with pytest.raises(PipelineError, match=r"steps \[10\] are earlier .* only appends"):
        compute_logprobs(run, probes_file, out, progress=False)


def test_another_dtype_on_an_existing_store_is_refused(tiny_run_fp32, probes_file, tmp_path):
    run = subset_run(tiny_run_fp32, [0], tmp_path / "run")
    out = tmp_path / "lp.zarr"
    compute_logprobs(run, probes_file, out, progress=False)
    shutil.copytree(tiny_run_fp32 / "global_step_10", run / "global_step_10")
    with pytest.raises(PipelineError, match="computed in bfloat16 but the store's rows are "
                                            "float32"):
        compute_logprobs(run, probes_file, out, dtype="bfloat16", progress=False)
    assert LogprobStore(out).steps == [0]


@pytest.mark.parametrize(("args", "needle"), [
    (["--batch-tokens", "0"], "--batch-tokens must be >= 1"),
    (["--vocab-chunk", "-3"], "--vocab-chunk must be >= 1"),
    (["--min-change", "nan"], "--min-change must be a finite number"),
])
def test_cli_bad_options_are_one_line_and_write_nothing(tiny_run_fp32, probes_file, tmp_path,
                                                        args, needle):
    from typer.testing import CliRunner

    from pipeline.cli import app

    out = tmp_path / "lp.zarr"
    r = CliRunner().invoke(app, ["logprobs", str(tiny_run_fp32), "--probes", str(probes_file),
                                 "--out", str(out), "--no-progress", *args])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], r.output
    assert not out.exists()


def test_outputs_inside_the_inputs_are_refused(tiny_run_fp32, probes_file, store):
    with pytest.raises(PipelineError, match="is inside the run folder"):
        compute_logprobs(tiny_run_fp32, probes_file, tiny_run_fp32 / "lp.zarr", progress=False)
    with pytest.raises(PipelineError, match="is inside the run folder.*--fit-out"):
        fit_tokens(store, tiny_run_fp32 / "lp.fit")
    with pytest.raises(PipelineError, match="the store"):
        fit_tokens(store, store / "fit")
    assert not (tiny_run_fp32 / "lp.fit").exists() and not (store / "fit").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_device_is_refused_before_writing(tiny_run_fp32, probes_file, tmp_path):
    with pytest.raises(PipelineError, match="--device cuda: no CUDA device"):
        compute_logprobs(tiny_run_fp32, probes_file, tmp_path / "lp.zarr", device="cuda")
    assert not (tmp_path / "lp.zarr").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_log_probs_equal_the_reference(tiny_run_fp32, probes, references, tmp_path,
                                            probes_file):
    lm = load_model(tiny_run_fp32 / "global_step_40", device="cuda")
    lp, _ = teacher_force(lm.model, [(p.prompt_ids, p.response_ids) for p in probes],
                          batch_tokens=64, vocab_chunk=7)
    np.testing.assert_allclose(lp, references[40][0], rtol=0, atol=ATOL)
    rep = compute_logprobs(tiny_run_fp32, probes_file, tmp_path / "lp.zarr", device="cuda",
                           progress=False)
    np.testing.assert_allclose(LogprobStore(rep.store).values()[-1], references[40][0],
                               rtol=0, atol=ATOL)
