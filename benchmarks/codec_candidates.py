"""Candidate step encodings x codecs on a real run: compressed bytes / checkpoint bytes, speed.

Usage::

    python benchmarks/codec_candidates.py RUN_DIR [RUN_DIR ...] [--groups 4,8,0]

Every tensor of every checkpoint is read as bit patterns (unsigned ints),
transformed against a reference, and compressed whole (tensors of the tiny
runs are below one chunk). Transforms:

- ``raw``: the bits themselves;
- ``sub0`` / ``xor0``: zigzag(bits - step 0) / bits ^ step 0 (the old store: sub0);
- ``subprevK`` / ``xorprevK``: against the previous step, a raw key step every K
  positions (K=0: only position 0 is a key);
- ``hybK``: like ``subprevK`` but a key step is stored against step 0, not raw
  (any step decodes from step 0, its key and at most K-1 deltas);
- ``pred2K``: zigzag(bits - (2 prev - prev2)), integer linear extrapolation of
  the bit pattern from the two previous steps (key every K; the step after a
  key uses the previous step alone).

``--entropy`` prints the lossless floor instead: the order-0 entropy of the
previous-step deltas (bits per element), and the same conditioned on the
exponent of the element's previous value (a coder that knew each element's
magnitude), each as a fraction of the element's width; with step 0 stored
at the raw codec's ratio, that bounds what any coder of these deltas can
reach (``floor``).

Ratios are over the checkpoint files' bytes (what ``store / checkpoints`` of
the ingest report measures, minus zarr metadata). Times are one thread,
encode transform + compress of the whole run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from numcodecs import Blosc


def load_run(run: Path) -> tuple[list[dict[str, np.ndarray]], int]:
    """Bits of every tensor per step, and the checkpoint files' total bytes."""
    from pipeline.checkpoints import CheckpointReader, discover_checkpoints

    steps, total = [], 0
    for cp in discover_checkpoints(run):
        r = CheckpointReader(cp.path)
        total += r.total_bytes
        steps.append({n: np.array(r.read_bits(n)) for n in sorted(r.tensors)})
    return steps, total


def zigzag(d: np.ndarray) -> np.ndarray:
    s = d.view(f"<i{d.dtype.itemsize}")
    return ((s << 1) ^ (s >> (8 * d.dtype.itemsize - 1))).view(d.dtype)


def transform(kind: str, k: int, steps: list[dict[str, np.ndarray]], i: int,
              name: str) -> np.ndarray:
    b = steps[i][name]
    pos = i % k if k else i  # position inside its group; 0 = key (raw)
    if kind == "raw" or i == 0:
        return b
    if kind == "sub0":
        return zigzag(b - steps[0][name])
    if kind == "xor0":
        return b ^ steps[0][name]
    if pos == 0:
        return zigzag(b - steps[0][name]) if kind == "hyb" else b
    prev = steps[i - 1][name]
    if kind in ("subprev", "hyb"):
        return zigzag(b - prev)
    if kind == "xorprev":
        return b ^ prev
    if kind == "pred2":
        if pos == 1:
            return zigzag(b - prev)
        return zigzag(b - (prev + prev - steps[i - 2][name]))
    raise ValueError(kind)


CODECS = {
    "zstd1-shuf": dict(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE),
    "zstd3-shuf": dict(cname="zstd", clevel=3, shuffle=Blosc.SHUFFLE),
    "zstd6-shuf": dict(cname="zstd", clevel=6, shuffle=Blosc.SHUFFLE),
    "zstd1-bit": dict(cname="zstd", clevel=1, shuffle=Blosc.BITSHUFFLE),
    "zstd3-bit": dict(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE),
    "zstd1-shuf-1M": dict(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE, blocksize=1 << 20),
    "zstd3-shuf-1M": dict(cname="zstd", clevel=3, shuffle=Blosc.SHUFFLE, blocksize=1 << 20),
    "lz4-shuf": dict(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE),
    "lz4-bit": dict(cname="lz4", clevel=5, shuffle=Blosc.BITSHUFFLE),
    "lz4hc-bit": dict(cname="lz4hc", clevel=1, shuffle=Blosc.BITSHUFFLE),
    "blosclz-bit": dict(cname="blosclz", clevel=5, shuffle=Blosc.BITSHUFFLE),
}


