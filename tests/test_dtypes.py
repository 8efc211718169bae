"""pipeline.dtypes against numpy, ml_dtypes and torch (independent references)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from pipeline import dtypes as D

NAMES = list(D.ST_DTYPES.values())


@pytest.mark.parametrize("name", NAMES)
def test_bits_and_names(name):
    dt = D.logical_dtype(name)
    assert D.dtype_name(dt) == name and D.logical_dtype(dt) == dt
    b = D.bits_dtype(name)
    assert b.kind == "u" and b.itemsize == dt.itemsize
    assert D.signed_bits_dtype(name).kind == "i"
    assert D.safetensors_code(name) in D.ST_DTYPES and \
        D.ST_DTYPES[D.safetensors_code(name)] == name


@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32", "float64",
                                  "float8_e4m3fn", "float8_e5m2"])
def test_negative_zero_is_the_sign_bit(name):
    dt = D.logical_dtype(name)
    negz = np.array([-0.0], np.float32).astype(dt).view(D.bits_dtype(name))[0]
    assert D.neg_zero_bits(name) == int(negz) and D.is_float(name)


def test_float_masks_match_torch_and_integers():
    for name, (exp, sign) in D.FLOAT_MASKS.items():
        t = torch.tensor([float("inf")], dtype=getattr(torch, name))
        width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        assert int(t.view(width).item()) == exp and sign == 8 * t.element_size() - 1
    for name in ("int8", "uint64", "bool"):
        assert D.neg_zero_bits(name) is None and not D.is_float(name)
    assert D.widens_exactly("int32") and not D.widens_exactly("int64")
    assert D.widens_exactly(ml_dtypes.bfloat16)
    assert D.safetensors_code("complex64") is None
