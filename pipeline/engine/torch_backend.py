"""The fused fit kernel on torch tensors: CUDA when present, CPU otherwise (for tests).

The same algorithm as ``numba_backend``, vectorised over the elements of a
block with the step loop in Python: each step decodes the raw bits on the
device (bf16 by a 16-bit shift, fp16/fp32 by a view), adds its deltas into
float64 sums in step order and advances the sign-flipped null walk. Every
operation is a separate IEEE float64 kernel (no fused multiply-add), so the
results equal the numba backend's bit for bit; only the order of the R² sums
of the histograms differs (float64 rounding).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.engine.spec import (
    BF16,
    F16,
    F32,
    MIN_CHANGE,
    THRESHOLDS,
    BlockCounts,
    Codec,
    XStats,
    check_block,
)


class _Carry:
    def __init__(self) -> None:
        self.t: dict[str, Any] = {}
        self.started = False


class TorchBackend:
    """Backend on ``device`` (default: CUDA if available, else CPU)."""

    name = "torch"

    def __init__(self, device: str | None = None) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def _to_device(self, a: np.ndarray) -> Any:
        """``a`` on the device; to CUDA through pinned memory, asynchronously.

        The pinned copy is taken at once (the caller may reuse ``a``'s buffer
        for its next read), and the host-to-device copy and every kernel after
        it are queued on the stream, so the CPU goes back to reading and
        decoding the next batch of steps while the GPU works on this one.
        torch's pinned allocator keeps the staging buffer until the copy ran.
        """
        t = self.torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _values(self, bits: np.ndarray, wide: np.ndarray, codec: Codec) -> tuple[Any, Any]:
        """(values float64, bit keys int64 with -0.0 folded) of a (k, m) block, on the device."""
        torch = self.torch
        if codec.kind == BF16:
            raw = self._to_device(np.ascontiguousarray(bits).view(np.int16))
            keys = raw.to(torch.int32) & 0xFFFF
            vals = (keys << 16).view(torch.float32).to(torch.float64)
        elif codec.kind == F16:
            raw = self._to_device(np.ascontiguousarray(bits).view(np.int16))
            keys = raw.to(torch.int32) & 0xFFFF
            vals = raw.view(torch.float16).to(torch.float64)
        elif codec.kind == F32:
            raw = self._to_device(np.ascontiguousarray(bits).view(np.int32))
            keys = raw.to(torch.int64) & 0xFFFFFFFF
            vals = raw.view(torch.float32).to(torch.float64)
        else:
            keys = self._to_device(np.ascontiguousarray(bits).view(np.int64))
            vals = self._to_device(wide)
        keys = keys.to(torch.int64)
        if codec.negz:
            negz = codec.negz if codec.negz < (1 << 63) else codec.negz - (1 << 64)
            keys = torch.where(keys == negz, torch.zeros_like(keys), keys)
        return vals, keys

    def _signs(self, words: np.ndarray, off: int, m: int) -> Any:
        """(k, m) int64: 1 where the null increment is negated (bit off + i of each row)."""
        torch = self.torch
        w = self._to_device(np.ascontiguousarray(words).view(np.int64))
        g = torch.arange(m, device=self.device, dtype=torch.int64) + off
        return (w[:, g >> 6] >> (g & 63)) & 1

    def start(self, m: int) -> _Carry:
        return _Carry()

    def add(self, carry: _Carry, bits: np.ndarray, wide: np.ndarray, codec: Codec,
            xs: np.ndarray, words: np.ndarray, off: int) -> None:
        torch = self.torch
        k, m = bits.shape[0], bits.shape[1]
        vals, keys = self._values(bits, wide, codec)
        flips = self._signs(words, off, m)
        t = carry.t
        r0 = 0
        if not carry.started:
            zero = torch.zeros(m, dtype=torch.float64, device=self.device)
            for f in ("sd", "sxd", "sdd", "se", "sxe", "see", "e", "dprev"):
                t[f] = zero.clone()
            t["w0"] = vals[0].clone()
            t["mn"] = vals[0] + 0.0
            t["mx"] = vals[0] + 0.0
            t["b0"] = keys[0].clone()
            t["v1"] = keys[0].clone()
            t["v2"] = keys[0].clone()
            t["has4"] = torch.zeros(m, dtype=torch.bool, device=self.device)
            r0 = 1
            carry.started = True
        for r in range(r0, k):
            x = float(xs[r])
            d = vals[r] - t["w0"]
            t["sd"] += d
            t["sxd"] += x * d
            t["sdd"] += d * d
            inc = d - t["dprev"]
            inc = torch.where(flips[r] != 0, -inc, inc)
            t["e"] = t["e"] + inc
            ev = t["e"]
            t["se"] += ev
            t["sxe"] += x * ev
            t["see"] += ev * ev
            t["dprev"] = d
            v = vals[r]
            nan = torch.isnan(v)
            t["mn"] = torch.where(nan, v, torch.where(v < t["mn"], v + 0.0, t["mn"]))
            t["mx"] = torch.where(nan, v, torch.where(v > t["mx"], v + 0.0, t["mx"]))
            b = keys[r]
            b0, v1, v2 = t["b0"], t["v1"], t["v2"]
            new = ~t["has4"] & (b != b0) & (b != v1) & (b != v2)
            e1 = v1 == b0
            e2 = v2 == b0
            t["v1"] = torch.where(new & e1, b, v1)
            t["v2"] = torch.where(new & ~e1 & e2, b, v2)
            t["has4"] = t["has4"] | (new & ~e1 & ~e2)

    def finish(self, carry: _Carry, xst: XStats, n_bins: int,
               out: dict[str, np.ndarray]) -> BlockCounts:
        torch = self.torch
        t = carry.t
        nf, sx, sxx, x0 = float(xst.n), xst.sx, xst.centred_sxx, float(xst.x0)
        static = t["sdd"] == 0.0

        def r2_of(sxy: Any, syy: Any) -> Any:
            r = (sxy * sxy) / (sxx * syy)
            r = torch.clamp(r, 0.0, 1.0)
            return torch.where(syy > 0.0, r, torch.full_like(r, float("nan")))

        sxy = t["sxd"] - (sx * t["sd"]) / nf
        syy = torch.where(static, 0.0, t["sdd"] - (t["sd"] * t["sd"]) / nf)
        slope = sxy / sxx
        icpt = (t["w0"] + (t["sd"] - slope * sx) / nf) - slope * x0
        r2 = r2_of(sxy, syy)
        sxy_n = t["sxe"] - (sx * t["se"]) / nf
        syy_n = torch.where(static, 0.0, t["see"] - (t["se"] * t["se"]) / nf)
        nr2 = r2_of(sxy_n, syy_n)
        for name, v in (("slope", slope), ("intercept", icpt), ("r2", r2), ("null_r2", nr2)):
            out[name][...] = v.to(torch.float32).cpu().numpy()
        c = BlockCounts.zeros(n_bins)
        moving = ~static & torch.isfinite(r2)
        moved = moving & ((t["mx"] - t["mn"]) > MIN_CHANGE)
        paper = moved & t["has4"]
        c.counts[:] = [int(static.sum()), int((~torch.isfinite(t["sdd"])).sum()),
                       int(moving.sum()), int(moved.sum())]
        cat = moving.to(torch.int64) + paper.to(torch.int64)
        for ri, v in enumerate((r2, nr2)):
            ok = moving & ~torch.isnan(v)  # a NaN null R² counts nowhere (as numba's)
            vz = torch.where(ok, v, 0.0)
            b = torch.clamp((vz * n_bins).to(torch.int64), max=n_bins - 1)
            key = (cat * n_bins + b)[ok]
            c.hist[ri] = torch.bincount(key, minlength=3 * n_bins).reshape(3, n_bins).cpu().numpy()
            c.sums[ri, 0] = float(vz.sum())
            c.sums[ri, 1] = float(torch.where(paper, vz, 0.0).sum())
            for j, thr in enumerate(THRESHOLDS):
                g = ok & (vz > thr)
                c.above[ri, 0, j] = int(g.sum())
                c.above[ri, 1, j] = int((g & paper).sum())
        return c

    def fit(self, bits: np.ndarray, wide: np.ndarray, codec: Codec, xs: np.ndarray,
            words: np.ndarray, off: int, xst: XStats, n_bins: int,
            out: dict[str, np.ndarray]) -> BlockCounts:
        check_block(bits, xs, words, xst.n)
        carry = self.start(bits.shape[1])
        self.add(carry, bits, wide, codec, xs, words, off)
        return self.finish(carry, xst, n_bins, out)
