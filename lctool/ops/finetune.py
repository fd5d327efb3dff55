"""`lctool finetune`: LoRA / QLoRA through peft, on the shared training loop.

The output is either a stock peft adapter folder (`adapter_config.json` + `adapter_model.safetensors`,
plus the base's tokenizer and lctool.json) or, with `merge`, a full checkpoint with the adapter
merged in. Target modules come from the architecture map by role. A resumable run keeps its
training checkpoints beside the output (`.<name>.lctool-train/`) until the output is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from typing import Literal

import torch
from pydantic import ConfigDict, Field, model_validator

from lctool.devices import TrainingComputeOptions
from lctool.errors import LctoolError, check
from lctool.io import Checkpoint, CheckpointWriter
from lctool.train import lora
from lctool.train.lora import load_adapter as load_adapter  # finetune's reader of its own output
from lctool.train.processes import is_main_process, launched_with_fsdp, process_rank, wait_for_everyone

TRAINABLE_GROUPS = ("embed", "norm", "lm_head")
DEFAULT_MAX_SEQ_LEN = 1024
IGNORE_INDEX = -100


class FinetuneOptions(TrainingComputeOptions):
    """`device`: accelerate's device of the training run; `dtype`: its mixed precision (autocast; the
    adapter and optimizer state stay float32, a merged output keeps the base's dtype; --qlora: also
    bitsandbytes' compute dtype)."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="corpus name, name:split, a .txt file, or a .jsonl file")
    format: Literal["auto", "text", "jsonl"] = "auto"
    seq_len: int | None = Field(None, gt=1, description="default: the model's context, at most 1024")
    lora_r: int = Field(16, gt=0, le=4096)
    lora_alpha: float = Field(32.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target: str = "all"
    qlora: bool = False
    trainable: str | None = Field(None, description="also train fully: comma list of embed, norm, lm_head")
    steps: int | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    lr: float = Field(2e-4, gt=0, le=1)
    warmup: int = Field(0, ge=0)
    batch: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    grad_checkpointing: bool = False
    merge: bool = False
    resume: bool = False
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0, description="0: only when interrupted")
    eval_data: str | None = Field(None, description="held-out text for the eval hook (default: the corpus's eval split)")
    eval_every: int = Field(0, ge=0)
    eval_tokens: int = Field(16384, gt=0, description="tokens of eval_data scored at each evaluation")
    log: str | None = Field(None, description="JSONL log path (a copy always goes into the output)")

    @model_validator(mode="after")
    def _one_length(self) -> FinetuneOptions:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        return self


# ---- checks before any work -----------------------------------------------------------------------
def check_output(target: str, force: bool) -> None:
    """Refuse a bad output before training, not after (the writer checks again when writing)."""
    parent = os.path.dirname(os.path.abspath(target))
    check(os.path.isdir(parent), f"output folder's parent {parent} does not exist")
    check(not os.path.lexists(target) or force, f"{target} already exists (pass --force to replace it)")


