"""Pure pieces of extrapolation: rounding, Eq. 2, the least-squares line, tensor plans."""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.extrapolate import kernels as K
from pipeline.extrapolate.plan import (
    DEFAULT_EXCLUDE,
    choose_steps,
    matches,
    plan_tensors,
    resolve_alpha,
)
from pipeline.workspace import Workspace

BF16 = np.dtype(ml_dtypes.bfloat16)


def _random_f32(n: int, seed: int = 0) -> np.ndarray:
    """Every kind of float32: random bit patterns (incl. subnormals, inf) plus exact bf16 ties."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 2**16, size=n // 4, dtype=np.uint64).astype(np.uint32) << 16) | 0x8000
    x = np.concatenate([bits, ties]).view(np.float32)
    return x[~np.isnan(x)]


def test_round_to_bf16_is_nearest_even_like_torch_and_ml_dtypes():
    x = _random_f32(400_000)
    ours = K.round_to(x, BF16).view(np.uint16)
    with np.errstate(over="ignore"):
        ref_ml = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    ref_torch = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, ref_ml)
    np.testing.assert_array_equal(ours, ref_torch)
    # a tie rounds to the even neighbour: 1 + 2^-8 is halfway between 1 and 1 + 2^-7
    assert float(K.round_to(np.array([1 + 2**-8], np.float32), BF16)[0]) == 1.0
    assert float(K.round_to(np.array([1 + 3 * 2**-8], np.float32), BF16)[0]) == 1 + 2**-6


def test_to_float32_widens_bf16_exactly():
    b = _random_f32(100_000).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(K.to_float32(b), b.astype(np.float32))


def test_two_point_is_eq2_in_float32():
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal(10_000).astype(ml_dtypes.bfloat16)
    w1 = (w0.astype(np.float32) + rng.standard_normal(10_000) * 1e-2).astype(ml_dtypes.bfloat16)
    a, b = w0.astype(np.float32), w1.astype(np.float32)
    for alpha in (0.5, 1.0, 1.37, 3.0):
        np.testing.assert_array_equal(K.two_point(w0, w1, alpha),
                                      a + np.float32(alpha) * (b - a))
    np.testing.assert_array_equal(K.two_point(w0, w1, 1.0), b)  # alpha = 1 gives W1 back


def test_fit_line_matches_polyfit_and_gate_picks_per_element():
    rng = np.random.default_rng(2)
    steps = [0, 10, 20, 40, 70]
    line = rng.standard_normal(500)[None] + 1e-3 * rng.standard_normal(500)[None] * \
        np.array(steps)[:, None]
    noisy = line + 1e-3 * rng.standard_normal(line.shape) * (np.arange(500) % 2)
    vals = noisy.astype(np.float32)
    vals[:, 7] = vals[0, 7]  # a static element
    fit, last = K.fit_line(list(vals), steps)
    slope, intercept = np.polyfit(np.array(steps, float), vals.astype(np.float64), 1)
    # float32 results, as the fit stage writes them: each within one float32 rounding
    assert fit.slope.dtype == fit.intercept.dtype == np.float32
    eps = 2.0**-24
    tiny = 1e-9 * np.abs(slope).max()  # polyfit's own rounding (the static element)
    assert (np.abs(fit.slope - slope) <= 1.01 * eps * np.abs(slope) + tiny).all()
    pred64 = intercept + slope * 100
    err = np.abs(K.line_value(fit.slope, fit.intercept, 100) - pred64)
    assert (err <= 1.01 * eps * (np.abs(intercept) + 100 * np.abs(slope)) + tiny).all()
    np.testing.assert_array_equal(last, vals[-1])
    assert np.isnan(fit.r2[7])
    pred = K.line_value(fit.slope, fit.intercept, 100)
    gated = K.gate(pred, last, fit.r2, 0.99)
    use_line = np.nan_to_num(fit.r2, nan=-1) >= 0.99
    assert 0 < use_line.sum() < use_line.size  # both branches are exercised
    np.testing.assert_array_equal(gated[use_line], pred[use_line])
    np.testing.assert_array_equal(gated[~use_line], last[~use_line].astype(np.float64))


def test_default_exclude_catches_norms_only():
    names = ["model.layers.0.input_layernorm.weight", "model.norm.weight", "model.ln_f.bias",
             "model.layers.0.self_attn.q_norm.weight", "model.layers.0.mlp.up_proj.weight",
             "lm_head.weight", "model.embed_tokens.weight"]
    moved = [n for n in names if not matches(n, DEFAULT_EXCLUDE)]
    assert moved == ["model.layers.0.mlp.up_proj.weight", "lm_head.weight",
                     "model.embed_tokens.weight"]
    assert matches("model.layers.11.mlp.up_proj.weight", ["re:layers\\.1[0-9]\\."])
    assert not matches("model.layers.1.mlp.up_proj.weight", ["re:layers\\.1[0-9]\\."])


def test_plan_drops_tied_head_copies_ints_and_refuses_shape_changes():
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "buf"]
    shapes = {n: [(4, 2), (4, 2)] for n in names}
    dtypes = {n: BF16 for n in names} | {"buf": np.dtype(np.int64)}
    plans = {p.name: p for p in plan_tensors(names, shapes, dtypes, tied=True)}
    assert "lm_head.weight" not in plans
    assert plans["model.embed_tokens.weight"].action == "move"
    assert plans["model.norm.weight"].action == "copy"
    assert plans["buf"].action == "copy"
    plans = {p.name: p for p in plan_tensors(names, shapes, dtypes, exclude=(),
                                             out_dtype=np.dtype(np.float32))}
    assert plans["model.norm.weight"].action == "move"
    assert plans["lm_head.weight"].out_dtype == np.float32
    assert plans["buf"].out_dtype == np.int64  # never converted
    shapes["lm_head.weight"] = [(4, 2), (5, 2)]
    with pytest.raises(PipelineError, match="changes shape"):
        plan_tensors(names, shapes, dtypes)


def test_alpha_and_step_rules():
    assert resolve_alpha(0, 100, to=150) == (1.5, 150.0)
    assert resolve_alpha(20, 60, alpha=2.0) == (2.0, 100.0)
    with pytest.raises(PipelineError, match="not beyond"):
        resolve_alpha(0, 100, to=100)
    assert resolve_alpha(0, 100, to=50, allow_interpolation=True)[0] == 0.5
    with pytest.raises(PipelineError, match="exactly one"):
        resolve_alpha(0, 100, to=150, alpha=1.5)
    assert choose_steps([0, 10, 20], None, "pair", "two-point") == [0, 20]
    assert choose_steps([0, 10, 20, 30], None, "window", "lstsq", window=3) == [10, 20, 30]
    with pytest.raises(PipelineError, match="not in the source"):
        choose_steps([0, 10, 20], [0, 15], "pair", "two-point")
    with pytest.raises(PipelineError, match="exactly two"):
        choose_steps([0, 10, 20], [0, 10, 20], "pair", "two-point")


def test_round_to_bf16_special_values_without_warnings():
    bits32 = np.array([0x7F800000, 0xFF800000,  # +-inf stay inf
                       0x7F7FFFFF, 0xFF7FFFFF,  # +-max float32 round up to +-inf
                       0x00008000, 0x00018000,  # subnormal ties: to even (0, then 2)
                       0x80000000,  # -0 keeps its sign
                       0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF],  # NaNs
                      np.uint32)
    x = bits32.view(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = K.round_to(x, BF16).view(np.uint16)
        tp = K.two_point(x, x, 1.0, out=np.empty(x.shape, BF16)).view(np.uint16)
    assert [hex(v) for v in got[:7]] == ["0x7f80", "0xff80", "0x7f80", "0xff80", "0x0", "0x2",
                                         "0x8000"]
    nan = got[7:]
    assert ((nan & 0x7F80) == 0x7F80).all() and (nan & 0x0040).all()  # quiet NaNs
    np.testing.assert_array_equal(nan >> 15, bits32[7:] >> 31)  # of the same sign
    np.testing.assert_array_equal(tp[2:6], got[2:6])  # overflow and ties as in round_to


@pytest.mark.parametrize("out_dtype", [BF16, np.dtype(np.float16), np.dtype(np.float32)])
def test_two_point_same_bits_whatever_the_thread_split(monkeypatch, out_dtype):
    monkeypatch.setattr(K, "PARALLEL_MIN", 1000)
    rng = np.random.default_rng(3)
    n = 5 * K.TILE + 123  # several tiles, uneven ranges
    w0 = rng.standard_normal((n // 7, 7)).astype(BF16)
    w1 = (w0.astype(np.float32) + rng.standard_normal(w0.shape) * 1e-2).astype(BF16)
    a, b = w0.astype(np.float32), w1.astype(np.float32)
    with np.errstate(over="ignore"):
        want = (a + np.float32(1.37) * (b - a)).astype(out_dtype)
    ws = Workspace()
    for threads in (1, 2, 3, 8):
        got = K.two_point(w0, w1, 1.37, out=np.empty(w0.shape, out_dtype), ws=ws,
                          threads=threads)
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
