"""Cutting the kept rows and columns out of each tensor, and the config and model code that describe them."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator

import torch

from lctool.arch import LAYER_SIZES_KEY, ModelArch
from lctool.prune.groups import head_rows
from lctool.prune.plan import LayerPlan, PrunePlan

MODELING_FILE = "modeling_lctool_pruned.py"
MODELING_CLASS = "PrunedForCausalLM"
_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "modeling_template.py")

# For each linear role: which axis the plan cuts (0 rows, 1 columns) and which kept list indexes it.
_CUTS = {
    "q": (0, "heads"), "k": (0, "kv"), "v": (0, "kv"), "o": (1, "heads"),
    "gate": (0, "channels"), "up": (0, "channels"), "down": (1, "channels"),
}  # fmt: skip


def _kept_index(plan: LayerPlan, which: str, head_dim: int) -> torch.Tensor:
    if which == "heads":
        return head_rows(plan.kept_heads, head_dim)
    if which == "kv":
        return head_rows(plan.kept_kv_heads, head_dim)
    return torch.tensor(plan.kept_channels, dtype=torch.long)


def cut_tensor(arch: ModelArch, plan: PrunePlan, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as the pruned model holds it (unchanged when no structure of it is removed)."""
    role = arch.classify(name)
    if role is None or role.layer is None or role.role not in _CUTS:
        return tensor
    layer_plan = plan.layers[role.layer]
    if not layer_plan.pruned:
        return tensor
    axis, which = _CUTS[role.role]
    if role.kind == "bias" and axis == 1:
        return tensor  # o/down biases live on the hidden size, which pruning keeps
    index = _kept_index(layer_plan, which, arch.head_dim)
    return tensor.index_select(0 if role.kind == "bias" else axis, index).contiguous()


def pruned_tensors(arch: ModelArch, plan: PrunePlan, names: list[str],
                   get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, pruned tensor) for each name, fetching one tensor at a time."""
    for name in names:
        yield name, cut_tensor(arch, plan, name, get(name))


def pruned_config(config: dict, arch: ModelArch, plan: PrunePlan) -> dict:
    """The output config: stock sizes when all layers agree, else per-layer sizes plus auto_map."""
    out = {k: v for k, v in config.items() if k not in (LAYER_SIZES_KEY, "auto_map")}
    out["head_dim"] = arch.head_dim
    sizes = [p.sizes() for p in plan.layers]
    if plan.stock_loadable(arch):
        out["num_attention_heads"] = sizes[0]["heads"]
        out["num_key_value_heads"] = sizes[0]["kv_heads"]
        out["intermediate_size"] = sizes[0]["intermediate_size"]
        return out
    out[LAYER_SIZES_KEY] = {
        "num_attention_heads": [s["heads"] for s in sizes],
        "num_key_value_heads": [s["kv_heads"] for s in sizes],
        "intermediate_size": [s["intermediate_size"] for s in sizes],
    }
    out["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{MODELING_CLASS}"}
    return out


def _fill_values(arch: ModelArch) -> dict:
    return {
        "BASE_CLASS": arch.family.causal_lm_class,
        "LAYERS": arch.family.layers,
        "MODULES": dict(arch.family.layer_modules),
        "SIZES_KEY": LAYER_SIZES_KEY,
    }


def modeling_source(arch: ModelArch) -> str:
    """The template with this family's class and module names filled in (from the architecture map)."""
    return fill_template(_TEMPLATE, _fill_values(arch))


def fill_template(path: str, values: dict) -> str:
    """A modeling template's `NAME = ...  # lctool:fill` lines set to `values` (every one must be filled)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()

    def fill(match: re.Match) -> str:
        return f"{match.group(1)} = {values[match.group(1)]!r}  # filled in by lctool prune"

    text, count = re.subn(r"^(\w+) = .*  # lctool:fill$", fill, text, flags=re.MULTILINE)
    assert count == len(values), "modeling template placeholders out of step"
    return text


def pruned_model_class(arch: ModelArch) -> type:
    """The non-uniform model class in-process (the same code the written modeling file runs)."""
    import transformers

    from lctool.prune import modeling_template

    values = _fill_values(arch)
    return modeling_template.make_pruned_class(getattr(transformers, values["BASE_CLASS"]), values["LAYERS"],
                                               values["MODULES"], values["SIZES_KEY"])


def build_pruned_model(config: dict, arch_out: ModelArch, dtype: torch.dtype = torch.float32):
    """An empty model of the pruned shape: stock class when uniform, the pruned class otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k != "auto_map"}
    hf_config = AutoConfig.for_model(**fields)
    if LAYER_SIZES_KEY in config:
        model = pruned_model_class(arch_out)(hf_config)
    else:
        model = AutoModelForCausalLM.from_config(hf_config)
    return model.to(dtype)