def resolve_seq_len(checkpoint: Checkpoint, seq_len: int | None) -> int:
    context = checkpoint.arch.max_positions
    if seq_len is None:
        return min(context or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
    if context and seq_len > context:
        raise LctoolError(
            f"--seq-len {seq_len} is beyond the model's context of {context} tokens (max_position_embeddings); "
            "extend the context first (lctool extend) or lower --seq-len"
        )
    return seq_len


def trainable_groups(text: str | None) -> list[str]:
    groups = [g.strip() for g in (text or "").split(",") if g.strip()]
    for group in groups:
        check(group in TRAINABLE_GROUPS, f"--trainable: unknown group {group!r} (choose from {', '.join(TRAINABLE_GROUPS)})")
    return groups


def fully_trained_roles(arch, groups: list[str]) -> list[str]:
    """The roles of the `--trainable` groups (peft trains their modules whole)."""
    roles: list[str] = []
    if "embed" in groups:
        roles.append("embed")
    if "lm_head" in groups:
        check(not arch.tied or "embed" in groups,
              "--trainable lm_head: this model ties lm_head to the embeddings; train embed instead")
        if not arch.tied:
            roles.append("lm_head")
    if "norm" in groups:
        roles += ["final_norm", *arch.family.norm_roles]
    return roles


# ---- data -----------------------------------------------------------------------------------------
def data_format(options: FinetuneOptions) -> str:
    if options.format != "auto":
        return options.format
    return "jsonl" if options.data.lower().endswith(".jsonl") else "text"


TOKENIZE_CHUNK_CHARS = 1 << 18


def tokenize_in_chunks(tokenizer, text: str, chunk_chars: int = TOKENIZE_CHUNK_CHARS) -> torch.Tensor:
    """Token ids of a long text, tokenized a paragraph-aligned chunk at a time: one call on a whole
    corpus holds ~500 bytes of tokenizer state per token (0.85 GB for 1.8M tokens)."""
    from lctool.data import tokenize_text

    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        if end < len(text):
            cut = text.rfind("\n\n", start, end)
            end = cut + 2 if cut > start else end
        pieces.append(tokenize_text(tokenizer, text[start:end]))
        start = end
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def text_examples(tokenizer, source: str, seq_len: int) -> dict[str, torch.Tensor]:
    from lctool.data import load_text_source, token_windows

    ids = tokenize_in_chunks(tokenizer, load_text_source(source, split="train"))
    check(ids.numel() > 0, f"no training data: {source} holds no text")
    check(ids.numel() >= seq_len,
          f"the training data has {ids.numel()} tokens, fewer than one --seq-len window of {seq_len}")
    return {"input_ids": token_windows(ids, seq_len)}


def read_jsonl(path: str) -> list[dict]:
    check(os.path.isfile(path), f"no data file at {path}")
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise LctoolError(f"{path}:{number}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                raise LctoolError(f"{path}:{number}: not valid JSON") from None
            text_row = isinstance(row, dict) and isinstance(row.get("text"), str)
            pair_row = isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str)
            check(text_row or pair_row, f'{path}:{number}: expected {{"text": ...}} or {{"prompt": ..., "completion": ...}}')
            # Only the fields that made the row valid travel on (a stray non-string "text" beside a valid
            # prompt/completion pair must not make it look like a text row later).
            rows.append({"text": row["text"]} if text_row else {"prompt": row["prompt"], "completion": row["completion"]})
    check(rows, f"no training data: {path} has no rows")
    kinds = {"text" in row for row in rows}
    check(len(kinds) == 1, f"{path}: rows mix text and prompt/completion; use one kind per file")
    return rows


def _eos_id(tokenizer) -> int | None:
    return tokenizer.eos_token_id


def jsonl_examples(tokenizer, path: str, seq_len: int) -> dict[str, torch.Tensor]:
    from lctool.data import token_windows, tokenize_text

    rows = read_jsonl(path)
    eos = _eos_id(tokenizer)
    if "text" in rows[0]:
        pieces = [tokenize_text(tokenizer, row["text"]) for row in rows]
        if eos is not None:
            pieces = [torch.cat([p, torch.tensor([eos])]) for p in pieces]
        ids = torch.cat(pieces)
        check(ids.numel() >= seq_len,
              f"the training data has {ids.numel()} tokens, fewer than one --seq-len window of {seq_len}")
        return {"input_ids": token_windows(ids, seq_len)}
    return completion_examples(tokenizer, rows, seq_len, eos)


def completion_examples(tokenizer, rows: list[dict], seq_len: int, eos: int | None) -> dict[str, torch.Tensor]:
    """Prompt + completion per row, right-padded; the loss covers completion tokens only."""
    from lctool.data import tokenize_text

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    input_ids, labels, masks = [], [], []
    for row in rows:
        prompt = tokenize_text(tokenizer, row["prompt"]).tolist()
        completion = tokenize_text(tokenizer, row["completion"]).tolist() + ([eos] if eos is not None else [])
        ids = (prompt + completion)[:seq_len]
        target = ([IGNORE_INDEX] * len(prompt) + completion)[:seq_len]
        if all(t == IGNORE_INDEX for t in target):
            continue  # the prompt alone fills the window: nothing to learn from this row
        padding = seq_len - len(ids)
        input_ids.append(ids + [pad] * padding)
        labels.append(target + [IGNORE_INDEX] * padding)
        masks.append([1] * len(ids) + [0] * padding)
    check(input_ids, f"no training data: every prompt is {seq_len} tokens or longer (raise --seq-len)")
    return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(masks)}


