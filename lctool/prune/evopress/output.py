"""Writing the chosen configuration as a checkpoint, streamed tensor by tensor through CheckpointWriter.

blocks    whole layers dropped: a stock config with fewer `num_hidden_layers` and the remaining layers'
          tensors renumbered (loads with no custom code). Layers that lost only their attention or only
          their MLP: `config.lctool_dropped_sublayers` plus `modeling_lctool_dropped.py` through auto_map.
sparsity  ordinary dense safetensors whose pruned weights are exact zeros; the per-module sparsity is
          recorded in the manifest (lctool.json results).
bits      the GPTQ format (`quant_method` gptq, `checkpoint_format` gptq) at the most common bitwidth,
          with GPTQModel's per-module `dynamic` overrides ({"+:^<module>$": {"bits": b}}) for the rest:
          GPTQModel's own loader reads per-module bits; transformers' stock GPTQ path (optimum) builds
          every module at the one top-level `bits` and cannot load such a file. `lctool eval` reads it
          with lctool's reference loader, which honours `dynamic`.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from fractions import Fraction

import torch

from lctool.arch import DROPPED_SUBLAYERS_KEY, ModelArch
from lctool.io import Checkpoint, CheckpointWriter
from lctool.prune.surgery import fill_template

MODELING_FILE = "modeling_lctool_dropped.py"
MODELING_CLASS = "DroppedForCausalLM"
_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "modeling_dropped.py")


# ---- blocks -----------------------------------------------------------------------------------------


def layer_plan(num_layers: int, dropped: dict[str, list[int]]) -> tuple[list[int], dict[str, list[int]]]:
    """(old index of each kept layer, sub-blocks still dropped in the new numbering).

    A layer whose attention and MLP are both dropped goes entirely.
    """
    attn, mlp = set(dropped.get("attn", [])), set(dropped.get("mlp", []))
    kept = [i for i in range(num_layers) if not (i in attn and i in mlp)]
    renumber = {old: new for new, old in enumerate(kept)}
    partial = {"attn": sorted(renumber[i] for i in attn if i in renumber),
               "mlp": sorted(renumber[i] for i in mlp if i in renumber)}
    return kept, partial


def _fill_values(arch: ModelArch) -> dict:
    return {
        "BASE_CLASS": arch.family.causal_lm_class,
        "LAYERS": arch.family.layers,
        "SUBLAYERS": {kind: arch.sublayer_path(kind) for kind in ("attn", "mlp")},
        "NORMS": {kind: arch.sublayer_norm_path(kind) for kind in ("attn", "mlp")},
        "DROPPED_KEY": DROPPED_SUBLAYERS_KEY,
    }


def modeling_source(arch: ModelArch) -> str:
    """The template with this family's class and module names filled in (from the architecture map)."""
    return fill_template(_TEMPLATE, _fill_values(arch))


def blocks_config(config: dict, kept: list[int], partial: dict[str, list[int]]) -> dict:
    out = {k: v for k, v in config.items() if k not in (DROPPED_SUBLAYERS_KEY, "auto_map")}
    out["num_hidden_layers"] = len(kept)
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == config["num_hidden_layers"]:
        out["layer_types"] = [layer_types[i] for i in kept]
    if partial["attn"] or partial["mlp"]:
        out[DROPPED_SUBLAYERS_KEY] = partial
        out["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{MODELING_CLASS}"}
    return out


def _layer_index(arch: ModelArch, name: str) -> int | None:
    """The decoder layer a tensor belongs to (any tensor under the layers' prefix), else None."""
    prefix = arch.family.layers + "."
    head = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else ""
    return int(head) if head.isdigit() else None


