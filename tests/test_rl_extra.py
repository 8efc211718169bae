"""RL-Extra inside TRL's GRPOTrainer: real tiny runs, checked against independent arithmetic.

Each run here is trained for the test (a few GRPO steps, seconds) with the
real trainer; nothing is mocked. The one instrument is a spy around TRL's
``_generate_and_score_completions`` (the real method still runs) that records
when rollouts are generated, from which prompts and from which weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from pipeline.checkpoints.discover import STEP_META_FILE, discover_checkpoints
from pipeline.errors import PipelineError
from pipeline.extrapolate.plan import DEFAULT_EXCLUDE, matches
from pipeline.rl.extra import (
    RLExtra,
    RLExtraCallback,
    check_alignment,
    generation_period,
)
from pipeline.rl.tiny_run import RL_EXTRA_FILE, TinyRunConfig, make_tiny_run

# GRPO starts from the cached fp32 layout run's warm-started model (held-out accuracy ~0.5,
# so nearly every group of answers has a non-zero advantage): no warm start to pay here
SMALL = TinyRunConfig(sft_steps=0, rl_steps=4, save_every=2, prompts_per_step=4,
                      generations=4, n_heldout=8)
WATCHED = "model.layers.0.self_attn.q_proj.weight"  # a tensor that jumps


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _adam(optimizer) -> dict[str, dict]:
    """Adam's state by parameter name (copies), via the inner torch optimizer."""
    opt = getattr(optimizer, "optimizer", optimizer)
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                out[id(p)] = {k: (v.detach().clone() if torch.is_tensor(v) else v)
                              for k, v in st.items()}
    return out


@dataclass
class Recorder:
    """Hooks and a trainer callback that save what the tests compare afterwards."""

    folder: Path
    before: dict[int, dict] = field(default_factory=dict)  # real step -> Adam state
    after: dict[int, dict] = field(default_factory=dict)
    after_weights: dict[int, torch.Tensor] = field(default_factory=dict)
    adam_steps: dict[int, set] = field(default_factory=dict)  # global step -> Adam 'step's
    trainer_checkpoints: list = field(default_factory=list)  # TRL's checkpoint-N, discovered

    def hook(self, phase, rec, model, optimizer) -> None:
        if phase == "before":  # the segment end, saved as a real safetensors file
            save_file(_params(model), str(self.folder / f"end_{rec.real_step}.safetensors"))
            self.before[rec.real_step] = _adam(optimizer)
        else:
            self.after[rec.real_step] = _adam(optimizer)
            self.after_weights[rec.real_step] = dict(model.named_parameters())[WATCHED].detach(
            ).clone()

    def callback(self):
        from transformers import TrainerCallback

        rec = self

        class AdamSteps(TrainerCallback):
            def on_step_end(self, args, state, control, optimizer=None, **kw):
                rec.adam_steps[state.global_step] = {
                    int(s["step"]) for s in _adam(optimizer).values()}

            def on_train_end(self, args, state, control, **kw):
                if args.save_strategy != "no":  # (make_tiny_run deletes the folder afterwards)
                    rec.trainer_checkpoints = [(c.step, c.real_step, c.path.name)
                                               for c in discover_checkpoints(args.output_dir)]

        return AdamSteps()


def _train(tmp: Path, spec: RLExtra, cfg: TinyRunConfig = SMALL, spy: list | None = None,
           **kw) -> tuple[Path, Recorder, RLExtraCallback]:
    rec = Recorder(tmp)
    cb = RLExtraCallback(spec, hooks=[rec.hook])
    out = tmp / "run"
    if spy is None:
        make_tiny_run(out, cfg, log=lambda _m: None, progress=False, rl_extra=cb,
                      callbacks=[rec.callback()], **kw)
        return out, rec, cb
    from trl import GRPOTrainer

    real = GRPOTrainer._generate_and_score_completions

    def spying(self, inputs):
        spy.append({"global_step": self.state.global_step, "micro_step": self._step,
                    "prompts": [x["prompt"] for x in inputs],
                    "weights": dict(self.model.named_parameters())[WATCHED].detach().clone()})
        return real(self, inputs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GRPOTrainer, "_generate_and_score_completions", spying)
        make_tiny_run(out, cfg, log=lambda _m: None, progress=False, rl_extra=cb,
                      callbacks=[rec.callback()], **kw)
    return out, rec, cb


@pytest.fixture(scope="module")
def reset_run(tmp_path_factory, tiny_run_fp32):
    """m=2, n=3, optimizer reset; 4 real steps, checkpoints at 0, 2, 4 (2 and 4 jumped)."""
    return _train(tmp_path_factory.mktemp("reset"), RLExtra(m=2, n=3, optimizer="reset"),
                  init_model=tiny_run_fp32 / "global_step_0")


