"""The fit's arrays, laid out from one zarr-made document per rank, are exactly what zarr writes."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from pipeline.fit.results import ELEMENTS, TensorPlan, create_fit, result_fields

FIELDS = result_fields(null_elements=True)  # every array a fit may write
META = {"x": 1, "fields": list(FIELDS)}


def test_create_fit_writes_zarrs_own_documents(tmp_path):
    plans = [TensorPlan("a.weight", (7, 5), "bfloat16", 3), TensorPlan("b", (4,), "float32", 4),
             TensorPlan("c", (), "float32", 1), TensorPlan("d.weight", (9, 2), "float32", 9),
             TensorPlan("e", (0, 3), "float32", 1), TensorPlan("f/../g", (6,), "float32", 2)]
    create_fit(tmp_path / "new", plans, META)
    ref = zarr.open_group(str(tmp_path / "ref"), mode="w")
    for t in plans:
        g = ref.create_group(f"tensors/{t.path}")
        for f in FIELDS:
            g.create_array(f, shape=t.shape, chunks=t.chunks(), dtype="float32",
                           fill_value=np.nan, compressors=None,
                           chunk_key_encoding={"name": "default", "separator": "."},
                           dimension_names=[f"dim_{i}" for i in range(len(t.shape))])
    for t in plans:
        new = tmp_path / "new" / ELEMENTS / "tensors" / t.path
        old = tmp_path / "ref" / "tensors" / t.path
        assert (new / "zarr.json").read_bytes() == (old / "zarr.json").read_bytes()
        for f in FIELDS:
            assert (new / f / "zarr.json").read_bytes() == (old / f / "zarr.json").read_bytes()
            arr = zarr.open_array(str(tmp_path / "new" / ELEMENTS), path=f"tensors/{t.path}/{f}")
            assert arr.shape == t.shape and arr.dtype == np.float32
            assert np.isnan(arr[...]).all()


@pytest.mark.parametrize("direct", [True, False])
def test_result_chunks_written_directly_are_zarrs_bytes(tmp_path, direct):
    """write_piece writes chunk files by hand: the same files zarr writes, edge chunks too,
    with direct I/O or through the page cache."""
    from pipeline.fit.results import write_piece
    from pipeline.store.background_writes import BackgroundWriter

    writer = BackgroundWriter(direct=direct)

    rng = np.random.default_rng(0)
    plans = [TensorPlan("a.weight", (7, 5), "bfloat16", 3), TensorPlan("b", (4,), "float32", 4),
             TensorPlan("c", (), "float32", 1), TensorPlan("d", (5, 2, 3), "float32", 2)]
    create_fit(tmp_path / "new", plans, META)
    create_fit(tmp_path / "ref", plans, META)
    for t in plans:
        full = {f: rng.standard_normal(t.shape).astype(np.float32) for f in FIELDS}
        step = t.chunks()[0] * 2 if t.shape else 1
        n = t.shape[0] if t.shape else 1
        for r0 in range(0, n, step):  # pieces of two chunks, the last one short
            rows = slice(r0, min(r0 + step, n)) if t.shape else None
            write_piece(tmp_path / "new", t, rows,
                        {f: v[rows] if t.shape else v for f, v in full.items()}, FIELDS, writer)
        writer.wait()
        for f in FIELDS:
            ref = zarr.open_array(str(tmp_path / "ref" / ELEMENTS), path=f"tensors/{t.path}/{f}",
                                  mode="r+")
            ref[...] = full[f]
            new = tmp_path / "new" / ELEMENTS / "tensors" / t.path / f
            old = tmp_path / "ref" / ELEMENTS / "tensors" / t.path / f
            files = sorted(p.relative_to(old) for p in old.rglob("*") if p.is_file())
            assert files == sorted(p.relative_to(new) for p in new.rglob("*") if p.is_file())
            for rel in files:
                assert (new / rel).read_bytes() == (old / rel).read_bytes(), (t.name, f, rel)
            got = zarr.open_array(str(tmp_path / "new" / ELEMENTS), path=f"tensors/{t.path}/{f}")
            np.testing.assert_array_equal(got[...], full[f])
