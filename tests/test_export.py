"""Exports from real tiny RLVR runs: exact arithmetic, loadable models, safe failure."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.extrapolate.export import export, make_spec
from pipeline.extrapolate.plan import DEFAULT_EXCLUDE, matches
from pipeline.extrapolate.sources import CheckpointSource, StoreSource

BF16 = np.dtype(ml_dtypes.bfloat16)


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) folder with the reference safetensors loader."""
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
             if index.exists() else ["model.safetensors"])
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(folder / f))
    return out


def as_f32(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy()


def bits(t: torch.Tensor) -> np.ndarray:
    width = {2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.contiguous().view(width).numpy()


def eq2_numpy(w0: torch.Tensor, w1: torch.Tensor, alpha: float, dtype: np.dtype) -> np.ndarray:
    """Eq. 2 computed independently: numpy float32, rounded to ``dtype`` by ml_dtypes/numpy."""
    a, b = as_f32(w0), as_f32(w1)
    w = a + np.float32(alpha) * (b - a)
    return w.astype(dtype)


def no_leftovers(parent: Path, name: str) -> bool:
    return not any(p.name.startswith(f".{name}.") for p in parent.iterdir())


def generate(folder: Path) -> tuple[torch.nn.Module, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(["12+34="], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc.input_ids.shape[1]
    return model, tok.decode(out[0, enc.input_ids.shape[1]:])


def test_two_point_equals_independent_eq2_bit_for_bit(tiny_run_bf16, tmp_path):
    src = CheckpointSource.from_run_dir(tiny_run_bf16)
    spec = make_spec(src, "two-point", to=150)
    assert spec.steps == (0, 100) and spec.alpha == 1.5
    out = tmp_path / "m"
    res = export(src, out, spec)
    got = load_folder(out)
    w0 = load_folder(tiny_run_bf16 / "global_step_0")
    w1 = load_folder(tiny_run_bf16 / "global_step_100")
    assert set(got) == set(w1)
    n_moved = 0
    for name, t in got.items():
        assert t.dtype == torch.bfloat16
        if matches(name, DEFAULT_EXCLUDE):
            np.testing.assert_array_equal(bits(t), bits(w1[name]), err_msg=name)
        else:
            want = eq2_numpy(w0[name], w1[name], 1.5, BF16).view(np.int16)
            np.testing.assert_array_equal(bits(t), want, err_msg=name)
            n_moved += 1
    assert n_moved == len(res.moved) > 0 and len(res.copied) > 0
    assert not np.array_equal(bits(got["lm_head.weight"]), bits(w1["lm_head.weight"]))
    with safe_open(out / "model.safetensors", "pt") as f:
        md = f.metadata()
    assert md["format"] == "pt" and md["method"] == "two-point"
    assert json.loads(md["steps"]) == [0, 100] and float(md["alpha"]) == 1.5
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (tiny_run_bf16 / "global_step_100" / f).read_bytes()
    assert no_leftovers(tmp_path, "m")
    generate(out)


def test_fp32_source_written_as_bf16_rounds_to_nearest_even(tiny_run_fp32, tmp_path):
    src = CheckpointSource.from_run_dir(tiny_run_fp32)
    spec = make_spec(src, "two-point", steps=[10, 40], to=70)
    export(src, tmp_path / "m", spec, dtype="bfloat16")
    got = load_folder(tmp_path / "m")
    w0 = load_folder(tiny_run_fp32 / "global_step_10")
    w1 = load_folder(tiny_run_fp32 / "global_step_40")
    name = "model.layers.0.mlp.up_proj.weight"
    assert got[name].dtype == torch.bfloat16
    np.testing.assert_array_equal(bits(got[name]),
                                  eq2_numpy(w0[name], w1[name], 2.0, BF16).view(np.int16))
    norm = "model.norm.weight"  # copied, but still rounded to the output dtype
    np.testing.assert_array_equal(bits(got[norm]), as_f32(w1[norm]).astype(BF16).view(np.int16))
    assert json.loads((tmp_path / "m/config.json").read_text())["dtype"] == "bfloat16"
    generate(tmp_path / "m")


def test_lstsq_at_last_stored_step_reproduces_the_fit_line(tiny_run_bf16, tmp_path):
    src = CheckpointSource.from_run_dir(tiny_run_bf16)
    spec = make_spec(src, "lstsq", to=100, allow_interpolation=True)
    export(src, tmp_path / "m", spec)
    got = load_folder(tmp_path / "m")
    steps = np.array(src.steps, dtype=np.float64)
    ckpts = [load_folder(tiny_run_bf16 / f"global_step_{s}") for s in src.steps]
    name = "model.layers.1.mlp.down_proj.weight"
    y = np.stack([as_f32(c[name]).astype(np.float64).ravel() for c in ckpts])
    slope, intercept = np.polyfit(steps, y, 1)
    want = intercept + slope * 100  # float64 reference
    have = got[name].float().numpy().ravel().astype(np.float64)
    # one bf16 rounding (2^-9 relative) plus float64 summation-order noise, which is
    # absolute: where the line cancels to ~0 no relative (or ULP) bound holds
    scale = np.abs(y).max()
    np.testing.assert_allclose(have, want, rtol=2.0**-8, atol=1e-9 * scale)
    # and the line is not just the last checkpoint
    assert not np.array_equal(have, as_f32(ckpts[-1][name]).ravel().astype(np.float64))


def test_gated_takes_the_line_or_the_last_checkpoint(tiny_run_bf16, tmp_path):
    src = CheckpointSource.from_run_dir(tiny_run_bf16)
    export(src, tmp_path / "l", make_spec(src, "lstsq", to=150))
    export(src, tmp_path / "g", make_spec(src, "gated", to=150, r2_min=0.6))
    line, gated = load_folder(tmp_path / "l"), load_folder(tmp_path / "g")
    last = load_folder(tiny_run_bf16 / "global_step_100")
    name = "model.layers.0.self_attn.q_proj.weight"
    g, ln, la = bits(gated[name]), bits(line[name]), bits(last[name])
    from_line, from_last = g == ln, g == la
    assert (from_line | from_last).all()
    assert (from_line & ~from_last).any() and (from_last & ~from_line).any()


def test_sharded_source_and_sharded_output(tiny_run_sharded, tmp_path):
    src = CheckpointSource.from_run_dir(tiny_run_sharded)
    assert (src.files_folder / "model.safetensors.index.json").exists()
    spec = make_spec(src, "two-point", to=60)
    res = export(src, tmp_path / "m", spec, max_shard_size="120KB")
    assert len(res.files) > 1
    index = json.loads((tmp_path / "m/model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(res.files)
    for f in res.files:
        assert (tmp_path / "m" / f).stat().st_size <= 120_000 + 4096  # + header
    got = load_folder(tmp_path / "m")
    w0 = load_folder(tiny_run_sharded / "global_step_0")
    w1 = load_folder(tiny_run_sharded / "global_step_40")
    name = "model.embed_tokens.weight"
    np.testing.assert_array_equal(bits(got[name]),
                                  eq2_numpy(w0[name], w1[name], 1.5, BF16).view(np.int16))
    generate(tmp_path / "m")


def test_tied_embeddings_stay_tied(tiny_run_tied, tmp_path):
    src = CheckpointSource.from_run_dir(tiny_run_tied)
    assert src.config["tie_word_embeddings"] is True
    export(src, tmp_path / "m", make_spec(src, "two-point", to=60))
    got = load_folder(tmp_path / "m")
    assert "lm_head.weight" not in got
    model, _ = generate(tmp_path / "m")
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    np.testing.assert_array_equal(bits(emb.detach()), bits(got["model.embed_tokens.weight"]))


def test_bad_inputs_fail_cleanly(tiny_run_bf16, tmp_path):
    src = CheckpointSource.from_run_dir(tiny_run_bf16)
    with pytest.raises(PipelineError, match="not beyond"):
        make_spec(src, "two-point", to=100)
    with pytest.raises(PipelineError, match="not in the source"):
        make_spec(src, "two-point", steps=[0, 55], to=200)
    with pytest.raises(PipelineError, match="unknown method"):
        make_spec(src, "cubic", to=200)
    with pytest.raises(PipelineError, match="r2-min"):
        make_spec(src, "gated", to=200)
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    spec = make_spec(src, "two-point", to=150)
    with pytest.raises(PipelineError, match="exists"):
        export(src, out, spec)
    assert (out / "keep.txt").read_text() == "x"

    def boom(_plan: object) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        export(src, tmp_path / "n", spec, on_tensor=boom)
    assert not (tmp_path / "n").exists() and no_leftovers(tmp_path, "n")
    with pytest.raises(RuntimeError):
        export(src, out, spec, force=True, on_tensor=boom)
    assert (out / "keep.txt").exists()  # a failed --force leaves the old output alone
    export(src, out, spec, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_shape_change_between_checkpoints_is_refused(tiny_run_fp32, copy_run, tmp_path):
    from pipeline.checkpoints.writer import write_tensors

    run = copy_run(tiny_run_fp32)
    last = run / "global_step_40"
    sd = {k: v.numpy() for k, v in load_file(last / "model.safetensors").items()}
    sd["lm_head.weight"] = np.concatenate([sd["lm_head.weight"], sd["lm_head.weight"][:1]])
    (last / "model.safetensors").unlink()
    write_tensors(last, sd)
    src = CheckpointSource.from_run_dir(run)
    with pytest.raises(PipelineError, match="changes shape"):
        export(src, tmp_path / "m", make_spec(src, "two-point", to=80))
    assert not (tmp_path / "m").exists()


def test_store_source_exports_the_same_bytes_and_the_fit_line(tiny_run_fp32, tmp_path):
    from distributed import Client

    from pipeline.fit import fit_store, open_fit
    from pipeline.store.ingest import ingest

    store = tmp_path / "run.zarr"
    with Client(processes=False, n_workers=1, threads_per_worker=2,
                dashboard_address=None) as client:
        ingest(tiny_run_fp32, store, client=client, progress=False)
        fit_store(store, client=client, progress=False)
    a, b = StoreSource(store), CheckpointSource.from_run_dir(tiny_run_fp32)
    assert a.files_folder == b.files_folder
    for name, src in (("a", a), ("b", b)):
        export(src, tmp_path / name, make_spec(src, "gated", to=60, r2_min=0.5))
    assert (tmp_path / "a/model.safetensors").read_bytes() == \
        (tmp_path / "b/model.safetensors").read_bytes()
    # lstsq at the last stored step is the fit stage's own line (stored as float32)
    export(a, tmp_path / "l", make_spec(a, "lstsq", to=40, allow_interpolation=True))
    got = load_folder(tmp_path / "l")
    fit = open_fit(store)
    assert fit.steps == a.steps
    for name in ("model.layers.0.mlp.up_proj.weight", "lm_head.weight"):
        ds = fit[name]
        line = ds["intercept"].values.astype(np.float64) + \
            ds["slope"].values.astype(np.float64) * 40
        # export fits with the fit stage's own kernel: the same float32 line, bit for bit
        np.testing.assert_array_equal(as_f32(got[name]).ravel(),
                                      line.astype(np.float32).ravel())


def test_cli_extrapolate_and_its_errors(tiny_run_bf16, tmp_path):
    runner = CliRunner()
    c0, c1 = tiny_run_bf16 / "global_step_20", tiny_run_bf16 / "global_step_60"
    out = tmp_path / "m"
    args = ["extrapolate", "--from-checkpoints", str(c0), str(c1), "--to", "100",
            "--out", str(out), "--no-progress"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "alpha" in r.output and (out / "model.safetensors").exists()
    with safe_open(out / "model.safetensors", "pt") as f:
        assert json.loads(f.metadata()["steps"]) == [20, 60]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "exists" in r.output
    r = runner.invoke(app, ["extrapolate", str(tiny_run_bf16), "--to", "50", "--out",
                            str(tmp_path / "x"), "--no-progress"])
    assert r.exit_code == 2 and "not beyond" in r.output
    assert not (tmp_path / "x").exists()


class _PlainSource:
    """A CheckpointSource seen only through the WeightSource protocol (no direct reads)."""

    def __init__(self, inner: CheckpointSource) -> None:
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


@pytest.mark.parametrize("method", ["two-point", "lstsq"])
def test_buffered_reads_write_the_same_bytes_in_small_blocks(tiny_run_bf16, tmp_path, method):
    """Reusable read buffers + small blocks (copied norms span several blocks in flight)."""
    src = CheckpointSource.from_run_dir(tiny_run_bf16)
    spec = make_spec(src, method, to=150)
    for name, s, bb in (("ref", _PlainSource(src), None), ("small", src, 4096),
                        ("default", src, None)):
        kw = {} if bb is None else {"block_bytes": bb}
        export(s, tmp_path / name, spec, **kw)
    ref = (tmp_path / "ref/model.safetensors").read_bytes()
    assert (tmp_path / "small/model.safetensors").read_bytes() == ref
    assert (tmp_path / "default/model.safetensors").read_bytes() == ref
