"""Safetensors read by memory map and written by streaming, one tensor at a time.

Reading maps the file and hands out numpy views, so a tensor's bytes are touched only when (and where) a device shard
asks for them; writing lays out the header first and then appends each tensor as it is gathered, so neither side ever
holds a whole checkpoint in host memory. The format: 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}}, then the raw bytes.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be used as it is; the message names the file or tensor."""


def dtype_name(dtype) -> str:
    return DTYPE_NAMES[np.dtype(dtype)]


class SafetensorsFile:
    """One .safetensors file: validated header, tensors as read-only numpy memory-map views."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise CheckpointError(f"{self.path}: corrupt or truncated safetensors file (header of {header_len} "
                                      f"bytes in a file of {size}); re-download or re-export it")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e}); re-download or re-export it")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        self.entries = {}
        for name, info in header.items():
            if not isinstance(info, dict) or info.get("dtype") not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has an unknown dtype {info!r}")
            begin, end = info["data_offsets"]
            dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
            if end > data_size or end - begin != math.prod(shape) * dtype.itemsize:
                raise CheckpointError(f"{self.path}: tensor {name!r} lies outside the file or has the wrong byte "
                                      f"size (file truncated or corrupt); re-download or re-export it")
            self.entries[name] = (dtype, shape, begin)
        self._mmap = None

    def keys(self):
        return self.entries.keys()

    def get(self, name: str) -> np.ndarray:
        """A read-only view of tensor `name`; no bytes are read until the view is indexed."""
        dtype, shape, begin = self.entries[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        count = math.prod(shape)
        start = self._data_start + begin
        return self._mmap[start:start + count * dtype.itemsize].view(dtype).reshape(shape)

    def release(self, name: str, rows: slice | None = None) -> None:
        """Drop tensor `name`'s pages (of `rows` along axis 0 only, a step-1 slice, when given) from this process's
        resident memory once they are on the devices, so a load's host footprint stays small (the pages are
        file-backed: reading again would fault them back in)."""
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        dtype, shape, begin = self.entries[name]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        first, stop = (0, shape[0] if shape else 1) if rows is None else rows.indices(shape[0])[:2]
        start = (self._data_start + begin + first * row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
        end = self._data_start + begin + stop * row_bytes
        self._mmap._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)


def write_file(path: str | os.PathLike, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]],
               fetch: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file for `tensors` (name, shape, dtype), calling `fetch(name)` for one tensor at a time."""
    tensors = list(tensors)
    header, offset = {}, 0
    for name, shape, dtype in tensors:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in tensors:
            array = np.ascontiguousarray(fetch(name))
            if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                raise CheckpointError(f"{path}: tensor {name!r} came out as {array.dtype}{array.shape}, "
                                      f"expected {np.dtype(dtype)}{tuple(shape)}")
            f.write(array.tobytes())
