"""Writing a checkpoint whose vocabulary changed: new embedding rows, new tokenizer, same everything else.

The embedding (and an untied lm_head) are the only tensors that change; every other tensor streams
through unchanged, one at a time. Tied models stay tied: they have no lm_head tensor to write.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable

import torch

from lctool.errors import LctoolError
from lctool.io import Checkpoint, CheckpointWriter
from lctool.ops.vocab.bpe import TOKENIZER_FILE, ByteLevelBpe

VOCAB_ROLES = ("embed", "lm_head")
# Slow-tokenizer files that describe the same vocabulary: rewritten from the new one when present.
SLOW_VOCAB_FILE, SLOW_MERGES_FILE = "vocab.json", "merges.txt"
# Files that would contradict the new tokenizer.json and cannot be regenerated: left out.
STALE_FILES = ("tokenizer.model", "added_tokens.json")
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
# config/generation keys that hold token ids (an int or a list of ints).
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id",
                 "unk_token_id")

RowBuilder = Callable[[str, torch.Tensor], torch.Tensor]  # (role, old matrix) -> new matrix


def open_for_vocab(source: str, target: str, force: bool) -> tuple[Checkpoint, ByteLevelBpe]:
    """The checkpoint and its tokenizer, checked to fit each other (and the target, before any work)."""
    if os.path.lexists(target) and not force:
        raise LctoolError(f"{os.path.abspath(target)} already exists (pass --force to replace it)")
    checkpoint = Checkpoint(source)
    if checkpoint.is_quantized:
        raise LctoolError("vocab needs an unquantized checkpoint (quantize after changing the vocabulary)")
    bpe = ByteLevelBpe.read(checkpoint.path)
    if bpe.size > checkpoint.arch.vocab_size:
        raise LctoolError(
            f"the tokenizer uses ids up to {bpe.size - 1} but the model has only {checkpoint.arch.vocab_size} rows"
        )
    for role in VOCAB_ROLES:
        bias = checkpoint.arch.module(role) + ".bias"
        if bias in checkpoint:
            raise LctoolError(f"{bias} is not supported by vocab (a biased {role})")
    return checkpoint, bpe


def padded_rows(needed: int, multiple: int) -> int:
    return int(math.ceil(needed / multiple) * multiple)


def write_vocab_checkpoint(
    checkpoint: Checkpoint,
    target: str,
    *,
    operation: str,
    parameters: dict,
    bpe: ByteLevelBpe,
    num_rows: int,
    build_rows: RowBuilder,
    remap_id: Callable[[int], int] | None = None,
    results: dict,
    seed: int | None = None,
    force: bool = False,
    max_shard_size: str = "5GB",
) -> str:
    """Write `checkpoint` with `num_rows` vocabulary rows and tokenizer `bpe`; ids in configs go through `remap_id`."""
    config = remap_token_ids(dict(checkpoint.config), remap_id)
    config["vocab_size"] = num_rows
    with CheckpointWriter(
        target,
        operation=operation,
        parameters=parameters,
        inputs=[checkpoint],
        seed=seed,
        force=force,
        max_shard_size=max_shard_size,
    ) as writer:
        writer.results.update(results)
        writer.write_config(config)
        for name, tensor in checkpoint.iter_tensors():
            found = checkpoint.arch.classify(name)
            if found is not None and found.role in VOCAB_ROLES and found.kind == "weight":
                tensor = build_rows(found.role, tensor)
                if tensor.shape[0] != num_rows:
                    raise RuntimeError(f"{name}: built {tensor.shape[0]} rows, expected {num_rows}")
            writer.add_tensor(name, tensor)
        write_tokenizer_files(writer, checkpoint, bpe, remap_id)
        writer.carry_files(checkpoint, skip=STALE_FILES)
    return os.path.abspath(target)


def write_tokenizer_files(writer: CheckpointWriter, checkpoint: Checkpoint, bpe: ByteLevelBpe, remap_id) -> None:
    document = bpe.to_document()
    if remap_id is not None:
        document["post_processor"] = remap_processor_ids(document.get("post_processor"), remap_id)
    with open(writer.path(TOKENIZER_FILE), "w", encoding="utf-8") as f:
        json.dump(document, f, ensure_ascii=False, indent=2)
        f.write("\n")
    carried = set(checkpoint.carried_files())
    if SLOW_VOCAB_FILE in carried:
        with open(writer.path(SLOW_VOCAB_FILE), "w", encoding="utf-8") as f:
            json.dump(document["model"]["vocab"], f, ensure_ascii=False)
    if SLOW_MERGES_FILE in carried:
        with open(writer.path(SLOW_MERGES_FILE), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in bpe.merges))
    if remap_id is not None:
        _remap_json_file(writer, checkpoint, TOKENIZER_CONFIG, lambda d: remap_added_tokens_decoder(d, remap_id))
        _remap_json_file(writer, checkpoint, GENERATION_CONFIG, lambda d: remap_token_ids(d, remap_id))


def _remap_json_file(writer: CheckpointWriter, checkpoint: Checkpoint, name: str, change) -> None:
    source = os.path.join(checkpoint.path, name)
    if not os.path.isfile(source):
        return
    with open(source, encoding="utf-8") as f:
        document = json.load(f)
    with open(writer.path(name), "w", encoding="utf-8") as f:
        json.dump(change(document), f, ensure_ascii=False, indent=2)
        f.write("\n")


def remap_token_ids(config: dict, remap_id) -> dict:
    if remap_id is None:
        return config
    for key in TOKEN_ID_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            config[key] = remap_id(value)
        elif isinstance(value, list):
            config[key] = [remap_id(v) for v in value]
    return config


def remap_added_tokens_decoder(tokenizer_config: dict, remap_id) -> dict:
    decoder = tokenizer_config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        tokenizer_config["added_tokens_decoder"] = {str(remap_id(int(k))): v for k, v in decoder.items()}
    return tokenizer_config


def remap_processor_ids(processor, remap_id):
    """Token ids inside a post-processor (TemplateProcessing, Bert/Roberta, Sequence of them)."""
    if not isinstance(processor, dict):
        return processor
    for entry in (processor.get("special_tokens") or {}).values():
        entry["ids"] = [remap_id(i) for i in entry.get("ids", [])]
    for key in ("sep", "cls"):
        if isinstance(processor.get(key), list) and len(processor[key]) == 2:
            processor[key][1] = remap_id(processor[key][1])
    processor["processors"] = [remap_processor_ids(p, remap_id) for p in processor.get("processors") or []] or None
    if processor["processors"] is None:
        del processor["processors"]
    return processor
