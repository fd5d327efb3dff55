"""The level database: every linear layer of a model at every compression level, on disk.

Layout of a database folder:

    database.json           what it holds: format, space (sparsity | bits), method, levels, the settings
                            that made it, and the identity of the model (config sizes, sha256 of each shard)
    layer-00000.safetensors one file per decoder layer; tensor names:
                              sparsity: "<module>@<level>"           float weight with exact zeros
                              bits:     "<module>@<bits>.<key>"      GPTQ tensors (qweight, qzeros, scales, g_idx)
    building.json           present only while a build is under way (a rerun continues it)

Level 0 of a sparsity database is the model's own weight and is not stored. Levels are computed
independently of each other, on the dense model's activations: calibration windows flow through the
dense decoder layers one at a time (`LayerStream`), each layer's Hessians are collected once, and
every level of every linear in the layer is made from them (SparseGPT or GPTQ; magnitude pruning
needs no data). Memory stays at one decoder layer plus the activations.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from fractions import Fraction

import torch

from lctool.arch import LINEAR_ROLES
from lctool.errors import LctoolError, check
from lctool.io import Checkpoint
from lctool.io.cache import cache_dir
from lctool.io.manifest import sha256_file

FORMAT = "lctool-evopress-database"
VERSION = 1
MANIFEST = "database.json"
BUILDING = "building.json"
GPTQ_KEYS = ("qweight", "qzeros", "scales", "g_idx")

Log = Callable[[str], None]


def level_label(level: Fraction) -> str:
    """How a level is written in tensor names and JSON: 0.5, 3."""
    return str(int(level)) if level.denominator == 1 else str(float(level))


def layer_file(index: int) -> str:
    return f"layer-{index:05d}.safetensors"


def model_identity(checkpoint: Checkpoint) -> dict:
    """What ties a database to one model: its sizes and the sha256 of its weight shards."""
    arch = checkpoint.arch
    return {
        "model_type": checkpoint.config.get("model_type"),
        "layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "shards": {f: sha256_file(checkpoint.shard_path(f)) for f in checkpoint.shard_files},
    }


def describe(space: str, method: str, levels: list[Fraction], settings: dict, checkpoint: Checkpoint) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "space": space,
        "method": method,
        "levels": [level_label(v) for v in levels],
        "settings": settings,
        "model": model_identity(checkpoint),
    }


def default_location(description: dict) -> str:
    """Where a database lives when no --database is given: the cache, keyed by everything that made it."""
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir("evopress"), f"{description['space']}-{description['method']}-{digest}")


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise LctoolError(f"cannot read {path}: {type(e).__name__}") from None
    check(isinstance(data, dict), f"{path} is not a JSON object")
    return data


def _first_difference(have: dict, want: dict, prefix: str = "") -> str | None:
    for key in sorted(set(have) | set(want)):
        a, b = have.get(key), want.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: {a!r} in the database, {b!r} in this run"
    return None


class LevelDatabase:
    """A complete database, opened for reading: weights of any unit at any level."""

    def __init__(self, path: str, description: dict, checkpoint: Checkpoint):
        from safetensors import safe_open

        self.path = path
        self.description = description
        self.space = description["space"]
        self.checkpoint = checkpoint
        self.arch = checkpoint.arch
        self._files = [safe_open(os.path.join(path, layer_file(i)), framework="pt") for i in range(self.arch.num_layers)]

    def _layer(self, module: str) -> int:
        layer = self.arch.layer_of(module + ".weight")
        check(layer is not None, f"{module} is not a linear layer of this model")
        return layer

    def stored(self, module: str, level: Fraction) -> dict[str, torch.Tensor]:
        """The stored tensors of `module` at `level` (sparsity: {"weight"}; bits: the GPTQ tensors)."""
        handle = self._files[self._layer(module)]
        name = f"{module}@{level_label(level)}"
        if self.space == "sparsity":
            if level == 0:
                return {"weight": self.checkpoint.get(module + ".weight")}
            return {"weight": handle.get_tensor(name)}
        return {key: handle.get_tensor(f"{name}.{key}") for key in GPTQ_KEYS}

    def weight(self, module: str, level: Fraction) -> torch.Tensor:
        """The float32 weight [O, I] the model computes with at `level`."""
        stored = self.stored(module, level)
        if self.space == "sparsity":
            return stored["weight"].float()
        from lctool.quant.formats import gptq_dequantize

        out_features, in_features = self.checkpoint.entry(module + ".weight").shape
        return gptq_dequantize(stored, int(level), in_features, out_features)


def expected_names(checkpoint: Checkpoint, space: str, levels: list[Fraction], layer: int) -> set[str]:
    arch = checkpoint.arch
    names = set()
    for role in LINEAR_ROLES:
        module = arch.module(role, layer)
        for level in levels:
            if space == "sparsity" and level == 0:
                continue
            base = f"{module}@{level_label(level)}"
            names.update([base] if space == "sparsity" else [f"{base}.{k}" for k in GPTQ_KEYS])
    return names


def open_database(path: str, description: dict, checkpoint: Checkpoint, levels: list[Fraction]) -> LevelDatabase:
    """A complete database at `path` made for this model and these settings (one-line errors otherwise)."""
    from safetensors import safe_open

    have = _read_json(os.path.join(path, MANIFEST))
    check(have.get("format") == FORMAT and have.get("version") == VERSION,
          f"{path} is not an EvoPress level database (format {have.get('format')!r}, version {have.get('version')!r})")
    if have.get("model") != description["model"]:
        model = have.get("model") if isinstance(have.get("model"), dict) else {}
        differs = sorted(k for k in set(model) | set(description["model"]) if model.get(k) != description["model"].get(k))
        raise LctoolError(f"database {path} was built from another model ({', '.join(differs)} differ); "
                          "give another --database or a new folder to build one")
    for key in ("space", "method", "settings"):
        if have.get(key) != description[key]:
            detail = _first_difference({key: have.get(key)}, {key: description[key]})
            raise LctoolError(f"database {path} was built with other settings ({detail})")
    stored = {Fraction(v) for v in have.get("levels", [])}
    missing = [level_label(v) for v in levels if v not in stored and not (have["space"] == "sparsity" and v == 0)]
    check(not missing, f"database {path} holds levels {', '.join(have.get('levels', []))}, not {', '.join(missing)}")
    for index in range(checkpoint.arch.num_layers):
        file = os.path.join(path, layer_file(index))
        check(os.path.isfile(file), f"database {path} is incomplete: {layer_file(index)} is missing")
        with safe_open(file, framework="pt") as handle:
            absent = expected_names(checkpoint, have["space"], levels, index) - set(handle.keys())
        if absent:
            raise LctoolError(f"database {path}: {layer_file(index)} lacks {sorted(absent)[0]}")
    return LevelDatabase(path, have, checkpoint)


def prepare(path: str | None, description: dict, checkpoint: Checkpoint, levels: list[Fraction],
            calibration: Callable[[], torch.Tensor] | None, log: Log, batch_size: int = 8,
            device: str = "cpu") -> LevelDatabase:
    """Open the database at `path` (default: the cache) or build it there first (the calibration forward
    on `device`, in the dtype its settings name, float32 by default)."""
    path = os.path.abspath(path or default_location(description))
    if os.path.isfile(os.path.join(path, MANIFEST)):
        database = open_database(path, description, checkpoint, levels)
        log(f"level database: reusing {path}")
        return database
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, BUILDING)):
        entries = os.listdir(path)
        if not entries:
            raise LctoolError(f"database {path} is empty: not an EvoPress level database "
                              "(give a folder that does not exist to build one there)")
        raise LctoolError(f"{path} is not an EvoPress level database (no {MANIFEST})")
    if os.path.isdir(path):
        building = _read_json(os.path.join(path, BUILDING))
        if building != description:
            raise LctoolError(f"database {path} is an unfinished build with other settings "
                              f"({_first_difference(building, description)}); remove it or give another --database")
        log(f"level database: continuing the build in {path}")
    else:
        check(os.path.isdir(os.path.dirname(path)), f"--database: parent folder of {path} does not exist")
        os.makedirs(path)
        _write_json(os.path.join(path, BUILDING), description)
        log(f"level database: building {description['method']} levels {', '.join(description['levels'])} in {path}")
    _build(path, description, checkpoint, [Fraction(v) for v in description["levels"]], calibration, log, batch_size,
           device)
    _write_json(os.path.join(path, MANIFEST), description)
    os.remove(os.path.join(path, BUILDING))
    return open_database(path, description, checkpoint, levels)


def _build(path: str, description: dict, checkpoint: Checkpoint, levels: list[Fraction],
           calibration: Callable[[], torch.Tensor] | None, log: Log, batch_size: int, device: str = "cpu") -> None:
    from lctool.devices import torch_dtype
    from lctool.quant.api import compute_device
    from lctool.quant.engine import LayerStream

    arch = checkpoint.arch
    method = description["method"]
    stream = None
    if method != "magnitude":
        dtype = torch_dtype(description["settings"].get("dtype", "float32"))
        stream = LayerStream(checkpoint, calibration(), batch_size, device=device, dtype=dtype)
    for index in range(arch.num_layers):
        target = os.path.join(path, layer_file(index))
        layer = stream.load_layer(index) if stream is not None else None
        if not os.path.exists(target):
            started = time.time()
            with compute_device(device):
                tensors = _layer_levels(checkpoint, description, levels, index, stream, layer)
            _save_atomic(tensors, target)
            log(f"level database: layer {index + 1}/{arch.num_layers} ({len(tensors)} tensors, "
                f"{time.time() - started:.1f} s)")
        if stream is not None:
            stream.advance(layer)
        del layer


def _save_atomic(tensors: dict[str, torch.Tensor], target: str) -> None:
    from safetensors.torch import save_file

    tmp = f"{target}.tmp-{os.getpid()}"
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, target)


def _layer_levels(checkpoint: Checkpoint, description: dict, levels: list[Fraction], index: int, stream,
                  layer) -> dict[str, torch.Tensor]:
    from lctool.quant.gptq import gptq_quantize
    from lctool.quant.sparsegpt import magnitude_prune, sparsegpt_prune

    arch = checkpoint.arch
    settings = description["settings"]
    method = description["method"]
    hessians = stream.collect_hessians(layer, LINEAR_ROLES) if stream is not None else {}
    out: dict[str, torch.Tensor] = {}
    for role in LINEAR_ROLES:
        module = arch.module(role, index)
        source_dtype = checkpoint.entry(module + ".weight").torch_dtype
        weight = checkpoint.get(module + ".weight", dtype=torch.float32).to(stream.device if stream else "cpu")
        for level in levels:
            name = f"{module}@{level_label(level)}"
            if method == "magnitude":
                if level:
                    out[name] = magnitude_prune(weight, float(level)).weight.to(source_dtype)
            elif method == "sparsegpt":
                if level:
                    result = sparsegpt_prune(weight, hessians[role], float(level), damp=settings["damp"])
                    out[name] = result.weight.to(source_dtype)
            else:
                from lctool.quant.formats import gptq_tensors

                sym = settings["sym"]
                result = gptq_quantize(weight, hessians[role], bits=int(level), group_size=settings["group_size"],
                                       sym=sym, act_order=settings["act_order"], damp=settings["damp"],
                                       min_zero=0 if sym else 1)
                for key, tensor in gptq_tensors(result, int(level)).items():
                    out[f"{name}.{key}"] = tensor
    return out
