"""Recovery after pruning: LoRA on every linear role (names from the architecture map) on the shared
training loop, then merged into the weights, so the output is a plain dense model again.

The paper tunes rank-8 LoRA for 2 epochs on 50k Alpaca samples (~2 hours on one GPU); here the
budget is `--recover-steps` optimizer steps over windows of the `--recover-data` train split.
"""

from __future__ import annotations

import time

import torch

from lctool.arch import ModelArch
from lctool.errors import LctoolError
from lctool.prune.options import RecoveryOptions
from lctool.train import ShuffledWindows, TrainConfig, lora, train

# Characters of training text tokenized per token the run will consume: enough that no window repeats
# for any tokenizer of at most this many characters per token, without tokenizing a whole corpus.
CHARS_PER_TOKEN_BOUND = 8


def training_windows(tokenizer, source: str, seq_len: int, tokens_needed: int) -> torch.Tensor:
    from lctool.data import load_text_source, token_windows, tokenize_text

    text = load_text_source(source, split="train")
    ids = tokenize_text(tokenizer, text[: tokens_needed * CHARS_PER_TOKEN_BOUND + seq_len])
    if ids.numel() < 2 * seq_len:
        raise LctoolError(f"--recover-data {source}: {ids.numel()} tokens is too little text for windows of {seq_len}")
    return token_windows(ids, seq_len)


def recover(model: torch.nn.Module, arch: ModelArch, tokenizer, options: RecoveryOptions,
            progress: bool = True, device: str = "cpu", dtype: str = "float32") -> tuple[torch.nn.Module, dict]:
    """Train LoRA adapters on the pruned model on `device` with `dtype` mixed precision, merge them, and
    return (merged model, run summary)."""
    from lctool.devices import mixed_precision

    needed = options.steps * options.batch_size * options.seq_len
    windows = training_windows(tokenizer, options.data, options.seq_len, needed)
    peft_model = lora.attach(model, lora.peft_config(arch, lora.LoraSpec(rank=options.rank, alpha=options.alpha)))
    config = TrainConfig(
        steps=options.steps, lr=options.lr, warmup_steps=min(options.warmup_steps, options.steps),
        batch_size=options.batch_size, seed=options.seed, progress=progress, description="recovering",
        device=device, mixed_precision=mixed_precision(dtype, device),
    )
    batches = ShuffledWindows({"input_ids": windows}, batch_size=options.batch_size, seed=options.seed)
    cpu_started = time.process_time()
    result = train(peft_model, batches, config)
    merged = lora.merge(peft_model)
    merged.eval()
    summary = result.summary()
    summary.pop("evals", None)
    summary["cpu_s"] = round(time.process_time() - cpu_started, 1)
    summary["lora_rank"] = options.rank
    return merged, summary