# steps_per_generation=2 x num_iterations=2: rollouts every 4 optimizer steps
BUFFERED = replace(SMALL, rl_steps=8, save_every=4)
BUFFER_ARGS = {"steps_per_generation": 2, "num_iterations": 2}
TRL_SAVES = {"save_strategy": "steps", "save_steps": 4}  # TRL's own checkpoint-N folders


@pytest.fixture(scope="module")
def keep_run(tmp_path_factory, tiny_run_fp32):
    """m=4, n=2, optimizer kept, rollouts buffered over 4 steps; the generations spied on."""
    spy: list = []
    out, rec, cb = _train(tmp_path_factory.mktemp("keep"), RLExtra(m=4, n=2, optimizer="keep"),
                          BUFFERED, spy=spy, grpo_args={**BUFFER_ARGS, **TRL_SAVES},
                          init_model=tiny_run_fp32 / "global_step_0")
    return out, rec, cb, spy


def _jumped(name: str) -> bool:
    return not matches(name, DEFAULT_EXCLUDE)


def test_a_jump_is_eq3_on_the_live_weights(reset_run):
    """Eq. 3 recomputed in float64 from the saved segment start, end and jumped model."""
    out, rec, cb = reset_run
    alpha = 5 / 2
    assert [r.real_step for r in cb.records] == [2, 4]
    for start_step, step in ((0, 2), (2, 4)):
        start = load_file(out / f"global_step_{start_step}" / "model.safetensors")
        end = load_file(rec.folder / f"end_{step}.safetensors")
        got = load_file(out / f"global_step_{step}" / "model.safetensors")
        assert set(end) <= set(got)
        moved_norms, moved_n, total = 0, 0, 0
        for name in end:
            s, e, g = start[name], end[name], got[name]
            if not _jumped(name):
                assert "norm" in name
                np.testing.assert_array_equal(g, e)  # trained, not jumped
                moved_norms += int(np.any(e != s))
                continue
            s64, e64 = s.astype(np.float64), e.astype(np.float64)
            want = s64 + alpha * (e64 - s64)
            # float32 evaluation: a few roundings of magnitudes up to |s| + alpha |e - s|
            tol = 4 * np.finfo(np.float32).eps * (np.abs(s64) + alpha * np.abs(e64 - s64))
            assert np.all(np.abs(g - want) <= tol + 1e-30), name
            # the same order in float32 (the export's kernel contract): bit for bit
            f32 = (s + np.float32(alpha) * (e - s)).astype(np.float32)
            np.testing.assert_array_equal(g, f32)
            # and not trivially: the jumped value is far from the trained one
            moved = e != s  # (embedding rows of unused characters never move)
            moved_n, total = moved_n + int(moved.sum()), total + moved.size
            assert moved.any(), name
            # the jump went (alpha - 1) x the segment's move beyond the trained weights
            ratio = np.linalg.norm(g - e64) / ((alpha - 1) * np.linalg.norm(e64 - s64))
            assert abs(ratio - 1) < 1e-3, name
        assert moved_n > 0.5 * total
        assert moved_norms > 0  # norms did train, so "copied" is a real check
    assert set(cb.jumped_names) == {n for n in end if _jumped(n)}


def test_reset_clears_adam_and_the_next_step_is_a_first_step(reset_run):
    _, rec, _ = reset_run
    for step in (2, 4):
        assert rec.before[step]  # Adam had state before the jump ...
        # m = 2 steps since the last reset (or the start)
        assert {int(s["step"]) for s in rec.before[step].values()} == {2}
        assert rec.after[step] == {}  # ... and none after: exp_avg, exp_avg_sq, step gone
    assert rec.adam_steps[3] == {1}  # the step after the jump is a fresh Adam's first
    assert rec.adam_steps[1] == {1}


def test_keep_carries_adam_across_the_jump(keep_run):
    _, rec, cb, _ = keep_run
    assert [r.real_step for r in cb.records] == [4, 8]
    before, after = rec.before[4], rec.after[4]
    assert before and before.keys() == after.keys()
    for key in before:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(before[key][k]), torch.as_tensor(after[key][k]))
        assert torch.count_nonzero(before[key]["exp_avg_sq"]) > 0
    assert rec.adam_steps[5] == {5}  # the count goes on


def test_jumps_fall_on_generation_boundaries(keep_run):
    """With rollouts buffered over 4 steps, the jump at 4 precedes the generation at 4."""
    _, rec, cb, spy = keep_run
    assert [g["global_step"] for g in spy] == [0, 4]
    assert [g["micro_step"] % 4 for g in spy] == [0, 0]
    assert all(r.real_step % 4 == 0 for r in cb.records)
    # the rollouts after the jump were sampled by the jumped model, not the trained one
    assert torch.equal(spy[1]["weights"], rec.after_weights[4])
    assert not torch.equal(spy[1]["weights"], spy[0]["weights"])


