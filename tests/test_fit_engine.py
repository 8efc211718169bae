"""The fused kernel (``pipeline.engine``) against the numpy reference (``tests/reference_fit.py``).

Real bf16 and fp32 tiny RL runs read straight from their safetensors files,
plus edge cases with known answers. The arithmetic is the reference's,
operation for operation, so per-element float32 results must be *equal*
(NaN == NaN); histograms and counts equal; the float64 R² sums within
rounding (they are added in another order).
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import reference_fit as R
from safetensors import safe_open

from pipeline.checkpoints.discover import discover_checkpoints
from pipeline.engine import BACKENDS, get_backend
from pipeline.engine.signs import flip_mask, sign_offset, sign_words
from pipeline.engine.spec import RESULTS, SELECTIONS, XStats, codec_for, kernel_inputs

CPU_BACKENDS = ["numba", "numba-threads", "torch-cpu"]
N_BINS = 50


def _fit(be, vals: np.ndarray, steps, seed: int, name: str, flat0: int):
    """One block through a backend: (results, counts)."""
    k = vals.shape[0]
    m = int(np.prod(vals.shape[1:], dtype=np.int64))
    codec = codec_for(vals.dtype)
    bits, wide = kernel_inputs(vals.reshape(k, m), codec)
    words = sign_words(seed, name, [None, *steps[1:]], flat0, flat0 + m)
    out = {r: np.full(m, 7.0, np.float32) for r in RESULTS}
    xs = np.array([float(s - steps[0]) for s in steps])
    counts = be.fit(bits, wide, codec, xs, words, sign_offset(flat0), XStats.from_steps(steps),
                    N_BINS, out)
    return out, counts


def _reference(vals: np.ndarray, steps, seed: int, name: str, flat0: int):
    k = vals.shape[0]
    m = int(np.prod(vals.shape[1:], dtype=np.int64))
    v = vals.reshape(k, m)
    st = R.init_state(v[0])
    with np.errstate(invalid="ignore", over="ignore"):
        R.update(st, v[1:], [float(s - steps[0]) for s in steps[1:]],
                 R.flip_masks(seed, name, steps[1:], flat0, flat0 + m))
    out = {r: np.empty(m, np.float32) for r in RESULTS}
    tot = R.finish(st, R.XStats.from_steps(steps), vals.dtype, N_BINS, out)
    return out, tot


def assert_matches(got, want) -> None:
    out, counts = got
    ref, tot = want
    for r in RESULTS:
        np.testing.assert_array_equal(out[r], ref[r], err_msg=r)
    assert counts.n_static == tot.n_static
    assert counts.n_nonfinite == tot.n_nonfinite
    for name in SELECTIONS:
        s, w = counts.selection(name), tot.summaries[name]
        np.testing.assert_array_equal(s["hist"], w.hist, err_msg=name)
        np.testing.assert_array_equal(s["null_hist"], w.null_hist, err_msg=name)
        assert (s["n_selected"], s["n_above"], s["null_above"]) == \
            (w.n_selected, w.n_above, w.null_above), name
        assert (s["removed_min_change"], s["removed_distinct"]) == tot.removed[name]
        assert s["r2_sum"] == pytest.approx(w.r2_sum, rel=1e-12, abs=1e-12)
        assert s["null_sum"] == pytest.approx(w.null_sum, rel=1e-12, abs=1e-12)


def load_steps(run: Path) -> tuple[list[int], dict[str, np.ndarray]]:
    """Every step of every tensor, from the safetensors files (not through our store)."""
    cps = discover_checkpoints(run)
    data: dict[str, list[np.ndarray]] = {}
    for cp in cps:
        for f in sorted(cp.path.glob("*.safetensors")):
            with safe_open(str(f), "np") as st:
                for key in st.keys():
                    data.setdefault(key, []).append(st.get_tensor(key))
    return [c.step for c in cps], {k: np.stack(v) for k, v in data.items()}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("which", ["bf16", "fp32"])
def test_engine_equals_reference_on_real_runs(which, backend, request) -> None:
    steps, data = load_steps(request.getfixturevalue(f"tiny_run_{which}"))
    assert len(steps) >= 5
    be = get_backend(backend)
    n_static = n_paper = 0
    for name, w in data.items():
        k = w.shape[0]
        flat = w.reshape(k, -1)
        # two pieces, the second starting off a Philox block and a 64-bit word
        cut = min(flat.shape[1], 333)
        for lo, hi in ((0, cut), (cut, flat.shape[1])):
            if hi <= lo:
                continue
            got = _fit(be, np.ascontiguousarray(flat[:, lo:hi]), steps, 3, name, lo)
            want = _reference(flat[:, lo:hi], steps, 3, name, lo)
            assert_matches(got, want)
            n_static += want[1].n_static
            n_paper += want[1].summaries["paper"].n_selected
    assert n_paper > 0
    if which == "bf16":
        assert n_static > 0, "a real bf16 run has elements that never move"


@pytest.mark.parametrize("backend", ["numba", "torch-cpu"])
def test_steps_in_several_reads_equal_one_pass(tiny_run_bf16, backend) -> None:
    """The carry (steps read in batches) gives what one pass gives, bit for bit."""
    steps, data = load_steps(tiny_run_bf16)
    name = "model.layers.0.mlp.down_proj.weight"
    vals = data[name].reshape(len(steps), -1)
    m = vals.shape[1]
    be = get_backend(backend)
    want = _fit(be, vals, steps, 1, name, 0)
    codec = codec_for(vals.dtype)
    xs = np.array([float(s - steps[0]) for s in steps])
    signed = [None, *steps[1:]]
    for batch in (2, 3, len(steps) - 1):
        carry = be.start(m)
        for i in range(0, len(steps), batch):
            j = min(i + batch, len(steps))
            bits, wide = kernel_inputs(vals[i:j], codec)
            be.add(carry, bits, wide, codec, xs[i:j], sign_words(1, name, signed[i:j], 0, m), 0)
        out = {r: np.empty(m, np.float32) for r in RESULTS}
        counts = be.finish(carry, XStats.from_steps(steps), N_BINS, out)
        for r in RESULTS:
            np.testing.assert_array_equal(out[r], want[0][r])
        np.testing.assert_array_equal(counts.hist, want[1].hist)
        np.testing.assert_array_equal(counts.counts, want[1].counts)


def _few_values(rng: np.random.Generator, k: int, m: int, dtype) -> np.ndarray:
    """k steps of m elements drawing from 1..6 values (+0/-0, a NaN, an inf among them)."""
    pool = np.array([0.0, -0.0, 1.0, 2.0, 3.0, 0.5, np.nan, np.inf], np.float32).astype(dtype)
    n_vals = rng.integers(1, 7, m)
    idx = (rng.random((k, m)) * n_vals).astype(np.int64)
    idx[:, rng.random(m) < 0.02] = 6  # some elements are NaN throughout
    idx[rng.integers(0, k), rng.random(m) < 0.02] = 7  # some see an inf once
    return pool[idx]


def _walk(rng: np.random.Generator, k: int, m: int, dtype) -> np.ndarray:
    w = (np.cumsum(rng.integers(-1, 2, (k, m)) * (rng.random((k, m)) < 0.4), 0) * 2.0 ** -9
         + np.linspace(0, 1, k)[:, None] * rng.random(m) * 1e-2 + rng.standard_normal(m) * 0.02)
    return w.astype(np.float32).astype(dtype)


DTYPES = [ml_dtypes.bfloat16, np.float16, np.float32, np.float64, np.int32]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("k", [2, 3, 13, 150])
def test_edge_cases_equal_reference(backend, dtype, k) -> None:
    """Static, NaN/inf, -0.0, few values, 2 steps, > 64 steps, every codec."""
    rng = np.random.default_rng(k)
    m = 5003  # several tiles, the last one short
    dt = np.dtype(dtype)
    steps = sorted(rng.choice(10 * k, k, replace=False).tolist())
    if dt.kind == "i":
        vals = rng.integers(-3, 4, (k, m)).astype(dt)
        vals[:, ::7] = vals[:1, ::7]  # static columns
    else:
        vals = np.concatenate([_few_values(rng, k, m // 2, dt), _walk(rng, k, m - m // 2, dt)], 1)
    assert_matches(_fit(get_backend(backend), vals, steps, 5, "t", 1000 + k),
                   _reference(vals, steps, 5, "t", 1000 + k))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(), (1,), (7, 1), (1, 9), (0, 4)], ids=str)
def test_small_shapes(backend, shape) -> None:
    """0-d, single-column, single-row and zero-element tensors."""
    rng = np.random.default_rng(2)
    steps = [0, 5, 10, 20]
    vals = _walk(rng, len(steps), max(1, int(np.prod(shape))), ml_dtypes.bfloat16)
    vals = vals[:, : int(np.prod(shape))].reshape(len(steps), *shape)
    got = _fit(get_backend(backend), vals, steps, 0, "s", 0)
    if vals[0].size:
        assert_matches(got, _reference(vals, steps, 0, "s", 0))
    else:
        assert all(got[0][r].size == 0 for r in RESULTS) and not got[1].counts.any()


def test_known_answer() -> None:
    """Arithmetic with a known answer (not a claim about linearity)."""
    vals = np.array([[1.0, 2.0, 0.0, 5.0, -0.0],
                     [1.0, 2.5, -0.0, 5.0, 0.0],
                     [1.0, 2.0, 0.0, 5.5, -0.0],
                     [1.0, 2.5, 0.0, 6.0, 0.0],
                     [1.0, 2.0, 0.0, 6.5, 0.0]], dtype=ml_dtypes.bfloat16)
    out, counts = _fit(get_backend("numba"), vals, [0, 10, 20, 30, 40], 0, "t", 0)
    assert counts.n_static == 3  # columns 0, 2, 4 (+0 and -0 are one value)
    assert np.isnan(out["r2"][[0, 2, 4]]).all() and out["slope"][0] == 0.0
    assert out["intercept"][0] == 1.0
    # column 3: 5, 5, 5.5, 6, 6.5 -> slope 0.04 per step; 4 distinct values, range 1.5
    np.testing.assert_allclose(out["slope"][3], 0.04, rtol=1e-6)
    assert counts.selection("paper")["n_selected"] == 1  # column 1 takes 2 values only
    assert counts.selection("paper")["removed_distinct"] == 1


def test_sign_words_are_flip_mask() -> None:
    for start, stop in [(0, 1), (0, 5000), (255, 257), (1000, 4321), (70_000, 70_064)]:
        words = sign_words(7, "t", [30, None], start, stop)
        o = sign_offset(start)
        idx = o + np.arange(stop - start)
        bits = (words[0][idx >> 6] >> (idx & 63).astype(np.uint64)) & np.uint64(1)
        np.testing.assert_array_equal(bits.astype(bool), flip_mask(7, "t", 30, start, stop))
        assert not words[1].any()


def test_registry() -> None:
    from pipeline.errors import PipelineError

    assert {"numba", "torch"} <= set(BACKENDS)
    assert get_backend("numba") is get_backend("numba")
    with pytest.raises(PipelineError, match="unknown fit backend"):
        get_backend("nope")


@pytest.mark.gpu
def test_torch_cuda_equals_numba(tiny_run_bf16) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    steps, data = load_steps(tiny_run_bf16)
    be = get_backend("torch")
    assert be.device.type == "cuda"
    for name, w in data.items():
        vals = w.reshape(len(steps), -1)
        assert_matches(_fit(be, vals, steps, 3, name, 0), _reference(vals, steps, 3, name, 0))


@pytest.mark.parametrize("flat0", [0, 192, 256 * 5, 77])
def test_sign_words_aligned_and_not(flat0) -> None:
    """Pieces starting on a 64-bit word (whole-word sign unpacking) or inside one."""
    rng = np.random.default_rng(flat0)
    steps = [0, 3, 7, 8, 20]
    vals = _walk(rng, len(steps), 2048 * 2 + 64, ml_dtypes.bfloat16)
    assert_matches(_fit(get_backend("numba"), vals, steps, 9, "a", flat0),
                   _reference(vals, steps, 9, "a", flat0))
