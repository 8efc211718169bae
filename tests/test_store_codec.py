"""Pure parts of the store: step encoding, name escaping, NaN/inf counts, block planning."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import PipelineError
from pipeline.store.codec import count_nonfinite, decode, encode, encode_into
from pipeline.store.layout import group_tasks, plan_pieces
from pipeline.store.naming import check_names, escape_name, unescape_name


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_encode_roundtrip_every_width(width: int) -> None:
    u = np.dtype(f"<u{width}")
    rng = np.random.default_rng(width)
    hi = np.iinfo(u).max
    a = rng.integers(0, hi, 4096, dtype=u, endpoint=True)
    b = rng.integers(0, hi, 4096, dtype=u, endpoint=True)
    np.testing.assert_array_equal(decode(encode(a, b), b), a)
    assert encode(b, b).any() == False  # noqa: E712 - unchanged elements encode to zero


def test_one_ulp_moves_encode_small() -> None:
    w = np.linspace(-1, 1, 1000, dtype=np.float32).astype(ml_dtypes.bfloat16).view("<u2")
    up, down = w + np.uint16(1), w - np.uint16(1)
    assert encode(up, w).max() <= 2 and encode(down, w).max() <= 2


@given(st.text(max_size=16))  # <= 16 chars always fit escaped (<= 12 bytes each)
def test_escape_is_reversible_and_one_safe_component(name: str) -> None:
    if not name:
        with pytest.raises(PipelineError):
            escape_name(name)
        return
    comp = escape_name(name)
    assert unescape_name(comp) == name
    assert "/" not in comp and "\\" not in comp
    assert comp not in (".", "..") and not comp.startswith((".", "_"))


def test_escape_refuses_what_cannot_be_safe() -> None:
    assert escape_name("../x") == "%2E.%2Fx"
    assert escape_name("__x") == "%5F_x"
    with pytest.raises(PipelineError, match="too long"):
        escape_name("x" * 500)
    with pytest.raises(PipelineError, match="same array path"):
        check_names(["A.weight", "a.weight"])


def test_count_nonfinite_matches_numpy() -> None:
    x = np.array([np.nan, np.inf, -np.inf, 1.0, -0.0, 3e38, -np.nan], dtype=np.float32)
    want = (2, 1, 1)
    assert count_nonfinite(x.view("<u4"), "float32") == want
    assert count_nonfinite(x.astype(np.float64).view("<u8"), "float64") == want
    assert count_nonfinite(x.astype(ml_dtypes.bfloat16).view("<u2"), "bfloat16") == want
    # 3e38 overflows fp16 to +inf
    assert count_nonfinite(x.astype(np.float16).view("<u2"), "float16") == (2, 2, 1)
    assert count_nonfinite(np.arange(5, dtype="<u8"), "int64") == (0, 0, 0)


@given(st.integers(0, 5000), st.integers(1, 64), st.integers(1, 100), st.integers(1, 10_000))
def test_pieces_cover_rows_on_chunk_boundaries(rows: int, row_bytes: int, crows: int,
                                               block: int) -> None:
    pieces = plan_pieces("t", (rows, row_bytes), 1, crows, block)
    covered = [r for p in pieces for r in range(p.start, p.stop)]
    assert covered == list(range(rows))
    assert all(p.start % crows == 0 for p in pieces)
    tasks = group_tasks(pieces * 3, block)
    assert sum(len(t) for t in tasks) == 3 * len(pieces)
    assert all(len(t) == 1 or sum(p.nbytes for p in t) <= block for t in tasks)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_count_nonfinite_every_16_bit_pattern(dtype: str) -> None:
    allbits = np.arange(1 << 16, dtype="<u2")
    with np.errstate(all="ignore"):
        f = allbits.view(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16).astype(
            np.float64)
    want = (int(np.isnan(f).sum()), int(np.isposinf(f).sum()), int(np.isneginf(f).sum()))
    assert count_nonfinite(allbits, dtype) == want
    finite = allbits[np.isfinite(f)]
    assert count_nonfinite(finite, dtype) == (0, 0, 0)
    for k in np.flatnonzero(~np.isfinite(f))[::37]:  # any one special value is seen
        assert sum(count_nonfinite(np.append(finite[::1000], allbits[k]), dtype)) == 1


@pytest.mark.parametrize("width", [2, 4, 8])
def test_encode_into_equals_encode_and_leaves_bits(width: int) -> None:
    u = np.dtype(f"<u{width}")
    rng = np.random.default_rng(width + 10)
    hi = np.iinfo(u).max
    a = rng.integers(0, hi, (64, 3), dtype=u, endpoint=True)
    b = rng.integers(0, hi, (64, 3), dtype=u, endpoint=True)
    keep = a.copy()
    out, scratch = np.full_like(a, 7), np.full_like(a, 9)
    np.testing.assert_array_equal(encode_into(a, b, out, scratch), encode(a, b))
    np.testing.assert_array_equal(a, keep)


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_fused_kernels_equal_numpy_passes(width: int) -> None:
    """The one-pass numba kernels (large blocks) give the numpy passes' bits exactly."""
    from pipeline.store import zigzag
    from pipeline.store.codec import FUSED_MIN_ELEMENTS

    u = np.dtype(f"<u{width}")
    rng = np.random.default_rng(width + 20)
    hi = np.iinfo(u).max
    a = rng.integers(0, hi, (1024, 1025), dtype=u, endpoint=True)
    b = a + rng.integers(-3, 4, a.shape).astype(u)  # small moves, both signs, and wrap-arounds
    b[0, :6] = [0, hi, 1, hi - 1, 1 << (8 * width - 1), (1 << (8 * width - 1)) - 1]
    a[0, :6] = [hi, 0, hi, 0, 0, 1 << (8 * width - 1)]
    want = encode(a, b)  # numpy, allocating
    got = encode_into(a, b, np.full_like(a, 7), np.empty_like(a))
    assert a.size >= FUSED_MIN_ELEMENTS
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(zigzag.encode_into(a, b, np.empty_like(a)), want)
    np.testing.assert_array_equal(decode(want.copy(), b, out=np.full_like(a, 5)), a)
    np.testing.assert_array_equal(decode(want, b), a)  # the allocating numpy path