def test_the_data_order_continues_across_a_jump(keep_run):
    """Generation g sees the sampler's g-th chunk of prompts: the jump restarts nothing."""
    from trl.trainer.utils import RepeatSampler

    from pipeline.rl.tasks import task_problems

    *_, spy = keep_run
    train, _ = task_problems(BUFFERED.task, BUFFERED.seed, BUFFERED.n_heldout)
    per_gen = BUFFERED.prompts_per_step * BUFFER_ARGS["steps_per_generation"]
    sampler = RepeatSampler(train, mini_repeat_count=BUFFERED.generations, batch_size=per_gen,
                            repeat_count=4, shuffle=True, seed=BUFFERED.seed)
    order = list(iter(sampler))
    chunk = per_gen * BUFFERED.generations * 4  # indices the sampler yields per chunk
    for g, seen in enumerate(spy):
        want = [train[i].prompt for i in order[g * chunk: g * chunk + per_gen
                                                * BUFFERED.generations]]
        assert seen["prompts"] == want
    assert spy[1]["prompts"] != spy[0]["prompts"]


def test_a_misaligned_m_is_refused_and_leaves_nothing(tmp_path, tiny_run_fp32):
    out = tmp_path / "run"
    with pytest.raises(PipelineError, match="generation boundary.*multiple of 4"):
        make_tiny_run(out, BUFFERED, log=lambda _m: None, progress=False,
                      rl_extra=RLExtra(m=2, n=1), grpo_args=BUFFER_ARGS,
                      init_model=tiny_run_fp32 / "global_step_0")
    assert not out.exists()


def test_generation_period_and_alignment():
    assert generation_period(1, 1, 1) == 1
    assert generation_period(1, 2, 2) == 4
    assert generation_period(4, 4, 1) == 1  # one generation per optimizer step
    assert generation_period(4, 2, 1) == 1
    assert generation_period(2, 3, 1) == 3

    @dataclass
    class Args:
        gradient_accumulation_steps: int = 2
        steps_per_generation: int = 3
        num_iterations: int = 1

    assert check_alignment(RLExtra(m=6, n=6), Args()) == 3
    with pytest.raises(PipelineError, match="m=4 .* multiple of 3"):
        check_alignment(RLExtra(m=4, n=6), Args())


@pytest.mark.parametrize("kw, match", [
    ({"m": 0, "n": 1}, "m .* >= 1"), ({"m": 1, "n": -1}, "n .* >= 0"),
    ({"m": 2.0, "n": 1}, "m .* integer"), ({"m": 2, "n": 1, "optimizer": "fresh"}, "keep, reset"),
])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(PipelineError, match=match):
        RLExtra(**kw)


def test_nominal_and_real_steps_are_recorded(reset_run):
    out, _, cb = reset_run
    metas = {s: json.loads((out / f"global_step_{s}" / STEP_META_FILE).read_text())
             for s in (0, 2, 4)}
    assert {s: (m["real_step"], m["nominal_step"], m["jumps"]) for s, m in metas.items()} == {
        0: (0, 0, 0), 2: (2, 5, 1), 4: (4, 10, 2)}
    assert [r.nominal_step for r in cb.records] == [5, 10]
    assert RLExtra(m=2, n=3).nominal_step(4) == 10
    summary = json.loads((out / RL_EXTRA_FILE).read_text())
    assert [j["nominal_step"] for j in summary["jumps"]] == [5, 10]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["nominal_step"] == {"0": 0, "2": 5, "4": 10}
    cps = discover_checkpoints(out)
    assert [(c.step, c.real_step, c.path.name) for c in cps] == [
        (0, 0, "global_step_0"), (5, 2, "global_step_2"), (10, 4, "global_step_4")]


def test_ingest_stores_the_nominal_steps(reset_run, tmp_path):
    from distributed import Client

    from pipeline.store.ingest import ingest
    from pipeline.store.state import StoreState

    out, _, _ = reset_run
    store = tmp_path / "run.zarr"
    with Client(processes=False, n_workers=1, threads_per_worker=1,
                dashboard_address=":0") as client:
        rep = ingest(out, store, client=client, progress=False)
    assert rep.steps == [0, 5, 10]
    state = StoreState.open(store)
    assert state.steps == [0, 5, 10]
    assert [state.record_for(s)["folder"] for s in state.steps] == [
        "global_step_0", "global_step_2", "global_step_4"]
    assert [state.record_for(s)["real_step"] for s in state.steps] == [0, 2, 4]


