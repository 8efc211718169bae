"""The tiny RLVR run is real: loadable HF checkpoints, learning, deterministic."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import ml_dtypes  # noqa: F401  (lets safetensors hand bf16 to numpy)
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.rl.evaluate import greedy_accuracy
from pipeline.rl.tasks import addition_problems
from pipeline.rl.tiny_model import ModelSize
from pipeline.rl.tiny_run import TinyRunConfig, make_tiny_run


def load_tensors(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint folder, single file or sharded, read independently."""
    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "np") as st:
            for k in st.keys():
                assert k not in out, f"{k} in two shards"
                out[k] = st.get_tensor(k)
    return out


def steps_of(run: Path) -> list[int]:
    return sorted(int(p.name.split("_")[-1]) for p in run.glob("global_step_*"))


def test_default_run_layout_and_metrics(tiny_run_bf16: Path) -> None:
    assert steps_of(tiny_run_bf16) == list(range(0, 101, 10))
    metrics = json.loads((tiny_run_bf16 / "metrics.json").read_text())
    acc = {int(k): v for k, v in metrics["heldout_accuracy"].items()}
    assert sorted(acc) == list(range(0, 101, 10))
    # learning itself is asserted on the linear run (tests/test_linear_regime.py); here
    # only that the scores are real fractions of the 256 held-out problems
    assert all(0.0 <= a <= 1.0 and (a * 256).is_integer() for a in acc.values())
    assert len(metrics["reward"]) == 100
    for step in (0, 100):
        folder = tiny_run_bf16 / f"global_step_{step}"
        for name in ("config.json", "generation_config.json", "tokenizer.json",
                     "model.safetensors"):
            assert (folder / name).exists(), f"{folder} lacks {name}"
        assert all(t.dtype == ml_dtypes.bfloat16 for t in load_tensors(folder).values())


