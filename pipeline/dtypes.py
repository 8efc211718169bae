"""Everything the package knows about dtypes, in one place.

Checkpoints name dtypes by safetensors codes (``BF16``), the store and the
fit by *logical* names (``bfloat16``), numpy has no bfloat16 of its own
(ml_dtypes provides it, with numpy kind ``'V'``), and zarr has none at all,
so every tensor is also handled as its raw bit pattern: an unsigned integer
of the same width. The readers, the store codec, the fit kernels and the
extrapolation kernels all ask this module, so a new dtype is added once.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

# safetensors dtype code -> logical dtype name
ST_DTYPES: dict[str, str] = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
BF16 = np.dtype(ml_dtypes.bfloat16)

# exponent mask and sign-bit position per float width, for NaN/inf tests on raw bits
FLOAT_MASKS: dict[str, tuple[int, int]] = {
    "bfloat16": (0x7F80, 15), "float16": (0x7C00, 15),
    "float32": (0x7F800000, 31), "float64": (0x7FF0000000000000, 63)}


def logical_dtype(name: str | np.dtype | type) -> np.dtype:
    """The numpy dtype for a logical dtype name (``bfloat16``/``float8_*`` from ml_dtypes)."""
    if isinstance(name, str) and name.startswith(("bfloat", "float8")) and hasattr(ml_dtypes,
                                                                                   name):
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def dtype_name(dtype: np.dtype | type | str) -> str:
    """The logical name of a dtype (``np.dtype(ml_dtypes.bfloat16)`` -> ``"bfloat16"``)."""
    return logical_dtype(dtype).name


def bits_dtype(dtype: str | np.dtype | type) -> np.dtype:
    """Unsigned little-endian integer of the same width: how a dtype is stored bit-exactly."""
    return np.dtype(f"<u{logical_dtype(dtype).itemsize}")


def signed_bits_dtype(dtype: str | np.dtype | type) -> np.dtype:
    """Signed little-endian integer of the same width (for zigzag and sign tricks)."""
    return np.dtype(f"<i{logical_dtype(dtype).itemsize}")


def is_float(dtype: str | np.dtype | type) -> bool:
    """Floating point, including ml_dtypes' bfloat16/float8 (whose numpy kind is 'V')."""
    dt = logical_dtype(dtype)
    return dt.kind == "f" or dt == BF16 or dt.name.startswith("float8")


def neg_zero_bits(dtype: str | np.dtype | type) -> int | None:
    """Bit pattern of -0.0 for float dtypes (bf16 included), None for integers and bool."""
    dt = logical_dtype(dtype)
    return 1 << (8 * dt.itemsize - 1) if is_float(dt) else None


def widens_exactly(dtype: str | np.dtype | type) -> bool:
    """Whether every value of ``dtype`` converts to float64 exactly (all but 64-bit integers)."""
    dt = logical_dtype(dtype)
    return not (dt.kind in "iu" and dt.itemsize > 4)


_ST_CODES = {logical_dtype(v): k for k, v in ST_DTYPES.items()}


def safetensors_code(dtype: str | np.dtype | type) -> str | None:
    """The safetensors code of a dtype (``bfloat16`` -> ``BF16``), None if it has none."""
    try:
        return _ST_CODES.get(logical_dtype(dtype))
    except TypeError:
        return None