def training_examples(tokenizer, options: FinetuneOptions, seq_len: int) -> dict[str, torch.Tensor]:
    if data_format(options) == "jsonl":
        return jsonl_examples(tokenizer, options.data, seq_len)
    return text_examples(tokenizer, options.data, seq_len)


def total_steps(options: FinetuneOptions, num_examples: int) -> int:
    if options.steps is not None:
        return options.steps
    per_step = options.batch * options.grad_accum
    return max(1, math.ceil((options.epochs or 1.0) * num_examples / per_step))


def eval_text(options: FinetuneOptions) -> str | None:
    from lctool.data import CORPORA, load_text_source

    if options.eval_data:
        return load_text_source(options.eval_data, split="eval")
    name = options.data.split(":", 1)[0]
    return load_text_source(name, split="eval") if name in CORPORA and data_format(options) == "text" else None


# ---- model ----------------------------------------------------------------------------------------
def load_base(checkpoint: Checkpoint, qlora: bool, device: str = "cpu", dtype: str = "float32"):
    check(not checkpoint.is_quantized, f"{checkpoint.path} is already quantized; fine-tune an unquantized model "
                                       "(--qlora quantizes it to nf4 on load)")
    if qlora:
        from lctool.devices import torch_dtype

        return lora.load_nf4(checkpoint.path, device, torch_dtype(dtype))
    from lctool.io.hf import load_causal_lm

    return load_causal_lm(checkpoint.path, dtype=torch.float32)


def lora_config(checkpoint: Checkpoint, options: FinetuneOptions):
    arch = checkpoint.arch
    roles = arch.linear_roles(options.target)
    spec = lora.LoraSpec(rank=options.lora_r, alpha=options.lora_alpha, dropout=options.lora_dropout, roles=roles,
                         train_fully=fully_trained_roles(arch, trainable_groups(options.trainable)))
    return lora.peft_config(arch, spec)


def peft_model(checkpoint: Checkpoint, options: FinetuneOptions):
    config = lora_config(checkpoint, options)
    return lora.attach(load_base(checkpoint, options.qlora, options.device, options.dtype), config, seed=options.seed)


def run_tag(checkpoint: Checkpoint, options: FinetuneOptions, examples: dict) -> dict:
    """What a resumed run must share with the interrupted one: base weights, adapter shape, data."""
    from lctool.io.manifest import describe_input

    digest = hashlib.sha256()
    for key in sorted(examples):
        digest.update(key.encode())
        digest.update(examples[key].numpy().tobytes())
    adapter = {k: getattr(options, k) for k in ("lora_r", "lora_alpha", "lora_dropout", "target", "qlora", "trainable")}
    return {"base": describe_input(checkpoint)["shards"], "adapter": adapter, "data_sha256": digest.hexdigest()}


def make_eval_fn(tokenizer, text: str, seq_len: int, max_tokens: int):
    from lctool.eval import perplexity

    def evaluate(model) -> dict:
        scores = perplexity(model, tokenizer, text, ctx=seq_len, max_tokens=max_tokens)
        return {"ppl": round(scores["ppl"], 4), "bpb": round(scores["bpb"], 5)}

    return evaluate


# ---- run ------------------------------------------------------------------------------------------
def training_folder(target: str) -> str:
    parent, name = os.path.split(os.path.abspath(target))
    return os.path.join(parent, f".{name}.lctool-train")


def prepare_training_folder(folder: str, resume: bool, force: bool) -> None:
    if os.path.isdir(folder) and not resume:
        check(force, f"an interrupted run left checkpoints in {folder}: pass --resume to continue it "
                     "or --force to start over")
        shutil.rmtree(folder)


