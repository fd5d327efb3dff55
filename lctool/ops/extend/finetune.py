"""What E²-LLM and CLEX share: the model loaded unscaled, windows of L0 tokens, LoRA or full
training on the shared loop, and writing the result through lctool's writer."""

from __future__ import annotations

import os
import time

import torch

from lctool.errors import LctoolError
from lctool.io import Checkpoint, CheckpointWriter
from lctool.io.hf import model_state_tensors
from lctool.ops.extend.options import ExtendOptions, TrainingOptions
from lctool.ops.extend.scaling import OriginalRope
from lctool.train import ShuffledWindows, TrainConfig, lora, train, trained_model
from lctool.train.processes import is_main_process, process_rank, wait_for_everyone  # noqa: F401  (process_rank: e2llm, clex)


def unscaled_config(config: dict, original: OriginalRope) -> dict:
    """The input config with its RoPE as pre-trained (no scaling, max_position_embeddings = L0)."""
    from lctool.arch import write_rope

    out = write_rope(config, original.rope)
    out["max_position_embeddings"] = original.length
    for key in ("auto_map", "clex"):
        out.pop(key, None)
    return out


def load_unscaled_model(checkpoint: Checkpoint, original: OriginalRope, dtype: torch.dtype = torch.float32):
    """The input as a stock model (float32 unless `dtype`) whose RoPE is the pre-trained one."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = unscaled_config(checkpoint.config, original)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_pretrained(checkpoint.path, config=config, dtype=dtype)
    return model


def training_windows(tokenizer, source: str, length: int, needed: int) -> torch.Tensor:
    """Back-to-back windows of `length` tokens from a text source's train split."""
    from lctool.data import load_text_source, token_windows, tokenize_text

    ids = tokenize_text(tokenizer, load_text_source(source, split="train"))
    if ids.numel() < length * 2:
        raise LctoolError(f"{source}: {ids.numel()} tokens is too little text to train at length {length}")
    windows = token_windows(ids, length)
    if windows.shape[0] < needed:
        # Short corpora: also take windows shifted by half a window, for more distinct sequences.
        shifted = token_windows(ids[length // 2 :], length)
        windows = torch.cat([windows, shifted])
    return windows


def train_config(training: TrainingOptions, description: str, lr_scales: dict[str, float] | None = None):
    return TrainConfig(lr_scales=lr_scales or {},
        steps=training.steps, lr=training.lr, warmup_steps=min(training.warmup_steps, training.steps),
        batch_size=training.batch_size, grad_accum=training.grad_accum, weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm, seed=training.seed, grad_checkpointing=training.grad_checkpointing,
        checkpoint_dir=training.checkpoint_dir, checkpoint_every=training.checkpoint_every or 0,
        resume=training.resume, log_path=training.log_path, description=description, device=training.device,
        mixed_precision=training.mixed_precision,
    )


def with_adapter(model, arch, training: TrainingOptions, also_train: list[torch.nn.Module] | None = None):
    """`model` as it trains: with `lora_rank`, under a LoRA adapter on the attention projections (and
    `also_train` modules trained whole beside it); else itself, every weight trained."""
    if not training.lora_rank:
        return model
    spec = lora.LoraSpec(rank=training.lora_rank, alpha=training.lora_alpha, roles="attn")
    adapted = lora.attach(model, lora.peft_config(arch, spec), seed=training.seed)
    for module in also_train or []:
        module.requires_grad_(True)  # peft froze everything but the adapter
    return adapted


def run_training(model, arch, windows: torch.Tensor, options: ExtendOptions, before_step, description: str,
                 tag: dict, rebuild, loss_fn=None, also_train: list[torch.nn.Module] | None = None,
                 lr_scales: dict[str, float] | None = None):
    """Train on the shared loop, with `lora_rank` a LoRA adapter on the attention projections (then merged),
    else every weight; `also_train` modules are trained whole beside the adapter; `lr_scales` gives
    parameters whose name contains a key lr × its value. `rebuild()` makes `model` again, untrained (under
    FSDP the trained weights are gathered into it). Returns the trained model (None on the processes of a
    sharded run that do not write) and the run's summary for the manifest."""
    training = options.training
    trainable = with_adapter(model, arch, training, also_train)
    batches = ShuffledWindows({"input_ids": windows}, batch_size=training.batch_size, seed=training.seed)
    cpu_started = time.process_time()
    result = train(trainable, batches, train_config(training, description, lr_scales), before_step=before_step,
                   loss_fn=loss_fn, tag=tag, sharded_ok=True)
    summary = result.summary()
    summary.pop("evals", None)
    summary["cpu_minutes"] = round((time.process_time() - cpu_started) / 60, 2)
    summary["lora_rank"] = training.lora_rank
    trainable = trained_model(trainable, result, lambda: with_adapter(rebuild(), arch, training))
    if trainable is None or not training.lora_rank:
        return trainable, summary
    return lora.merge(trainable), summary


def write_trained(model, checkpoint: Checkpoint, target: str, config: dict, options: ExtendOptions, force: bool,
                  results: dict, extra_files: dict[str, str] | None = None) -> str:
    """The trained model with `config`, each tensor back in the input's dtype; extra tensors kept float32.
    The main process writes it; every process returns once it is written."""
    if is_main_process():
        _write_checkpoint(model, checkpoint, target, config, options, force, results, extra_files or {})
    wait_for_everyone()
    return os.path.abspath(target)


def _write_checkpoint(model, checkpoint: Checkpoint, target: str, config: dict, options: ExtendOptions, force: bool,
                      results: dict, extra_files: dict[str, str]) -> None:
    with CheckpointWriter(
        target,
        operation="extend",
        parameters=options.model_dump(exclude_none=True),
        inputs=[checkpoint],
        seed=options.training.seed,
        force=force,
    ) as writer:
        writer.write_config(config)
        for name, tensor in model_state_tensors(model, config):
            if name in checkpoint:
                tensor = tensor.to(checkpoint.entry(name).torch_dtype)
            writer.add_tensor(name, tensor)
        writer.carry_files(checkpoint)
        for relative, source in extra_files.items():
            writer.copy_file(source, relative)
        writer.results.update(results)