def test_checkpoints_load_generate_and_score_as_recorded(tiny_run_bf16: Path) -> None:
    """Recompute accuracy from the saved files, independently of the metrics file."""
    seed = json.loads((tiny_run_bf16 / "run_config.json").read_text())["seed"]
    _, heldout = addition_problems(seed)
    accs = {}
    for step in (0, 100):
        folder = tiny_run_bf16 / f"global_step_{step}"
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        assert model.dtype == torch.bfloat16
        accs[step] = greedy_accuracy(model, tok, heldout)
        enc = tok(["12+34="], return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
        assert out.shape[1] > enc.input_ids.shape[1]
    metrics = json.loads((tiny_run_bf16 / "metrics.json").read_text())
    assert accs[0] == pytest.approx(metrics["heldout_accuracy"]["0"])
    assert accs[100] == pytest.approx(metrics["heldout_accuracy"]["100"])


def test_weights_move_between_checkpoints(tiny_run_bf16: Path) -> None:
    first = load_tensors(tiny_run_bf16 / "global_step_0")
    last = load_tensors(tiny_run_bf16 / "global_step_100")
    moved = sum(int((first[k] != last[k]).sum()) for k in first)
    total = sum(v.size for v in first.values())
    assert 0.05 * total < moved < total


def test_fp32_run_is_float32(tiny_run_fp32: Path) -> None:
    tensors = load_tensors(tiny_run_fp32 / "global_step_40")
    assert tensors and all(t.dtype == np.float32 for t in tensors.values())
    model = AutoModelForCausalLM.from_pretrained(tiny_run_fp32 / "global_step_40")
    sd = model.state_dict()
    for k, v in tensors.items():
        np.testing.assert_array_equal(sd[k].numpy(), v)


def test_sharded_run_round_trips_and_matches_single_file(
    tiny_run_sharded: Path, tiny_run_bf16: Path
) -> None:
    """Same seed, same first 40 steps: sharded files hold the bit-identical weights."""
    folder = tiny_run_sharded / "global_step_40"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert shards == {p.name for p in folder.glob("*.safetensors")}
    sharded = load_tensors(folder)
    assert set(sharded) == set(index["weight_map"])
    single = load_tensors(tiny_run_bf16 / "global_step_40")
    assert set(sharded) == set(single)
    for k in single:
        np.testing.assert_array_equal(sharded[k].view(np.uint16), single[k].view(np.uint16))
    model = AutoModelForCausalLM.from_pretrained(folder)
    sd = model.state_dict()
    for k, v in sharded.items():
        assert torch.equal(sd[k], torch.from_numpy(v.view(np.uint16).astype(np.int16)).view(
            torch.bfloat16))


def test_tied_llama_has_no_separate_lm_head(tiny_run_tied: Path) -> None:
    folder = tiny_run_tied / "global_step_0"
    assert "lm_head.weight" not in load_tensors(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == "llama"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


SMALL = TinyRunConfig(size=ModelSize(32, 1, 64, 2, 1), sft_steps=20, rl_steps=4,
                      save_every=2, prompts_per_step=4, generations=4, n_heldout=16)


def test_same_seed_is_bit_identical_and_other_seed_differs(tmp_path: Path) -> None:
    a = make_tiny_run(tmp_path / "a", SMALL, log=lambda _m: None)
    b = make_tiny_run(tmp_path / "b", SMALL, log=lambda _m: None)
    c = make_tiny_run(tmp_path / "c", replace(SMALL, seed=1), log=lambda _m: None)
    assert steps_of(a) == steps_of(b) == [0, 2, 4]
    for step in steps_of(a):
        fa = (a / f"global_step_{step}" / "model.safetensors").read_bytes()
        fb = (b / f"global_step_{step}" / "model.safetensors").read_bytes()
        assert fa == fb, f"step {step} differs between two runs with the same seed"
    ta = load_tensors(a / "global_step_4")
    tc = load_tensors(c / "global_step_4")
    assert any(not np.array_equal(ta[k], tc[k]) for k in ta)


def test_refuses_non_empty_output(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("user data")
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="not empty"):
        make_tiny_run(tmp_path / "x", SMALL)
    assert (tmp_path / "x" / "keep.txt").read_text() == "user data"


def test_sibling_runs_equal_the_same_runs_made_alone(tmp_path: Path) -> None:
    """One training saved three ways gives exactly the three runs trained one by one."""
    main = replace(SMALL, dtype="bfloat16", seed=int(os.environ.get("RLVR_LIN_TEST_SEED", "0")))
    sibs = [replace(main, dtype="float32", rl_steps=3, save_every=1),
            replace(main, max_shard_size="20KB", rl_steps=2)]
    make_tiny_run(tmp_path / "main", main, log=lambda _m: None, progress=False,
                  siblings=[(tmp_path / f"sib{i}", c) for i, c in enumerate(sibs)])
    for i, cfg in enumerate(sibs):
        alone = make_tiny_run(tmp_path / f"alone{i}", cfg, log=lambda _m: None, progress=False)
        sib = tmp_path / f"sib{i}"
        assert steps_of(sib) == steps_of(alone) == list(range(0, cfg.rl_steps + 1,
                                                             cfg.save_every)) + (
            [cfg.rl_steps] if cfg.rl_steps % cfg.save_every else [])
        for step in steps_of(alone):
            files = sorted(p.name for p in (alone / f"global_step_{step}").glob("*.safetensors"))
            assert files == sorted(p.name for p in (sib / f"global_step_{step}").glob(
                "*.safetensors")) and (len(files) > 1) == (cfg.max_shard_size is not None)
            for f in files:
                assert ((sib / f"global_step_{step}" / f).read_bytes()
                        == (alone / f"global_step_{step}" / f).read_bytes()), (cfg, step, f)
        ms, ma = (json.loads((r / "metrics.json").read_text()) for r in (sib, alone))
        assert ms["heldout_accuracy"] == ma["heldout_accuracy"]
        assert ms["reward"] == ma["reward"] and ms["config"] == ma["config"]
        assert (sib / "run_config.json").read_text() == (alone / "run_config.json").read_text()
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="may differ only"):
        make_tiny_run(tmp_path / "bad", main, siblings=[(tmp_path / "x", replace(main, lr=1.0))])
