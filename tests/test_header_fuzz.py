"""Property: our safetensors header parser agrees with the safetensors library, or refuses.

Valid files are written by the real library (``safetensors.torch.save``),
then mutated at every level: the length prefix, the JSON text (bytes
inserted, deleted, replaced), the parsed header (offsets, dtypes, shapes,
metadata, extra or duplicate keys) and the data section. For each result our
``parse_header`` must either return exactly what ``safetensors.deserialize``
reads (names, dtypes, shapes and each tensor's bytes) or raise a one-line
``PipelineError``; any other exception, or accepting a file the library
refuses, is a bug. Refusing something the library accepts (a duplicate key,
an unknown field, a dtype the store cannot hold) is allowed: we are stricter.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import safetensors
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from pipeline.checkpoints.format import TensorInfo, parse_header
from pipeline.dtypes import ST_DTYPES
from pipeline.errors import PipelineError

PATH = Path("fuzz.safetensors")
TORCH_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# a few seconds by default; HEADER_FUZZ_EXAMPLES=5000 for a long hunt
FUZZ = settings(max_examples=int(os.environ.get("HEADER_FUZZ_EXAMPLES", "60")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

names = st.text(st.sampled_from("abz._/-%Z0"), min_size=1, max_size=8)
shapes = st.lists(st.integers(0, 3), max_size=3)


@st.composite
def valid_files(draw: Any) -> bytes:
    """A file written by the safetensors library itself: the ground truth to mutate."""
    tensors = draw(st.dictionaries(names, st.tuples(st.sampled_from(sorted(TORCH_DTYPES)),
                                                    shapes), max_size=4))
    out = {}
    for name, (code, shape) in tensors.items():
        numel = torch.Size(shape).numel()
        raw = torch.randint(0, 256, (8 * max(1, numel),), dtype=torch.uint8)
        t = raw.view(TORCH_DTYPES[code]) if code != "BOOL" else raw.bool()
        out[name] = t[:numel].reshape(shape).clone()
    meta = draw(st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4),
                                            max_size=2))
    if not out and meta is not None:
        meta = None  # safetensors 0.8 writes '{},"__metadata__":{...}}' here, which it can't read
    return save(out, metadata=meta)


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8: 8 + n]), data[8 + n:]


def join(header: dict | str | bytes, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else (
        header if isinstance(header, str) else json.dumps(header)).encode("utf-8",
                                                                            "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + body


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(
        max_size=3), lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=3), inner, max_size=3), max_leaves=6)


@st.composite
def header_mutation(draw: Any, data: bytes) -> bytes:
    """Change one field of the parsed header, then write it back (the data stays)."""
    header, body = split(data)
    keys = sorted(header)
    kind = draw(st.sampled_from(["offsets", "dtype", "shape", "entry", "metadata", "key",
                                 "duplicate", "swap"]))
    if kind in ("offsets", "dtype", "shape", "entry", "duplicate") and not (
            set(keys) - {"__metadata__"}):
        kind = "key"
    tensors = [k for k in keys if k != "__metadata__"]
    name = draw(st.sampled_from(tensors)) if tensors else "x"
    if kind == "offsets":
        i = draw(st.integers(0, 1))
        header[name]["data_offsets"][i] += draw(st.integers(-16, 16) | st.sampled_from(
            [1 << 40, -(1 << 40), 1 << 64]))
    elif kind == "dtype":
        header[name]["dtype"] = draw(st.sampled_from([*ST_DTYPES, "F4", "C64", "f32", ""])
                                     | JSON_VALUES)
    elif kind == "shape":
        header[name]["shape"] = draw(st.lists(st.integers(-2, 5) | st.sampled_from(
            [1 << 64, 1 << 63, 2.0]), max_size=4) | JSON_VALUES)
    elif kind == "entry":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
        if draw(st.booleans()):
            header[name].pop(field, None)
        else:
            header[name][field] = draw(JSON_VALUES)
    elif kind == "metadata":
        header["__metadata__"] = draw(JSON_VALUES)
    elif kind == "key":
        header[draw(st.text(max_size=4))] = draw(JSON_VALUES)
    elif kind == "swap" and len(tensors) > 1:
        a, b = tensors[:2]
        header[a]["data_offsets"], header[b]["data_offsets"] = (header[b]["data_offsets"],
                                                                header[a]["data_offsets"])
    text = json.dumps(header)
    if kind == "duplicate":
        text = text[:-1] + ", " + json.dumps({name: header[name]})[1:-1] + "}"
    return join(text, body)


@st.composite
def byte_mutation(draw: Any, data: bytes) -> bytes:
    """Bytes edited anywhere (header text, length prefix, data), or the file cut or grown."""
    kind = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "extend",
                                 "length", "json"]))
    (n,) = struct.unpack("<Q", data[:8])
    if kind == "length":
        m = max(0, n + draw(st.integers(-4, 4) | st.sampled_from([1 << 40, 1 << 63])))
        return struct.pack("<Q", m % (1 << 64)) + data[8:]
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data)))]
    if kind == "extend":
        return data + draw(st.binary(min_size=1, max_size=8))
    if kind == "json":  # a JSON text of any shape as the whole header
        return join(json.dumps(draw(JSON_VALUES)), data[8 + n:])
    pos = draw(st.integers(8, max(8, 8 + n - 1)))  # inside the header text
    blob = draw(st.binary(min_size=1, max_size=3) | st.sampled_from(
        [b"Infinity", b"NaN", b"1e400", b"-0", b"\\ud800", b'"', b"{", b"[", b"]", b"}"]))
    if kind == "insert":
        text = data[8: pos] + blob + data[pos: 8 + n]
    elif kind == "delete":
        text = data[8: pos] + data[pos + len(blob): 8 + n]
    else:
        text = data[8: pos] + blob + data[pos + len(blob): 8 + n]
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def library_view(data: bytes) -> dict[str, tuple[str, tuple[int, ...], bytes]] | None:
    """What safetensors reads from ``data``, or None if it refuses the file."""
    try:
        items = safetensors.deserialize(data)
    except Exception:  # SafetensorError, or a pyo3 panic for some inputs
        return None
    return {name: (t["dtype"], tuple(t["shape"]), bytes(t["data"])) for name, t in items}


def our_view(infos: dict[str, TensorInfo], data: bytes) -> dict:
    code = {v: k for k, v in ST_DTYPES.items()}
    return {n: (code[i.dtype], i.shape, data[i.offset: i.offset + i.nbytes])
            for n, i in infos.items()}


def check(data: bytes) -> None:
    try:
        infos = parse_header(data, len(data), PATH)
    except PipelineError as e:
        assert "\n" not in str(e) and str(PATH) in str(e)
        return
    want = library_view(data)
    assert want is not None, "accepted a file the safetensors library refuses"
    assert our_view(infos, data) == want


@FUZZ
@given(valid_files())
def test_library_files_parse_exactly(data: bytes) -> None:
    infos = parse_header(data, len(data), PATH)  # never refused: the library wrote it
    assert our_view(infos, data) == library_view(data)


@FUZZ
@given(st.data())
def test_mutated_headers_match_library_or_refuse(data: st.DataObject) -> None:
    check(data.draw(valid_files().flatmap(header_mutation)))


@FUZZ
@given(st.data())
def test_mutated_bytes_match_library_or_refuse(data: st.DataObject) -> None:
    check(data.draw(valid_files().flatmap(byte_mutation)))


@FUZZ
@given(st.binary(max_size=64))
def test_random_bytes_never_crash(data: bytes) -> None:
    check(data)


def test_deep_nesting_and_huge_numbers_are_refused() -> None:
    for text in ["[" * 200_000 + "]" * 200_000, '{"a": ' * 100_000 + "1" + "}" * 100_000,
                 '{"a": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}']:
        data = join(text, b"\0" * 4)
        check(data)
        try:
            parse_header(data, len(data), PATH)
        except PipelineError:
            continue
        raise AssertionError("accepted")