def _sorted_reference(a: np.ndarray, b: np.ndarray, seg: int) -> np.ndarray:
    """Sorted deltas written out by hand: per segment, the plain deltas taken in the order of
    Python's stable ``sorted`` of the reference's 8 bits below the sign bit."""
    plain = encode(a, b).reshape(-1)
    ref = b.reshape(-1)
    shift = 8 * b.dtype.itemsize - 9
    out = []
    for lo in range(0, plain.size, seg):
        idx = range(lo, min(lo + seg, plain.size))
        out += [plain[i] for i in sorted(idx, key=lambda i: (int(ref[i]) >> shift) & 0xFF)]
    return np.array(out, dtype=a.dtype).reshape(a.shape)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([2, 4, 8]), st.integers(1, 300), st.integers(1, 97), st.integers(0, 99))
def test_sorted_deltas_are_the_plain_ones_grouped_by_the_reference_exponent(
        width: int, n: int, seg: int, seed: int) -> None:
    u = np.dtype(f"<u{width}")
    rng = np.random.default_rng(seed)
    hi = np.iinfo(u).max
    b = rng.integers(0, hi, n, dtype=u, endpoint=True)
    a = b + rng.integers(-4, 5, n).astype(u)
    want = _sorted_reference(a, b, seg)
    np.testing.assert_array_equal(encode(a, b, seg), want)
    np.testing.assert_array_equal(encode_into(a, b, np.full_like(a, 7), np.empty_like(a), seg),
                                  want)
    np.testing.assert_array_equal(decode(want.copy(), b, seg=seg), a)
    np.testing.assert_array_equal(decode(want.copy(), b, out=np.full_like(a, 3), overwrite=True,
                                         seg=seg), a)


def test_sorted_deltas_of_8_bit_patterns_are_plain() -> None:
    a, b = np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8)[::-1].copy()
    np.testing.assert_array_equal(encode(a, b, 16), encode(a, b))


@pytest.mark.parametrize("width", [2, 4, 8])
def test_sorted_fused_kernels_equal_the_reference(width: int) -> None:
    """Large blocks go through the numba kernels: same bits as the numpy path, segment by
    segment (a last segment shorter than the others included)."""
    from pipeline.store import zigzag
    from pipeline.store.codec import FUSED_MIN_ELEMENTS

    u = np.dtype(f"<u{width}")
    rng = np.random.default_rng(width + 30)
    w = rng.standard_normal(1 << 20).astype(np.float32)  # realistic exponents, both signs
    bits = w.view("<u4") if width == 4 else (
        (w.view("<u4") >> 16).astype(u) if width == 2 else w.astype(np.float64).view("<u8"))
    b = np.ascontiguousarray(bits.astype(u))
    a = b + rng.integers(-6, 7, b.size).astype(u)
    seg = 300_007  # not a divisor of the block
    assert a.size >= FUSED_MIN_ELEMENTS
    plain = encode(a, b)
    want = np.empty_like(plain)
    for lo in range(0, a.size, seg):  # numpy's own stable sort as the reference here
        hi_ = min(lo + seg, a.size)
        key = (b[lo:hi_] >> u.type(8 * width - 9)) & u.type(0xFF)
        want[lo:hi_] = plain[lo:hi_][np.argsort(key, kind="stable")]
    got = zigzag.encode_sorted_into(a, b, np.empty_like(a), seg)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(encode_into(a, b, np.empty_like(a), np.empty_like(a), seg), want)
    np.testing.assert_array_equal(zigzag.decode_sorted_into(want, b, np.empty_like(a), seg), a)
    np.testing.assert_array_equal(decode(want.copy(), b, out=np.empty_like(a), seg=seg), a)
    assert not np.array_equal(want, plain)  # the order did change
