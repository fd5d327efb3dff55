"""Bridges between checkpoint folders and in-memory transformers models."""

from __future__ import annotations

import os

import torch

from lctool.errors import LctoolError
from lctool.io.reader import Checkpoint
from lctool.io.writer import CheckpointWriter


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """A stock `AutoModelForCausalLM` for a plain (unquantized) lctool or HF checkpoint folder."""
    from transformers import AutoModelForCausalLM

    Checkpoint(path)  # validates the folder with one-line errors before transformers sees it
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    return model


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise LctoolError(f"no tokenizer files in {path}")
    # Explicitly False: a folder shipping code (auto_map) must not make transformers prompt on stdin.
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def model_state_tensors(model: torch.nn.Module, config: dict):
    """(name, tensor) of a causal LM's state dict as a checkpoint stores it: tied lm_head left out."""
    tied = bool(config.get("tie_word_embeddings", getattr(model.config, "tie_word_embeddings", False)))
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        yield name, tensor


def save_causal_lm(
    model: torch.nn.Module,
    target: str,
    *,
    operation: str,
    parameters: dict | None = None,
    inputs: list[Checkpoint] | None = None,
    tokenizer=None,
    carry_from: Checkpoint | None = None,
    seed: int | None = None,
    force: bool = False,
    max_shard_size: int | str = "5GB",
    results: dict | None = None,
) -> str:
    """Write an in-memory model through lctool's atomic writer (config as transformers writes it)."""
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]  # as save_pretrained writes it
    config = model.config.to_dict()
    with CheckpointWriter(
        target,
        operation=operation,
        parameters=parameters,
        inputs=inputs,
        seed=seed,
        force=force,
        max_shard_size=max_shard_size,
    ) as writer:
        writer.results.update(results or {})
        model.config.to_json_file(writer.path("config.json"))
        generation = getattr(model, "generation_config", None)
        if generation is not None and carry_from is None:
            generation.to_json_file(writer.path("generation_config.json"))
        for name, tensor in model_state_tensors(model, config):
            writer.add_tensor(name, tensor)
        if tokenizer is not None:
            tokenizer.save_pretrained(writer.tmp)
        if carry_from is not None:
            writer.carry_files(carry_from)
    return os.path.abspath(target)
