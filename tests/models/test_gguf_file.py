"""keepkv's GGUF header reader (:mod:`keepkv.models.gguf_file`) against the ``gguf`` package's own reader and
writer: every metadata value and every tensor view equal on the real SmolLM2 file and on written files holding
every value type in both byte orders; a file cut anywhere before the end of its last tensor is an ``EOFError`` /
``ValueError``, never a wrong value."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keepkv.models.gguf_file import read_gguf_header


def reference_fields(path: Path) -> tuple[dict, list]:
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    return fields, reader.tensors


def assert_same_as_gguf_reader(path: Path, check_data: int | None = None) -> None:
    header = read_gguf_header(path)
    fields, tensors = reference_fields(path)
    assert header.fields == fields
    for mine, theirs in zip(header.tensors, tensors, strict=True):
        assert (mine.name, mine.tensor_type, mine.shape) == (theirs.name, theirs.tensor_type, tuple(theirs.shape))
        assert mine.data.dtype == theirs.data.dtype and mine.data.shape == theirs.data.shape
    for mine, theirs in list(zip(header.tensors, tensors))[:check_data]:
        assert np.array_equal(mine.data, theirs.data, equal_nan=mine.data.dtype.kind == "f")


def write_every_type(path: Path, endianess=gguf.GGUFEndian.LITTLE) -> None:
    writer = gguf.GGUFWriter(path, "llama", endianess=endianess)
    T = gguf.GGUFValueType
    writer.add_uint8("t.u8", 250)
    writer.add_int8("t.i8", -7)
    writer.add_uint16("t.u16", 65000)
    writer.add_int16("t.i16", -300)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "ünïcode ✓")
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 1e-300)
    writer.add_array("t.arr.str", ["", "a", "Ġthe", "<|im_end|>"])
    writer.add_array("t.arr.i32", [1, -2, 3])
    writer.add_array("t.arr.f32", [0.5, -1.25])
    writer.add_array("t.arr.empty", [])
    writer.add_key_value("t.arr.u8", [1, 2, 255], T.ARRAY, sub_type=T.UINT8)
    writer.add_key_value("t.arr.bool", [True, False], T.ARRAY, sub_type=T.BOOL)
    writer.add_array("t.arr.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    writer.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("f16", rng.standard_normal((2, 8)).astype(np.float16))
    writer.add_tensor("i32", np.arange(6, dtype=np.int32).reshape(2, 3))
    q8 = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_real_smollm2_file_reads_as_gguf_reader_reads_it(smollm2_gguf):
    assert_same_as_gguf_reader(smollm2_gguf, check_data=4)


@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_every_value_type_and_tensor_kind_in_both_byte_orders(tmp_path, endianess):
    path = tmp_path / "every.gguf"
    write_every_type(path, endianess)
    assert_same_as_gguf_reader(path)
    header = read_gguf_header(path)
    assert header.fields["t.u64"] == 2**63 + 5 and header.fields["t.arr.nested"] == [1, 2, 3]
    assert header.fields["t.str"] == "ünïcode ✓" and header.fields["t.bool"] is True
    q8 = next(t for t in header.tensors if t.name == "q8")
    assert gguf.quants.dequantize(q8.data, q8.tensor_type).shape == (2, 64)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_a_file_cut_anywhere_is_refused(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cut") / "every.gguf"
    write_every_type(path)
    whole = path.read_bytes()
    used = max(tensor.data_offset + tensor.n_bytes for tensor in gguf.GGUFReader(path).tensors)
    assert used < len(whole)  # the writer pads the last tensor: those bytes are not needed
    cut = data.draw(st.integers(1, len(whole) - 1), label="kept bytes")
    path.write_bytes(whole[:cut])
    if cut >= used:
        assert_same_as_gguf_reader(path)
        return
    with pytest.raises((EOFError, ValueError)):
        read_gguf_header(path)
