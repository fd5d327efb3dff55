"""Lazy reading of a Hugging Face checkpoint folder.

Opening a checkpoint reads config.json, the index and each shard's header, and nothing else: a
7B folder opens in milliseconds. Tensors are read one at a time, on request, straight from the file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator

from lctool.arch import ModelArch
from lctool.errors import LctoolError
from lctool.io.mapping import TruncatedError, map_range
from lctool.io.paths import inside
from lctool.io.safetensors_format import DTYPES, SafetensorsHeader, TensorEntry, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MANIFEST_FILE = "lctool.json"
MAX_JSON_BYTES = 64 * 1024 * 1024



# Files a derived checkpoint carries over unchanged when the op does not rewrite them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
CARRIED_FILES = (*TOKENIZER_FILES, "generation_config.json")


def read_json(path: str, what: str) -> object:
    """A JSON file, with one-line errors for missing, oversized or malformed content."""
    try:
        size = os.path.getsize(path)
        if size > MAX_JSON_BYTES:
            raise LctoolError(f"{what} is {size} bytes, over the {MAX_JSON_BYTES} byte cap")
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise LctoolError(f"{what} not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise LctoolError(f"{what} is not valid JSON: {type(e).__name__}") from None
    except OSError as e:
        raise LctoolError(f"cannot read {what}: {e.strerror or e}") from None


class Checkpoint:
    """A checkpoint folder: config, architecture, and lazily read tensors.

    `check_shapes` compares every tensor with the shapes the config implies (skipped for quantized
    checkpoints, whose packed tensors the architecture map does not describe).
    """

    def __init__(self, path: str, *, check_shapes: bool = True):
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise LctoolError(f"no checkpoint folder at {path}")
        self._refuse_links_out()
        config = read_json(os.path.join(self.path, "config.json"), "config.json")
        if not isinstance(config, dict):
            raise LctoolError("config.json is not a JSON object")
        self.config: dict = config
        self.arch = ModelArch(config)
        self.headers: dict[str, SafetensorsHeader] = {}
        self._file_of: dict[str, str] = {}
        self._load_headers()
        self.manifest: dict | None = self._read_manifest()
        if check_shapes:
            self._check_layer_count()
        if check_shapes and not self.is_quantized:
            self._check_shapes()

    # ---- discovery ---------------------------------------------------------------------------------
    def _refuse_links_out(self) -> None:
        """Every file lctool (or transformers, on its behalf) reads from the folder must resolve inside
        it: a symlink to elsewhere would read, and copy into outputs, files the folder does not hold."""
        for name in ("config.json", INDEX_FILE, MANIFEST_FILE, SINGLE_FILE, *CARRIED_FILES):
            if os.path.islink(os.path.join(self.path, name)):
                inside(self.path, name, name)

    def _load_headers(self) -> None:
        index_path = os.path.join(self.path, INDEX_FILE)
        if os.path.exists(index_path):
            weight_map = self._read_index(index_path)
            for file in sorted(set(weight_map.values())):
                self._open_shard(file)
            for name, file in weight_map.items():
                if name not in self.headers[file].entries:
                    raise LctoolError(f"{INDEX_FILE}: tensor {name!r} is not in {file}")
                self._file_of[name] = file
        elif os.path.exists(os.path.join(self.path, SINGLE_FILE)):
            self._open_shard(SINGLE_FILE)
            self._file_of = dict.fromkeys(self.headers[SINGLE_FILE].entries, SINGLE_FILE)
        else:
            raise LctoolError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.path}")
        if not self._file_of:
            raise LctoolError(f"checkpoint {self.path} holds no tensors")

    def _read_index(self, index_path: str) -> dict[str, str]:
        index = read_json(index_path, INDEX_FILE)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise LctoolError(f"{INDEX_FILE}: weight_map is missing or empty")
        for name, file in weight_map.items():
            if not isinstance(file, str):
                raise LctoolError(f"{INDEX_FILE}: tensor {name!r} maps to {file!r}, not a file name")
        return weight_map

    def _open_shard(self, file: str) -> None:
        real = inside(self.path, file, INDEX_FILE if file != SINGLE_FILE else SINGLE_FILE)
        if not os.path.isfile(real):
            raise LctoolError(f"missing shard {file} in {self.path}")
        self.headers[file] = read_header(real)

    def _read_manifest(self) -> dict | None:
        path = os.path.join(self.path, MANIFEST_FILE)
        if not os.path.exists(path):
            return None
        manifest = read_json(path, MANIFEST_FILE)
        if not isinstance(manifest, dict):
            raise LctoolError(f"{MANIFEST_FILE} is not a JSON object")
        return manifest

    def _check_layer_count(self) -> None:
        """No tensor of a layer past config.json's num_hidden_layers (ops walk the layers the config names)."""
        root = self.arch.family.layers + "."
        for name in self._file_of:
            if name.startswith(root):
                index = name[len(root):].split(".", 1)[0]
                if index.isdigit() and int(index) >= self.arch.num_layers:
                    raise LctoolError(f"tensor {name} is beyond the {self.arch.num_layers} layers config.json declares "
                                      "(num_hidden_layers)")

    def _check_shapes(self) -> None:
        expected = self.arch.expected_shapes()
        for name, shape in expected.items():
            if name not in self._file_of:
                raise LctoolError(f"tensor {name} is missing (config.json implies it)")
            actual = self.entry(name).shape
            if actual != shape:
                raise LctoolError(f"tensor {name} has shape {list(actual)} but config.json implies {list(shape)}")

    # ---- facts -------------------------------------------------------------------------------------
    @property
    def quantization_config(self) -> dict | None:
        return self.config.get("quantization_config")

    @property
    def is_quantized(self) -> bool:
        return bool(self.quantization_config)

    @property
    def shard_files(self) -> list[str]:
        return sorted(self.headers)

    def shard_path(self, file: str) -> str:
        return os.path.join(self.path, file)

    def tensor_names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.headers[self._file_of[name]].entries[name]
        except KeyError:
            raise LctoolError(f"tensor {name!r} is not in {self.path}") from None

    def num_parameters(self) -> int:
        return sum(self.entry(n).numel for n in self._file_of)

    def total_bytes(self) -> int:
        return sum(self.entry(n).nbytes for n in self._file_of)

    def dtypes(self) -> dict[str, int]:
        """dtype name -> number of tensors."""
        counts: dict[str, int] = {}
        for name in self._file_of:
            dtype = self.entry(name).dtype
            counts[dtype] = counts.get(dtype, 0) + 1
        return counts

    def carried_files(self) -> list[str]:
        """Tokenizer and generation files present in the folder (never code)."""
        return [f for f in CARRIED_FILES if os.path.isfile(os.path.join(self.path, f))]

    # ---- tensors -----------------------------------------------------------------------------------
    def get(self, name: str, dtype=None):
        """One tensor as a CPU tensor (optionally cast).

        The tensor maps its bytes of the file copy-on-write (lctool.io.mapping): no copy is made until someone
        writes to it, and the mapping goes when the tensor does, so reading a whole checkpoint tensor
        by tensor keeps memory at about one tensor. Misaligned data falls back to a plain read.
        """
        import torch

        entry = self.entry(name)
        header = self.headers[self._file_of[name]]
        offset = header.data_start + entry.start
        if entry.nbytes == 0:
            tensor = torch.empty(entry.shape, dtype=entry.torch_dtype)
        elif offset % DTYPES[entry.dtype][1] == 0:
            tensor = self._mapped(header.path, offset, entry).view(entry.torch_dtype).reshape(entry.shape)
        else:
            tensor = self._read(header.path, offset, entry).view(entry.torch_dtype).reshape(entry.shape)
        return tensor if dtype is None or dtype == tensor.dtype else tensor.to(dtype)

    @staticmethod
    def _mapped(path: str, offset: int, entry: TensorEntry):
        import torch

        try:
            buffer, start = map_range(path, offset, entry.nbytes)
        except TruncatedError:
            raise LctoolError(f"{os.path.basename(path)}: tensor {entry.name!r} is truncated") from None
        except OSError:
            return Checkpoint._read(path, offset, entry)
        return torch.frombuffer(buffer, dtype=torch.uint8, offset=start, count=entry.nbytes)

    @staticmethod
    def _read(path: str, offset: int, entry: TensorEntry):
        import torch

        buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(offset)
            read = f.readinto(memoryview(buffer.numpy()))
        if read != entry.nbytes:
            raise LctoolError(f"{os.path.basename(path)}: tensor {entry.name!r} is truncated")
        return buffer

    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, object]]:
        """(name, tensor) one at a time, in on-disk order for sequential reads."""
        names = self.tensor_names() if names is None else names
        order = sorted(names, key=lambda n: (self._file_of[n], self.entry(n).start))
        for name in order:
            yield name, self.get(name)

    def layer_tensors(self, layer: int) -> dict:
        prefix = self.arch.layer_prefix(layer) + "."
        return {n: self.get(n) for n in self._file_of if n.startswith(prefix)}

    def check_finite(self, names: list[str] | None = None) -> None:
        """Raise if any floating tensor holds NaN or Inf (reads the tensors)."""
        import torch

        for name, tensor in self.iter_tensors(names):
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise LctoolError(f"tensor {name} holds {bad} NaN/Inf values")

    def lineage(self) -> list[dict]:
        """The lctool operations behind this checkpoint, oldest first (lctool.io.manifest.lineage)."""
        from lctool.io.manifest import lineage

        return lineage(self.manifest)

    def __repr__(self) -> str:
        params = self.num_parameters()
        return f"Checkpoint({self.path!r}, {self.arch.name}, {params / 1e6:.1f}M params)"


def open_checkpoint(path: str, **kwargs) -> Checkpoint:
    return Checkpoint(path, **kwargs)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def parameter_count_str(n: int) -> str:
    if n <= 0:
        return "0"
    exponent = min(int(math.log10(n)) // 3, 4)
    return f"{n / 10 ** (3 * exponent):.2f}{['', 'K', 'M', 'B', 'T'][exponent]}"
