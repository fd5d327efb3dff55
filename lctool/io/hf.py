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


def check_buildable(config: dict) -> None:
    """Refuse a config.json transformers cannot build a model from, before any work: the stock class is
    built on the meta device (no memory, milliseconds), so an unknown activation, an out-of-range token
    id or a mistyped size is one line here rather than a traceback mid-command. Configs that name their
    own code (auto_map) are left to the loader, which refuses them without --trust-remote-code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if "auto_map" in config:
        return
    fields = {k: v for k, v in config.items() if k not in ("model_type", "quantization_config")}
    try:
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(AutoConfig.for_model(config.get("model_type"), **fields))
    except LctoolError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the library trips over comes from config.json
        raise LctoolError(f"config.json: transformers cannot build the model: {_first_line(e)}") from e


def _first_line(error: BaseException, limit: int = 300) -> str:
    """A library's message on one line (some span several)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_tokenizer_json(folder: str) -> None:
    """Refuse a tokenizer.json the tokenizers library cannot read, in one line (its parser is the judge:
    wrong types, unknown model kinds and broken merges all surface here instead of mid-command)."""
    from tokenizers import Tokenizer

    from lctool.io.reader import MAX_JSON_BYTES

    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return
    if os.path.getsize(path) > MAX_JSON_BYTES:
        raise LctoolError(f"tokenizer.json is over the {MAX_JSON_BYTES} byte cap")
    try:
        Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - the library raises a bare Exception for every parse error
        raise LctoolError(f"tokenizer.json in {folder} is not readable: {_first_line(e)}") from e


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise LctoolError(f"no tokenizer files in {path}")
    check_tokenizer_json(path)
    try:
        # Explicitly False: a folder shipping code (auto_map) must not make transformers prompt on stdin.
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        # Whatever transformers trips over here comes from the folder's tokenizer files: bad input.
        raise LctoolError(f"cannot load the tokenizer in {path}: {_first_line(e)}") from e


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
