"""LoRA through peft, wired in one place for every op that trains adapters (finetune, context
extension, pruning recovery).

peft's tuner layout is the model: a `LoraSpec` becomes a `LoraConfig` (`peft_config`), the config
wraps a model (`attach`), and the trained adapter leaves either merged into the weights (`merge`) or
as a stock peft adapter folder (`save_adapter`, read back by `load_adapter`). Modules are named by
role through the architecture map, never by hand. QLoRA: `load_nf4` gives a bitsandbytes nf4 base
ready for k-bit training.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lctool.arch import LINEAR_ROLES, ModelArch
from lctool.errors import LctoolError, check

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraSpec:
    """What to adapt: `roles` is what `ModelArch.linear_roles` takes (attn, mlp, all, or linear roles);
    `train_fully` lists roles whose modules are trained whole (peft's `modules_to_save`)."""

    rank: int
    alpha: float | None = None  # None: twice the rank
    dropout: float = 0.0
    roles: str | Sequence[str] = "all"
    train_fully: Sequence[str] = ()


def module_leaf_names(arch: ModelArch, roles: Sequence[str]) -> list[str]:
    """peft matches modules by the last part of their name (`q_proj`, `input_layernorm`)."""
    names = (arch.module(role, 0 if role in arch.family.layer_modules else None) for role in roles)
    return sorted({name.rsplit(".", 1)[-1] for name in names})


def peft_config(arch: ModelArch, spec: LoraSpec):
    """The `LoraConfig` of `spec` on a model of `arch` (unknown roles fail here, before any loading)."""
    from peft import LoraConfig

    fully_trained = module_leaf_names(arch, spec.train_fully)
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha or 2 * spec.rank,
        lora_dropout=spec.dropout,
        target_modules=arch.module_names_for_roles(arch.linear_roles(spec.roles)),
        modules_to_save=fully_trained or None,
        ensure_weight_tying=arch.tied and bool(fully_trained),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach(model: torch.nn.Module, config, seed: int | None = None):
    """`model` wrapped with fresh adapters of `config`; only they (and `modules_to_save`) train.
    LoRA's A matrices are drawn at random: give `seed` for the same adapter every run."""
    from peft import get_peft_model
    from transformers import set_seed

    if seed is not None:
        set_seed(seed)
    return get_peft_model(model, config)


def merge(model, onto: torch.nn.Module | None = None) -> torch.nn.Module:
    """The base model with the adapter merged into its weights and peft's wrappers gone. `onto`: an
    unquantized copy of the base to merge into instead (merging into nf4 weights would re-round them)."""
    if onto is not None:
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        adapter = get_peft_model_state_dict(model)
        model = get_peft_model(onto, copy.deepcopy(model.peft_config["default"]))
        set_peft_model_state_dict(model, adapter)
    return model.merge_and_unload()


def save_adapter(model, folder: str, base_path: str) -> None:
    """The adapter in peft's stock layout (adapter_config.json + adapter_model.safetensors) in `folder`,
    naming `base_path` as the base it goes on."""
    config = model.peft_config["default"]
    config.base_model_name_or_path = base_path
    for field in ("target_modules", "modules_to_save"):
        names = getattr(config, field, None)
        if isinstance(names, (set, list)):
            # peft keeps these as sets, written in hash order: sorted, the same run writes the same bytes
            setattr(config, field, sorted(names))
    model.save_pretrained(folder, safe_serialization=True)


# ---- QLoRA ----------------------------------------------------------------------------------------
def nf4_config(compute_dtype: torch.dtype = torch.float32):
    from transformers import BitsAndBytesConfig

    # Double quantization also avoids a bitsandbytes CPU save bug (see docs: stock formats).
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_nf4(path: str, device: str = "cpu", compute_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model at `path` quantized to nf4 on load on `device` (bitsandbytes quantizes where the weights
    land; a 4-bit model cannot move afterwards), prepared for training adapters on it."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4_config(compute_dtype),
                                                 dtype=torch.float32, device_map={"": device})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


# ---- reading adapters back ------------------------------------------------------------------------
def load_adapter(adapter_path: str, base_path: str | None = None, dtype: torch.dtype = torch.float32):
    """A stock `PeftModel` of an adapter folder on its base (default: the base it was trained on),
    refusing a base whose shapes do not fit the adapter."""
    from peft import PeftConfig, PeftModel

    from lctool.io import Checkpoint
    from lctool.io.hf import load_causal_lm

    check(os.path.isfile(os.path.join(adapter_path, ADAPTER_CONFIG)), f"no {ADAPTER_CONFIG} in {adapter_path}")
    config = PeftConfig.from_pretrained(adapter_path)
    base_path = base_path or config.base_model_name_or_path
    check(bool(base_path) and os.path.isdir(base_path), f"the adapter's base model {base_path!r} is not a folder")
    check_adapter_fits(adapter_path, Checkpoint(base_path))
    base = load_causal_lm(base_path, dtype=dtype)
    return PeftModel.from_pretrained(base, adapter_path).eval()


def check_adapter_fits(adapter_path: str, base) -> None:
    """Refuse an adapter made for another base (a `Checkpoint`): different family, shapes, or (via
    lctool.json) weights."""
    from safetensors import safe_open

    from lctool.io.manifest import describe_input

    manifest_path = os.path.join(adapter_path, "lctool.json")
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            inputs = json.load(f).get("inputs") or []
        trained_on = inputs[0].get("shards") if inputs else None
        if trained_on and trained_on != describe_input(base)["shards"]:
            raise LctoolError(f"the adapter {adapter_path} was trained on a different base than {base.path}")
    weights = os.path.join(adapter_path, ADAPTER_WEIGHTS)
    check(os.path.isfile(weights), f"no {ADAPTER_WEIGHTS} in {adapter_path}")
    arch = base.arch
    with safe_open(weights, framework="pt") as f:
        for name in f.keys():
            _check_lora_shape(arch, name, f.get_slice(name).get_shape())


def _check_lora_shape(arch: ModelArch, name: str, shape: list[int]) -> None:
    """lora_A is [r, in_features] and lora_B [out_features, r] of the base module they adapt."""
    for part, side in (("lora_A", 1), ("lora_B", 0)):
        marker = f".{part}."
        if marker not in name:
            continue
        module_name = name.split(marker)[0].removeprefix("base_model.model.")
        role = arch.classify(module_name + ".weight")
        if role is None or role.role not in LINEAR_ROLES or role.layer >= arch.num_layers:
            raise LctoolError(f"the adapter adapts {module_name}, which the base model does not have")
        out_features, in_features = arch.linear_shape(role.role)
        expected = in_features if side == 1 else out_features
        if shape[side] != expected:
            raise LctoolError(f"the adapter was made for a different base: {module_name} has "
                              f"{'in' if side else 'out'}_features {expected}, the adapter {shape[side]}")
