"""The header of a GGUF file (llama.cpp's format): key/value metadata decoded to Python values and the tensor index
as memory-mapped numpy views, read in one pass.

Format (GGUF v2/v3, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic ``GGUF``, ``uint32``
version, ``uint64`` tensor and key/value counts; each key/value is a string key, a ``uint32`` value type and the
value (strings are a ``uint64`` length and UTF-8 bytes; arrays a ``uint32`` element type, a ``uint64`` count and
the elements); each tensor info is a name, ``uint32`` dimension count, ``uint64`` dimensions (fastest first), a
``uint32`` ggml type and a ``uint64`` offset into the data section, which starts at the next multiple of
``general.alignment`` (32 by default).

Why not ``gguf.GGUFReader``: it builds numpy views for every element of every array (two per string), so a
150k-token vocabulary with its merges costs seconds to tens of seconds per read. Here numeric arrays are one
``numpy`` view and string arrays one pass over the bytes. The tensor views follow ``GGUFReader``'s conventions
(float and integer types in their numpy dtype, quantized types as ``uint8`` rows of blocks, dimensions slowest
first), so ``gguf.quants.dequantize`` takes them as they are. A file cut short raises ``EOFError``; a malformed one
``ValueError`` (callers turn both into a :class:`keepkv.errors.CheckpointError` naming the file).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF value types -> numpy scalar types (8 = string and 9 = array are handled apart)
_SCALAR_TYPES: dict[int, str] = {
    0: "u1", 1: "i1", 2: "u2", 3: "i2", 4: "u4", 5: "i4", 6: "f4", 7: "?", 10: "u8", 11: "i8", 12: "f8",
}
_STRING, _ARRAY = 8, 9
# ggml tensor types stored as plain numbers (F32, F16, I8, I16, I32, I64, F64); every other type is quantized
_PLAIN_TENSOR_TYPES: dict[int, str] = {0: "f4", 1: "f2", 24: "i1", 25: "i2", 26: "i4", 27: "i8", 28: "f8"}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of the index. ``shape``: GGUF order (fastest dimension first, as ``GGUFReader``'s ``shape``);
    ``data``: a read-only view of the file (``uint8`` rows of blocks for quantized types)."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass(frozen=True)
class GGUFHeader:
    """``fields``: metadata key -> value (``str``, ``int``, ``float``, ``bool`` or a list of them);
    ``tensors``: the tensor index in file order; ``version``: the GGUF version."""

    version: int
    fields: dict[str, Any]
    tensors: list[GGUFTensorInfo]


class _Cursor:
    """Sequential reads from a byte buffer in one byte order; reading past the end raises ``EOFError``."""

    def __init__(self, buffer: memoryview, order: str) -> None:
        self.buffer, self.order, self.offset = buffer, order, 0
        self._u32, self._u64 = struct.Struct(order + "I"), struct.Struct(order + "Q")

    def take(self, size: int) -> memoryview:
        end = self.offset + size
        if size < 0 or end > len(self.buffer):
            raise EOFError(f"needs {size} bytes at offset {self.offset}, the file has {len(self.buffer)}")
        view = self.buffer[self.offset:end]
        self.offset = end
        return view

    def u32(self) -> int:
        return self._u32.unpack(self.take(4))[0]

    def u64(self) -> int:
        return self._u64.unpack(self.take(8))[0]

    def string(self) -> str:
        return str(self.take(self.u64()), "utf-8")

    def scalars(self, kind: int, count: int) -> np.ndarray:
        dtype = np.dtype(self.order + _SCALAR_TYPES[kind]) if kind != 7 else np.dtype(np.bool_)
        return np.frombuffer(self.take(dtype.itemsize * count), dtype=dtype, count=count)

    def value(self, kind: int) -> Any:
        if kind in _SCALAR_TYPES:
            return self.scalars(kind, 1).tolist()[0]
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            element_kind, count = self.u32(), self.u64()
            if element_kind in _SCALAR_TYPES:
                return self.scalars(element_kind, count).tolist()
            if element_kind == _STRING:
                return self.strings(count)
            if element_kind == _ARRAY:
                return [item for _ in range(count) for item in self.value(_ARRAY)]  # flattened, as GGUFReader
            raise ValueError(f"unknown GGUF array element type {element_kind} at offset {self.offset}")
        raise ValueError(f"unknown GGUF value type {kind} at offset {self.offset}")

    def strings(self, count: int) -> list[str]:
        """``count`` length-prefixed strings in one pass (the hot path: vocabularies and merges)."""
        buffer, offset, unpack = self.buffer, self.offset, self._u64.unpack_from
        out = []
        for _ in range(count):
            if offset + 8 > len(buffer):
                raise EOFError(f"a string length at offset {offset} runs past the end ({len(buffer)} bytes)")
            (length,) = unpack(buffer, offset)
            start, offset = offset + 8, offset + 8 + length
            if offset > len(buffer):
                raise EOFError(f"a {length}-byte string at offset {start} runs past the end ({len(buffer)} bytes)")
            out.append(str(buffer[start:offset], "utf-8"))
        self.offset = offset
        return out


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse ``path``'s header, metadata and tensor index (memory-mapped; no tensor is read)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    data = np.memmap(path, mode="r")  # raises ValueError on an empty file
    buffer = memoryview(data)
    if bytes(buffer[:4]) != GGUF_MAGIC:
        raise ValueError(f"no GGUF magic: the file starts with {bytes(buffer[:4])!r}")
    order = "<"
    version = _Cursor(buffer[4:], order).u32()
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        order = ">"
        version = _Cursor(buffer[4:], order).u32()
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"GGUF version {version}; readable versions: {', '.join(map(str, SUPPORTED_VERSIONS))}")
    cursor = _Cursor(buffer, order)
    cursor.offset = 8
    tensor_count, field_count = cursor.u64(), cursor.u64()
    fields: dict[str, Any] = {}
    for _ in range(field_count):
        key = cursor.string()
        if key in fields:
            raise ValueError(f"duplicate metadata key {key!r}")
        fields[key] = cursor.value(cursor.u32())
    index = []
    for _ in range(tensor_count):
        name = cursor.string()
        dims = cursor.scalars(10, cursor.u32()).tolist()
        index.append((name, tuple(int(d) for d in dims), cursor.u32(), cursor.u64()))
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment must be a power of two, got {alignment!r}")
    start = -(-cursor.offset // alignment) * alignment
    tensors, names = [], set()
    for name, dims, raw_type, offset in index:
        if name in names:
            raise ValueError(f"duplicate tensor {name!r}")
        names.add(name)
        kind = GGMLQuantizationType(raw_type)
        count = int(np.prod(dims, dtype=np.int64))
        rows_first = tuple(reversed(dims))
        if raw_type in _PLAIN_TENSOR_TYPES:
            dtype, shape = np.dtype(order + _PLAIN_TENSOR_TYPES[raw_type]), rows_first
            size = count * dtype.itemsize
        else:
            dtype, shape = np.dtype(np.uint8), quant_shape_to_byte_shape(rows_first, kind)
            size = int(np.prod(shape, dtype=np.int64))
        begin = start + offset
        if begin + size > len(data):
            raise EOFError(f"tensor {name!r} needs bytes {begin}..{begin + size}, the file has {len(data)}")
        view = np.frombuffer(buffer[begin:begin + size], dtype=dtype).reshape(shape)
        tensors.append(GGUFTensorInfo(name, kind, dims, view))
    return GGUFHeader(version, fields, tensors)