@pytest.mark.parametrize("text, match", [
    ("{", "unreadable step metadata"),
    ("[1]", "not a JSON object"),
    ('{"real_step": 2, "nominal_step": "5"}', "nominal_step must be an integer"),
    ('{"real_step": 3, "nominal_step": 5}', "says real_step 3 but the folder is step 2"),
    ('{"real_step": 2, "nominal_step": 1}', "nominal_step 1 is before real_step 2"),
])
def test_bad_step_metadata_is_refused_naming_the_file(tmp_path, text, match):
    (tmp_path / "global_step_2").mkdir()
    (tmp_path / "global_step_2" / STEP_META_FILE).write_text(text)
    with pytest.raises(PipelineError, match=match) as e:
        discover_checkpoints(tmp_path)
    assert STEP_META_FILE in str(e.value)


def test_a_nominal_step_clashing_with_a_real_one_is_refused(tmp_path):
    for s in (2, 5):
        (tmp_path / f"global_step_{s}").mkdir()
    (tmp_path / "global_step_2" / STEP_META_FILE).write_text(
        '{"real_step": 2, "nominal_step": 5}')
    with pytest.raises(PipelineError, match="step 5 found twice"):
        discover_checkpoints(tmp_path)
    # verl's layout: the metadata beside the weights is found too
    inner = tmp_path / "global_step_7" / "actor" / "huggingface"
    inner.mkdir(parents=True)
    (tmp_path / "global_step_2" / STEP_META_FILE).unlink()
    (inner / STEP_META_FILE).write_text('{"real_step": 7, "nominal_step": 9}')
    assert [(c.step, c.real_step) for c in discover_checkpoints(tmp_path)] == [
        (2, None), (5, None), (9, 7)]


def test_include_exclude_and_bf16_parameters(tiny_run_fp32):
    """The callback on a bf16 model, outside a trainer: only the chosen tensors jump, in
    float32 from the bf16 values, rounded to bf16; the next segment starts from the rounded."""
    from types import SimpleNamespace

    import ml_dtypes
    from transformers import AutoModelForCausalLM, TrainerControl, TrainerState

    model = AutoModelForCausalLM.from_pretrained(tiny_run_fp32 / "global_step_0",
                                                 dtype=torch.bfloat16)
    spec = RLExtra(m=1, n=2, optimizer="keep", include=("re:mlp",), exclude=("*down_proj*",))
    cb = RLExtraCallback(spec)
    args = SimpleNamespace(gradient_accumulation_steps=1, steps_per_generation=1,
                           num_iterations=1)
    state, control = TrainerState(), TrainerControl()
    cb.on_train_begin(args, state, control, model=model)
    assert cb.jumped_names and all("mlp" in n and "down_proj" not in n for n in cb.jumped_names)
    gen = torch.Generator().manual_seed(0)

    def f32() -> dict[str, np.ndarray]:
        return {k: v.detach().float().numpy().copy() for k, v in model.named_parameters()}

    start = f32()
    for real in (1, 2):
        with torch.no_grad():  # a known move in place of training
            for p in model.parameters():
                p.add_(1e-2 * torch.randn(p.shape, generator=gen).to(p.dtype))
        end = f32()
        state.global_step = real
        cb.on_step_end(args, state, control, model=model, optimizer=None)
        got = f32()
        for name in got:
            if name in cb.jumped_names:
                s, e = start[name], end[name]
                want = (s + np.float32(3.0) * (e - s)).astype(ml_dtypes.bfloat16)
                np.testing.assert_array_equal(got[name], want.astype(np.float32))
                assert np.any(got[name] != e)
            else:
                np.testing.assert_array_equal(got[name], end[name])
        start = got
    assert [r.nominal_step for r in cb.records] == [3, 6]


def test_no_matching_tensor_and_a_resumed_trainer_are_refused(tiny_run_fp32):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, TrainerControl, TrainerState

    model = AutoModelForCausalLM.from_pretrained(tiny_run_fp32 / "global_step_0")
    args = SimpleNamespace(gradient_accumulation_steps=1)
    with pytest.raises(PipelineError, match="no trainable tensor matches"):
        RLExtraCallback(RLExtra(m=1, n=1, include=("nothing*",))).on_train_begin(
            args, TrainerState(), TrainerControl(), model=model)
    with pytest.raises(PipelineError, match="cannot resume a trainer mid-run"):
        RLExtraCallback(RLExtra(m=1, n=1)).on_train_begin(
            args, TrainerState(global_step=5), TrainerControl(), model=model)


def test_trl_checkpoints_get_their_nominal_step(keep_run):
    """TRL's own checkpoint-N/ (save_strategy="steps") carry nominal_step.json too."""
    _, rec, _, _ = keep_run
    assert rec.trainer_checkpoints == [(6, 4, "checkpoint-4"), (12, 8, "checkpoint-8")]
