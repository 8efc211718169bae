"""The reader's direct chunk-file path gives zarr's bits exactly, and refuses what it can't read.

Stores are ingested from real tiny runs (bf16 and fp32) with small chunks,
so blocks cut chunks and arrays have edge chunks; one step repeats the
previous checkpoint, so its delta chunks are all zero and absent from the
store (zarr's fill value). Every read is compared with the same read
through zarr (``_direct_array`` forced to ``None``).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import pipeline
from pipeline.store.chunks import DirectArray
from pipeline.store.ingest import ingest
from pipeline.store.layout import TENSORS_GROUP
from pipeline.store.reader import RunStore


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with (LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                       dashboard_address=":0") as lc, Client(lc) as c):
        yield c


def _store(run: Path, tmp: Path, client, n_steps: int) -> Path:
    """``run``'s first ``n_steps`` checkpoints, the third one a copy of the second."""
    steps = sorted(int(p.name.rsplit("_", 1)[1]) for p in run.glob("global_step_*"))[:n_steps]
    src = tmp / "run"
    src.mkdir()
    for i, s in enumerate(steps):
        shutil.copytree(run / f"global_step_{steps[1] if i == 2 else s}", src / f"global_step_{s}")
    store = tmp / "s.zarr"
    ingest(src, store, client=client, progress=False, chunk_bytes=3000)
    return store


def _zarr_only(store: Path) -> RunStore:
    r = pipeline.open_run(store)
    r._direct_array = lambda name: None  # type: ignore[method-assign]
    return r


