"""A read-only, memory-mapped view of one `.safetensors` file.

The `safetensors` package's numpy backend cannot represent bfloat16 (the dtype of nearly every
published Llama checkpoint) and its flax backend materialises tensors on a device. The format is
a little-endian u64 header length, a JSON header and raw bytes, so reading it with `np.memmap`
and `ml_dtypes` is short and lets a TP rank read only its own slice of a tensor from disk.
Every header field is validated, so a truncated or corrupt file fails with a message naming it.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxpd.errors import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """Tensors of one file by name; `read(name, index)` reads just that slice from disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{self.path}: corrupt safetensors file (shorter than its 8-byte header length)")
                (header_len,) = struct.unpack("<Q", raw)
                if header_len > size - 8:
                    raise CheckpointError(
                        f"{self.path}: corrupt safetensors file (header length {header_len} exceeds "
                        f"the file's {size} bytes; truncated, or not a safetensors file?)")
                if header_len > _MAX_HEADER:
                    raise CheckpointError(f"{self.path}: corrupt safetensors file (header length "
                                          f"{header_len} is over the {_MAX_HEADER}-byte limit)")
                header = json.loads(f.read(header_len))
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors file (header is not JSON: {e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors file (header is not a JSON object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        for name, entry in header.items():
            try:
                dtype_name = entry["dtype"]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except KeyError as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors file (tensor {name!r} has no {e} field)") from None
            except (TypeError, ValueError):
                raise CheckpointError(f"{self.path}: corrupt safetensors file (tensor {name!r} has a malformed header entry)") from None
            dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
            if dtype is None:
                raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {dtype_name!r}, which jaxpd "
                                      f"cannot read (supported: {', '.join(DTYPES)})")
            if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
                raise CheckpointError(
                    f"{self.path}: corrupt safetensors file (tensor {name!r} spans {end - begin} bytes "
                    f"but its shape {list(shape)} in {dtype_name} needs {math.prod(shape) * dtype.itemsize})")
            if end > data_size:
                raise CheckpointError(
                    f"{self.path}: truncated safetensors file (tensor {name!r} ends at data byte {end} "
                    f"but the file holds only {data_size} bytes of data)")
            self._entries[name] = (dtype, shape, begin)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """A host copy of `tensor[index]`, reading only the pages that slice touches."""
        dtype, shape, begin = self._entries[name]
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype)[index or ()]
        view = np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin,
                         shape=shape)
        return np.array(view[index or ()])