def finetune(model_path: str, target: str, options: FinetuneOptions, force: bool = False, progress: bool = True) -> dict:
    """Fine-tune `model_path` and write an adapter (or a merged checkpoint) to `target`; returns the summary."""
    from lctool.io.hf import check_buildable, load_tokenizer
    from lctool.train import ShuffledWindows, TrainConfig, train, trained_model

    checkpoint = Checkpoint(model_path)
    check_buildable(checkpoint.config)
    seq_len = resolve_seq_len(checkpoint, options.seq_len)
    lora_config(checkpoint, options)  # unknown roles and groups fail here, before any loading
    check(not (options.qlora and launched_with_fsdp()), "--qlora under FSDP is not supported (nf4 weights are "
                                                         "not sharded by accelerate here); use DDP or one process")
    check_output(target, force)
    tokenizer = load_tokenizer(checkpoint.path)
    examples = training_examples(tokenizer, options, seq_len)
    steps = total_steps(options, len(examples["input_ids"]))
    check(options.warmup <= steps, f"--warmup {options.warmup} is longer than the run ({steps} steps)")
    held_out = eval_text(options) if options.eval_every else None
    check(not options.eval_every or held_out is not None, "--eval-every needs --eval-data (no eval split for this data)")

    folder = training_folder(target)
    if process_rank() == 0:  # under a launcher the others must not race it (accelerate is not set up yet)
        prepare_training_folder(folder, options.resume, force)
    model = peft_model(checkpoint, options)
    config = TrainConfig(
        steps=steps, lr=options.lr, warmup_steps=options.warmup, batch_size=options.batch,
        grad_accum=options.grad_accum, weight_decay=options.weight_decay, max_grad_norm=options.max_grad_norm,
        seed=options.seed, grad_checkpointing=options.grad_checkpointing, checkpoint_dir=folder,
        checkpoint_every=options.checkpoint_every, resume=options.resume,
        log_path=options.log or os.path.join(folder, "train_log.jsonl"), eval_every=options.eval_every,
        progress=progress, description="finetune", device=options.device,
        mixed_precision=options.mixed_precision,
    )
    data = ShuffledWindows(examples, options.batch, seed=options.seed)
    eval_fn = make_eval_fn(tokenizer, held_out, seq_len, options.eval_tokens) if held_out else None
    try:
        result = train(model, data, config, eval_fn=eval_fn, tag=run_tag(checkpoint, options, examples),
                       sharded_ok=True)
        summary = {"output": os.path.abspath(target), "kind": "merged" if options.merge else "adapter",
                   "seq_len": seq_len, "examples": len(examples["input_ids"]), **result.summary()}
        model = trained_model(model, result, lambda: peft_model(checkpoint, options))
        if is_main_process():
            write_output(model, checkpoint, target, options, summary, config.log_path, force)
        wait_for_everyone()
    except Exception:
        # A failure (a full disk, a diverged loss) keeps the folder only if it holds a checkpoint to
        # --resume from; otherwise nothing is left behind. Interruptions are not Exceptions: they keep it.
        from lctool.train.state import LATEST

        if process_rank() == 0 and not os.path.exists(os.path.join(folder, LATEST)):
            discard_training_folder(folder)
        raise
    if is_main_process():
        discard_training_folder(folder)
    return summary


def discard_training_folder(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def write_output(model, checkpoint: Checkpoint, target: str, options: FinetuneOptions, summary: dict,
                 log_path: str, force: bool) -> None:
    results = {k: v for k, v in summary.items() if k != "output"}
    if options.merge:
        merged = merged_model(model, checkpoint, options)
        write_merged(merged, checkpoint, target, options, results, log_path, force)
    else:
        write_adapter(model, checkpoint, target, options, results, log_path, force)


def write_adapter(model, checkpoint, target, options, results, log_path, force) -> None:
    with CheckpointWriter(target, operation="finetune", parameters=options.model_dump(), inputs=[checkpoint],
                          seed=options.seed, force=force, require_config=False) as writer:
        writer.results.update(results)
        lora.save_adapter(model, writer.tmp, checkpoint.path)
        writer.carry_files(checkpoint)
        if os.path.exists(log_path):
            writer.copy_file(log_path, "train_log.jsonl")


def merged_model(model, checkpoint: Checkpoint, options: FinetuneOptions):
    """The base with the adapter merged in, at full precision (a QLoRA adapter is merged into the
    unquantized base: merging into nf4 weights would re-round them)."""
    merged = lora.merge(model, onto=load_base(checkpoint, qlora=False) if options.qlora else None)
    base_dtype = checkpoint.entry(checkpoint.arch.weight("embed")).torch_dtype
    return merged.to(base_dtype).eval()


def write_merged(merged, checkpoint, target, options, results, log_path, force) -> None:
    from lctool.io.hf import save_causal_lm

    save_causal_lm(merged, target, operation="finetune", parameters=options.model_dump(), inputs=[checkpoint],
                   carry_from=checkpoint, seed=options.seed, force=force, results=results)
    if os.path.exists(log_path):
        shutil.copyfile(log_path, os.path.join(target, "train_log.jsonl"))
