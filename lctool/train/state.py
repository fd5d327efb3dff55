"""Training checkpoints: trainable weights and optimizer tensors in safetensors, the rest in JSON.

Layout of `checkpoint_dir`:
    step-00000010/trainable.safetensors   trainable parameters by name
    step-00000010/optimizer.safetensors   optimizer tensors ("<param index>.<key>")
    step-00000010/optimizer.json          param groups and non-tensor optimizer state
    step-00000010/state.json              step, scheduler, loss history, run options, tag
    step-00000010/rng-<rank>.json         python/numpy/torch RNG states of each process
    step-00000010/extra.safetensors       the caller's extra state (train's `extra_state`), if any
    latest.json                           {"step": 10, "folder": "step-00000010"}
A step folder is written under a temporary name and renamed when complete, then `latest.json` is
replaced atomically, so a kill at any moment leaves the previous checkpoint usable. No pickles:
the optimizer is stored tensor by tensor rather than through `accelerator.save_state`.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lctool.errors import LctoolError

LATEST = "latest.json"
# Options that must not change between an interrupted run and its resumption.
RESUME_KEYS = ("lr", "warmup_steps", "schedule", "min_lr_ratio", "batch_size", "grad_accum", "weight_decay",
               "betas", "max_grad_norm", "seed", "mixed_precision")


def step_folder(step: int) -> str:
    return f"step-{step:08d}"


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LctoolError(f"training checkpoint file {path} is unreadable: {type(e).__name__}") from None


# ---- RNG -----------------------------------------------------------------------------------------
def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


# ---- optimizer -----------------------------------------------------------------------------------
def split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    for index, entries in rest.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": rest["param_groups"]}


# ---- save / load ---------------------------------------------------------------------------------
def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(accelerator, checkpoint_dir: str, step: int, model, optimizer, scheduler, state: dict,
                    keep: int, extra: dict[str, torch.Tensor] | None = None) -> str:
    """Write step `step` atomically (every process calls this; the main one writes the shared files)."""
    final = os.path.join(checkpoint_dir, step_folder(step))
    tmp = os.path.join(checkpoint_dir, f".{step_folder(step)}.tmp")
    if accelerator.is_main_process:
        os.makedirs(checkpoint_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    _write_json(os.path.join(tmp, f"rng-{accelerator.process_index}.json"), rng_state())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file(trainable_tensors(model), os.path.join(tmp, "trainable.safetensors"), metadata={"format": "pt"})
        optimizer_tensors, optimizer_rest = split_optimizer_state(optimizer.state_dict())
        save_file(optimizer_tensors, os.path.join(tmp, "optimizer.safetensors"), metadata={"format": "pt"})
        _write_json(os.path.join(tmp, "optimizer.json"), optimizer_rest)
        if extra is not None:
            tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in extra.items()}
            save_file(tensors, os.path.join(tmp, "extra.safetensors"), metadata={"format": "pt"})
        _write_json(os.path.join(tmp, "state.json"), {**state, "step": step, "scheduler": scheduler.state_dict()})
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        _write_json(os.path.join(checkpoint_dir, LATEST), {"step": step, "folder": step_folder(step)})
        _prune(checkpoint_dir, keep)
    accelerator.wait_for_everyone()
    return final


def _prune(checkpoint_dir: str, keep: int) -> None:
    folders = sorted(f for f in os.listdir(checkpoint_dir) if f.startswith("step-"))
    for folder in folders[:-keep]:
        shutil.rmtree(os.path.join(checkpoint_dir, folder), ignore_errors=True)


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    pointer = os.path.join(checkpoint_dir, LATEST)
    if not os.path.exists(pointer):
        return None
    folder = os.path.join(checkpoint_dir, _read_json(pointer)["folder"])
    if not os.path.isfile(os.path.join(folder, "state.json")):
        raise LctoolError(f"training checkpoint {folder} is incomplete")
    return folder


def read_state(folder: str) -> dict:
    return _read_json(os.path.join(folder, "state.json"))


def check_resumable(saved: dict, options: dict, tag: dict) -> None:
    for key in RESUME_KEYS:
        before, now = saved["options"].get(key), options.get(key)
        if json.dumps(before) != json.dumps(now):
            raise LctoolError(f"cannot resume: {key} was {before} in the interrupted run, now {now}")
    if json.dumps(saved.get("tag", {}), sort_keys=True) != json.dumps(tag, sort_keys=True):
        different = sorted(k for k in set(saved.get("tag", {})) | set(tag) if saved.get("tag", {}).get(k) != tag.get(k))
        raise LctoolError(f"cannot resume: the checkpoint was made for a different run ({', '.join(different)} differ)")


def load_extra(folder: str) -> dict[str, torch.Tensor]:
    path = os.path.join(folder, "extra.safetensors")
    if not os.path.isfile(path):
        raise LctoolError(f"cannot resume: {folder} holds no extra state (written by a different kind of run)")
    return load_file(path)


def load_checkpoint(accelerator, folder: str, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG; returns state.json."""
    state = read_state(folder)
    weights = load_file(os.path.join(folder, "trainable.safetensors"))
    current = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(current):
        missing = sorted(set(current) ^ set(weights))[:3]
        raise LctoolError(f"cannot resume: the checkpoint's trainable parameters differ from this model's ({', '.join(missing)} …)")
    with torch.no_grad():
        for name, parameter in current.items():
            if weights[name].shape != parameter.shape:
                raise LctoolError(f"cannot resume: {name} has shape {list(weights[name].shape)} in the checkpoint")
            parameter.copy_(weights[name])
    optimizer_state = join_optimizer_state(
        load_file(os.path.join(folder, "optimizer.safetensors")), _read_json(os.path.join(folder, "optimizer.json"))
    )
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(state["scheduler"])
    rng_path = os.path.join(folder, f"rng-{accelerator.process_index}.json")
    if not os.path.exists(rng_path):
        raise LctoolError(f"cannot resume: {folder} was written by fewer processes than this run has")
    set_rng_state(_read_json(rng_path))
    return state
