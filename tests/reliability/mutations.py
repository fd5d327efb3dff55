"""Hypothesis strategies that damage valid files: byte-level mutations (flip, truncate, insert, splice,
interesting values) and structural ones (replace, drop or add a JSON/YAML value anywhere in a tree)."""

from __future__ import annotations

import copy
import math

from hypothesis import strategies as st

INTERESTING_BYTES = [0x00, 0xFF, 0x7F, 0x80, 0x22, 0x5C, 0x7B, 0x7D, 0x5B, 0x5D, 0x2C, 0x3A, 0x0A, 0x30, 0x39, 0x2D]
INTERESTING_CHUNKS = [b"\x00" * 8, b"\xff" * 8, b"\xc3\x28", b"\xed\xa0\x80", b"null", b"-1", b"1e309", b"NaN",
                      b"18446744073709551615", b"[" * 64, b'{"a":' * 64, b"\\u0000", b"\r\n", b"!!python/object:os.system"]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.sampled_from([0, -1, 1, 2**31, 2**63, 10**12])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["", "../../etc/passwd", "/etc/passwd", "model.safetensors", "llama", "F32", "\x00", "nan"])
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)


def mutate_bytes(data, blob: bytes, start: int = 0, end: int | None = None) -> bytes:
    """One to four byte-level mutations of blob[start:end] (the rest kept), drawn from `data`."""
    buffer = bytearray(blob)
    end = len(buffer) if end is None else end
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        size = len(buffer)
        lo = min(start, max(size - 1, 0))
        position = data.draw(st.integers(lo, max(lo, min(end, size) - 1)), label="position")
        kind = data.draw(st.sampled_from(["set", "flip", "interesting", "chunk", "truncate", "insert", "delete",
                                          "duplicate"]), label="kind")
        if kind == "set" and position < size:
            buffer[position] = data.draw(st.integers(0, 255))
        elif kind == "flip" and position < size:
            buffer[position] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "interesting" and position < size:
            buffer[position] = data.draw(st.sampled_from(INTERESTING_BYTES))
        elif kind == "chunk":
            chunk = data.draw(st.sampled_from(INTERESTING_CHUNKS))
            buffer[position : position + len(chunk)] = chunk
        elif kind == "truncate":
            del buffer[position:]
        elif kind == "insert":
            buffer[position:position] = data.draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del buffer[position : position + data.draw(st.integers(1, 64))]
        elif kind == "duplicate":
            length = data.draw(st.integers(1, 64))
            buffer[position:position] = buffer[position : position + length]
    return bytes(buffer)


def _paths(tree, prefix=()):
    """Every (path, value) in a JSON-like tree, the root included."""
    yield prefix, tree
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _paths(value, (*prefix, index))


def mutate_tree(data, tree, keys_of_interest: list[str] = ()):
    """A deep copy of `tree` with one to three structural mutations drawn from `data`."""
    tree = copy.deepcopy(tree)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = [p for p, _ in _paths(tree)]
        path = data.draw(st.sampled_from(paths), label="path")
        kind = data.draw(st.sampled_from(["replace", "drop", "add", "retype", "scale"]), label="kind")
        parent = tree
        for step in path[:-1]:
            parent = parent[step]
        if not path:  # the root itself
            if kind in ("replace", "retype"):
                tree = data.draw(json_values)
            continue
        key = path[-1]
        value = parent[key]
        if kind == "replace":
            parent[key] = data.draw(json_values)
        elif kind == "drop":
            del parent[key]
        elif kind == "add" and isinstance(parent, dict):
            name = data.draw(st.sampled_from(list(keys_of_interest) or ["x"]) | st.text(max_size=8))
            parent[name] = data.draw(json_values)
        elif kind == "add" and isinstance(parent, list):
            parent.insert(data.draw(st.integers(0, len(parent))), data.draw(json_values))
        elif kind == "retype":
            parent[key] = {int: str, float: str, str: lambda v: [v], list: lambda v: dict(enumerate(v)),
                           dict: lambda v: list(v.values()), bool: int}.get(type(value), lambda v: None)(value)
        elif kind == "scale" and isinstance(value, (int, float)) and not isinstance(value, bool):
            factor = data.draw(st.sampled_from([-1, 0, 2, 3, 1000, 2**40, 0.5, math.inf]))
            scaled = value * factor
            parent[key] = int(scaled) if isinstance(value, int) and math.isfinite(scaled) else scaled
    return tree