def write_blocks(checkpoint: Checkpoint, writer: CheckpointWriter, dropped: dict[str, list[int]]) -> dict:
    """Write the model without the dropped sub-blocks; returns what the output holds."""
    arch = checkpoint.arch
    kept, partial = layer_plan(arch.num_layers, dropped)
    new_index = {old: new for new, old in enumerate(kept)}
    absent = {(old, role) for kind in ("attn", "mlp") for old in dropped.get(kind, [])
              for role in arch.sublayer_roles(kind)}
    for name, tensor in checkpoint.iter_tensors():
        old = _layer_index(arch, name)
        if old is None:
            writer.add_tensor(name, tensor)
            continue
        found = arch.classify(name)
        if old not in new_index or (found is not None and (old, found.role) in absent):
            continue
        old_prefix, new_prefix = arch.layer_prefix(old) + ".", arch.layer_prefix(new_index[old]) + "."
        writer.add_tensor(new_prefix + name[len(old_prefix):], tensor)
    config = blocks_config(checkpoint.config, kept, partial)
    writer.write_config(config)
    if "auto_map" in config:
        with open(writer.path(MODELING_FILE), "w", encoding="utf-8") as f:
            f.write(modeling_source(arch))
    writer.carry_files(checkpoint)
    return {"layers_removed": [i for i in range(arch.num_layers) if i not in new_index],
            "sublayers_removed": partial, "num_layers": len(kept), "stock_loadable": "auto_map" not in config}


# ---- sparsity ---------------------------------------------------------------------------------------


def write_sparse(checkpoint: Checkpoint, writer: CheckpointWriter, database, levels: dict[str, Fraction]) -> dict:
    """Dense tensors with exact zeros; returns per-module level and measured sparsity."""
    modules: dict[str, dict] = {}
    weights = {module + ".weight": module for module in levels}
    zeros = total = 0
    for name, tensor in checkpoint.iter_tensors():
        module = weights.get(name)
        if module is not None:
            tensor = database.stored(module, levels[module])["weight"].to(tensor.dtype)
            pruned = int((tensor == 0).sum())
            modules[module] = {"level": float(levels[module]), "sparsity": round(pruned / tensor.numel(), 6)}
            zeros, total = zeros + pruned, total + tensor.numel()
        writer.add_tensor(name, tensor)
    writer.write_config(dict(checkpoint.config))
    writer.carry_files(checkpoint)
    return {"modules": modules, "measured_sparsity": round(zeros / max(total, 1), 6)}


# ---- bits -------------------------------------------------------------------------------------------


def dynamic_pattern(module: str) -> str:
    return "+:^" + re.escape(module) + "$"


def write_mixed_gptq(checkpoint: Checkpoint, writer: CheckpointWriter, database, bits: dict[str, int],
                     settings: dict) -> dict:
    """GPTQ tensors at each module's bitwidth, base bits + `dynamic` overrides in quantization_config."""
    from lctool.quant import formats

    arch = checkpoint.arch
    counts = Counter(bits.values())
    base = max(counts, key=lambda b: (counts[b], b))
    stored_bits = params = 0
    for name, tensor in checkpoint.iter_tensors():
        found = arch.classify(name)
        module = name.rsplit(".", 1)[0]
        if found is not None and module in bits:
            if found.kind == "bias":
                writer.add_tensor(name, tensor.to(torch.float16))
                continue
            stored = database.stored(module, Fraction(bits[module]))
            for key, value in stored.items():
                writer.add_tensor(f"{module}.{key}", value)
            stored_bits += formats.stored_bits(stored)
            params += tensor.numel()
            continue
        writer.add_tensor(name, tensor)
    config = dict(checkpoint.config)
    qconfig = formats.gptq_quantization_config(base, settings["group_size"], settings["sym"], settings["act_order"],
                                               settings["damp"], [])
    overrides = {dynamic_pattern(m): {"bits": b} for m, b in sorted(bits.items()) if b != base}
    if overrides:
        qconfig["dynamic"] = overrides
    config["quantization_config"] = qconfig
    writer.write_config(config)
    writer.carry_files(checkpoint)
    return {"base_bits": base, "modules_at_other_bits": len(overrides),
            "bits_per_param_stored": round(stored_bits / max(params, 1), 4),
            "modules": {m: {"bits": b} for m, b in sorted(bits.items())}}
