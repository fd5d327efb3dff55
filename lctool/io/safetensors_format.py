"""Strict reading of a safetensors header before anything else touches the file.

The safetensors library trusts its input more than a tool fed arbitrary folders should: a hostile
header can claim gigabytes. We parse the 8-byte length and the JSON ourselves, with caps, and check
every entry (dtype known, shape sane, offsets inside the file, ordered and non-overlapping) so that a
corrupt file becomes one `LctoolError` naming the file and the fault.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

from lctool.errors import LctoolError

# Far above what any real checkpoint needs (a 70B model's shard headers are well under 1 MB; a whole
# 30B mixture of experts in one file, ~20k tensors, about 2.5 MB), yet small enough that a hostile header
# cannot exhaust memory: parsing JSON costs ~15x its size (a 57 MB header of 1M entries peaked at 0.9 GB).
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSORS_PER_FILE = 1_000_000
MAX_NDIM = 8

# safetensors dtype name -> (torch dtype attribute, bytes per element). Names, not torch objects, so
# that header checks (and `lctool inspect`) run without importing torch.
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
}


def safetensors_dtype(torch_dtype) -> str | None:
    """The safetensors name of a torch dtype, or None when the format cannot hold it."""
    attribute = str(torch_dtype).removeprefix("torch.")
    return next((name for name, (attr, _) in DTYPES.items() if attr == attribute), None)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # offsets relative to the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, DTYPES[self.dtype][0])


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    data_start: int  # absolute offset of the data section in the file
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]


def _fail(path: str, why: str) -> LctoolError:
    return LctoolError(f"corrupt safetensors file {os.path.basename(path)}: {why}")


def read_header(path: str) -> SafetensorsHeader:
    """Parse and validate the header of `path`; reads only the header bytes."""
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"{file_size} bytes, too short for a header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise _fail(path, f"header length {header_len} exceeds the {MAX_HEADER_BYTES} byte cap")
            if 8 + header_len > file_size:
                raise _fail(path, f"header length {header_len} runs past the end of the file ({file_size} bytes)")
            raw = f.read(header_len)
    except OSError as e:
        raise LctoolError(f"cannot read {path}: {e.strerror or e}") from None
    return parse_header(path, raw, file_size)


def parse_header(path: str, raw: bytes, file_size: int) -> SafetensorsHeader:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _fail(path, f"header is not valid UTF-8 JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise _fail(path, "header JSON is not an object")
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(path, "__metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS_PER_FILE:
        raise _fail(path, f"{len(header)} tensors exceeds the cap of {MAX_TENSORS_PER_FILE}")
    entries = {name: _entry(path, name, info, data_size) for name, info in header.items()}
    _check_layout(path, entries, data_size)
    return SafetensorsHeader(path, data_start, entries, metadata)


def _entry(path: str, name: str, info: object, data_size: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise _fail(path, f"entry {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**53 for d in shape)
    ):
        raise _fail(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise _fail(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    start, end = offsets
    if not 0 <= start <= end <= data_size:
        raise _fail(path, f"tensor {name!r} offsets {offsets} fall outside the data section ({data_size} bytes)")
    expected = math.prod(shape) * DTYPES[dtype][1]
    if end - start != expected:
        raise _fail(path, f"tensor {name!r} spans {end - start} bytes but {dtype}{shape} needs {expected}")
    return TensorEntry(name, dtype, tuple(shape), start, end)


def _check_layout(path: str, entries: dict[str, TensorEntry], data_size: int) -> None:
    previous_end, previous_name = 0, None
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if entry.start < previous_end:
            raise _fail(path, f"tensors {previous_name!r} and {entry.name!r} overlap")
        previous_end, previous_name = max(previous_end, entry.end), entry.name


def encode_header(
    entries: list[tuple[str, str, tuple[int, ...], int, int]],
    metadata: dict | None,
    total_length: int | None = None,
) -> bytes:
    """The 8-byte length + JSON header for (name, dtype, shape, start, end) entries, padded with
    spaces so the data section starts 8-byte aligned (as the safetensors library writes it), or
    padded to exactly `total_length` bytes (a header written into space reserved before the data)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, start, end in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if total_length is not None:
        if len(body) + 8 > total_length:
            raise ValueError("header does not fit the reserved space")
        body += b" " * (total_length - 8 - len(body))
    else:
        body += b" " * ((8 - len(body) % 8) % 8)
    return struct.pack("<Q", len(body)) + body