def _check_same(store: Path, want_absent: bool = True) -> None:
    direct, via_zarr = pipeline.open_run(store), _zarr_only(store)
    n = len(direct.steps)
    rng = np.random.default_rng(n)
    absent = 0
    cut = 0
    for name in direct.tensor_names:
        arr = direct._direct_array(name)
        assert arr is not None, name  # ingest's layout is always read directly
        absent += sum(not (arr.folder / "c" / "2").joinpath(*map(str, k)).exists()
                      for k in np.ndindex(*(-(-max(s, 1) // c) for s, c in
                                            zip(arr.shape[1:], arr.chunks[1:], strict=True))))
        shape = direct.shape(name)
        cr = direct.chunk_rows(name)
        rows_cases: list[slice | None] = [None]
        if shape:
            m = shape[0]
            rows_cases += [slice(0, m), slice(0, 0), slice(m, m + 3), slice(-3, None),
                           slice(None, None, 2)]
            for _ in range(4):  # arbitrary row ranges: most of them cut chunks at both ends
                a = int(rng.integers(0, m + 1))
                b = int(rng.integers(a, m + 1))
                rows_cases.append(slice(a, b))
            if cr < m:
                rows_cases.append(slice(cr - 1, min(m, 2 * cr + 1)))  # spans three chunks
        step_cases = [None, slice(3, n), [direct.steps[8 % n]], [direct.steps[i] for i in
                      (n - 1, 0, 2, 2, 1)], slice(2, 3)]
        pairs = [(rows, steps) for rows in rows_cases for steps in step_cases]
        # every row case once with some step selection, and every step selection on all rows
        keep = {*(len(step_cases) * i + int(rng.integers(len(step_cases)))
                  for i in range(len(rows_cases))), *range(len(step_cases))}
        for rows, steps in (pairs[i] for i in sorted(keep)):
            a = direct.read_bits(name, steps, rows)
            b = via_zarr.read_bits(name, steps, rows)
            assert a.dtype == b.dtype and a.shape == b.shape, (name, steps, rows)
            assert np.array_equal(a, b), (name, steps, rows)
            if rows is not None and shape:
                lo, hi, _ = rows.indices(shape[0])
                cut += lo < hi and (lo % cr != 0 or (hi % cr != 0 and hi != shape[0]))
        # out= (a reused buffer) and the logical view
        out = np.full((n, *shape), 0, dtype=direct.read_block(name, [direct.steps[0]]).dtype)
        got = direct.read_block(name, None, None, out=out)
        assert np.shares_memory(got, out)  # read into the caller's buffer
        assert np.array_equal(got.view(np.uint8), via_zarr.read_block(name).view(np.uint8))
    assert cut > 0
    if want_absent:
        assert absent > 0  # the repeated step's all-zero delta chunks are not written


def test_direct_equals_zarr_bf16(tiny_run_bf16: Path, tmp_path: Path, client) -> None:
    store = _store(tiny_run_bf16, tmp_path, client, 11)  # past the key at position 8
    assert pipeline.open_run(store).dtype(pipeline.open_run(store).tensor_names[0]) == "bfloat16"
    _check_same(store)


def test_direct_equals_zarr_fp32(tiny_run_fp32: Path, tmp_path: Path, client) -> None:
    store = _store(tiny_run_fp32, tmp_path, client, 5)
    r = pipeline.open_run(store)
    assert {r.dtype(n) for n in r.tensor_names} >= {"float32"}
    _check_same(store)


def test_refuses_other_layouts_and_falls_back_to_zarr(tiny_run_fp32: Path, tmp_path: Path,
                                                     client) -> None:
    store = _store(tiny_run_fp32, tmp_path, client, 5)
    r = pipeline.open_run(store)
    name = max(r.tensor_names, key=lambda n: int(np.prod(r.shape(n))))
    folder = store / TENSORS_GROUP / r._entry(name)["path"]
    doc = json.loads((folder / "zarr.json").read_bytes())
    assert DirectArray.from_doc(folder, doc) is not None

    def changed(edit) -> dict:
        d = copy.deepcopy(doc)
        edit(d)
        return d

    refused = [
        changed(lambda d: d["codecs"].append({"name": "crc32c"})),
        changed(lambda d: d["codecs"].__setitem__(1, {"name": "gzip",
                                                      "configuration": {"level": 1}})),
        changed(lambda d: d["codecs"].__setitem__(0, {"name": "bytes",
                                                      "configuration": {"endian": "big"}})),
        changed(lambda d: d["codecs"].insert(0, {"name": "transpose",
                                                 "configuration": {"order": [1, 0, 2]}})),
        changed(lambda d: d["chunk_key_encoding"].__setitem__("configuration",
                                                              {"separator": "."})),
        changed(lambda d: d["chunk_key_encoding"].__setitem__("name", "v2")),
        changed(lambda d: d.__setitem__("fill_value", 7)),
        changed(lambda d: d.__setitem__("data_type", "int32")),
        changed(lambda d: d.__setitem__("storage_transformers", [{"name": "x"}])),
        changed(lambda d: d["chunk_grid"].__setitem__("name", "rectilinear")),
        changed(lambda d: d["chunk_grid"]["configuration"]["chunk_shape"].__setitem__(0, 2)),
        changed(lambda d: d.__setitem__("zarr_format", 2)),
        changed(lambda d: d.pop("codecs")),
    ]
    for d in refused:
        assert DirectArray.from_doc(folder, d) is None, d
    # an array the direct path refuses (gzip) is still read, through zarr, with the same bits
    import zarr

    want = _zarr_only(store).read_bits(name)
    old = zarr.open_array(str(folder), mode="r")
    stored = old[:]
    new = zarr.create_array(str(folder), shape=old.shape, chunks=old.chunks, dtype=stored.dtype,
                            fill_value=0, compressors=[zarr.codecs.GzipCodec(level=1)],
                            attributes=dict(old.attrs),
                            dimension_names=old.metadata.dimension_names, overwrite=True)
    new[:] = stored
    fresh = pipeline.open_run(store)
    assert fresh._direct_array(name) is None
    assert np.array_equal(fresh.read_bits(name), want)
    assert np.array_equal(fresh.read_bits(name, [r.steps[-1], r.steps[0]], slice(1, 4)),
                          want[[-1, 0], 1:4])