def measure(steps: list[dict[str, np.ndarray]], total: int, kind: str, k: int,
            codec: str) -> tuple[float, float]:
    """(compressed / checkpoint bytes, MB/s of checkpoint bytes through transform+compress)."""
    size, raw = 0, 0
    t = time.perf_counter()
    for i in range(len(steps)):
        for name, b in steps[i].items():
            x = np.ascontiguousarray(transform(kind, k, steps, i, name))
            c = Blosc(**{"typesize": b.dtype.itemsize, "blocksize": 0, **CODECS[codec]})
            size += len(c.encode(x))
            raw += b.nbytes
    dt = time.perf_counter() - t
    return size / total, raw / 1e6 / dt


def _entropy(v: np.ndarray) -> float:
    """Plug-in order-0 entropy of the values of ``v``, in bits per value."""
    _, c = np.unique(v, return_counts=True)
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


def entropy_floor(steps: list[dict[str, np.ndarray]], total: int) -> None:
    """Print H(delta) and H(delta | exponent of the previous value) per element, and the floor."""
    width = 8 * next(iter(steps[0].values())).dtype.itemsize
    man = {16: 7, 32: 23, 64: 52}[width]  # mantissa bits: the exponent sits above them
    h = hc = n = 0.0
    for i in range(1, len(steps)):
        for name, b in steps[i].items():
            prev = steps[i - 1][name].reshape(-1)
            d = zigzag(b.reshape(-1) - prev)
            e = (prev >> prev.dtype.type(man)) & prev.dtype.type(0xFF if width < 64 else 0x7FF)
            h += _entropy(d) * d.size
            order = np.argsort(e, kind="stable")
            es, ds = e[order], d[order]
            cuts = np.flatnonzero(np.diff(es)) + 1
            hc += sum(_entropy(g) * g.size for g in np.split(ds, cuts))
            n += d.size
    raw0 = sum(len(Blosc(cname="zstd", clevel=1, shuffle=Blosc.BITSHUFFLE,
                         typesize=b.dtype.itemsize).encode(np.ascontiguousarray(b)))
               for b in steps[0].values())
    k = len(steps)
    for label, bits in (("H(delta)", h / n), ("H(delta | exponent)", hc / n)):
        floor = (raw0 + (k - 1) / k * total * bits / width) / total
        print(f"  {label:<20} {bits:6.2f} bits of {width} = {bits / width:.3f};  "
              f"floor with step 0 at zstd: {floor:.3f} of the checkpoint bytes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--groups", default="4,8,0", help="key-step intervals K to try (0: none)")
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--entropy", action="store_true",
                    help="print the entropy floor of the previous-step deltas instead")
    a = ap.parse_args()
    from numcodecs import blosc

    blosc.set_nthreads(1)
    ks = [int(x) for x in a.groups.split(",")]
    candidates = [("raw", 0), ("sub0", 0), ("xor0", 0)]
    candidates += [(kind, k) for kind in ("subprev", "hyb", "xorprev", "pred2") for k in ks]
    for run in a.runs:
        steps, total = load_run(run)
        dt = next(iter(steps[0].values())).dtype
        print(f"\n{run}: {len(steps)} steps, {total / 1e6:.1f} MB, bits {dt}")
        if a.entropy:
            entropy_floor(steps, total)
            continue
        codecs = a.codecs.split(",")
        print(f"{'transform':<12}" + "".join(f"{c:>16}" for c in codecs))
        for kind, k in candidates:
            label = kind + (str(k) if kind in ("subprev", "hyb", "xorprev", "pred2") else "")
            cells = [measure(steps, total, kind, k, c) for c in codecs]
            print(f"{label:<12}" + "".join(f"{r:>8.3f} {s:>5.0f}MB/s"[:16].rjust(16)
                                           for r, s in cells), flush=True)


if __name__ == "__main__":
    main()
