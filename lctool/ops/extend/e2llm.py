"""E²-LLM: one fine-tune at the original length L0 that prepares the model for every scale.

Each training batch draws a RoPE scale g and a position offset δ; the batch is read at positions
δ … δ+L0−1 with every frequency divided by g (position interpolation). At inference the model reads
length L with the stock linear scaling g = ceil(L/L0), so the output needs no custom code.

Choices the paper leaves open, and how lctool fixes them:
- g is uniform over the integers {1, …, g_max}; g_max defaults to ceil(L/L0) (the scale used at L).
- δ is uniform over {0, …, (g−1)·L0}, drawn per sequence: the window then lies inside the g·L0
  positions that scale g covers at inference, so every (scale, position) pair the model will meet is
  trained, and g = 1 is the plain pre-training setting (δ = 0).
- g is drawn once per micro-batch (the rotary embedding is shared by the batch), from a generator
  seeded by (seed, step, micro-batch), identical in every process; offsets also depend on the rank.
- The scale is applied by rewriting the rotary embedding's inv_freq per step (no model rebuild).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lctool.ops.extend.finetune import (
    load_unscaled_model,
    process_rank,
    run_training,
    training_windows,
    write_trained,
)
from lctool.ops.extend.options import ExtendOptions
from lctool.ops.extend.rotary import RotaryOverride
from lctool.ops.extend.scaling import Lengths, rotary_dim
from lctool.ops.extend.training_free import extended_config, extension_record


@dataclass
class E2Augmentation:
    """The `before_step` hook: sample (g, δ), set the rotary scale, shift the positions."""

    rotary: RotaryOverride
    original_length: int
    g_max: int
    seed: int = 0
    rank: int = 0
    history: list[tuple[int, int, list[int]]] = field(default_factory=list)  # (step, g, offsets)
    _step: int = -1
    _micro: int = 0

    def _generator(self, step: int, *extra: int) -> torch.Generator:
        key = hash((self.seed, step, self._micro, *extra)) & 0x7FFF_FFFF_FFFF_FFFF
        return torch.Generator().manual_seed(key)

    def sample(self, step: int, rows: int) -> tuple[int, torch.Tensor]:
        self._micro = self._micro + 1 if step == self._step else 0
        self._step = step
        scale = int(torch.randint(1, self.g_max + 1, (1,), generator=self._generator(step)))
        highest_offset = (scale - 1) * self.original_length
        offsets = torch.randint(0, highest_offset + 1, (rows,), generator=self._generator(step, self.rank + 1))
        return scale, offsets

    def __call__(self, step: int, model, batch: dict) -> dict:
        input_ids = batch["input_ids"]
        scale, offsets = self.sample(step, input_ids.shape[0])
        self.rotary.scale_linearly(scale)
        positions = offsets[:, None] + torch.arange(input_ids.shape[1])[None, :]
        self.history.append((step, scale, offsets.tolist()))
        return {**batch, "position_ids": positions}


def scale_histogram(history: list[tuple[int, int, list[int]]]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for _, scale, _ in history:
        counts[scale] = counts.get(scale, 0) + 1
    return dict(sorted(counts.items()))


def train_e2llm(plan, target: str, options: ExtendOptions, force: bool) -> str:
    checkpoint, original, lengths = plan.checkpoint, plan.original, plan.lengths
    g_max = options.g_max or lengths.whole_factor
    model = load_unscaled_model(checkpoint, original)
    from lctool.io.hf import load_tokenizer

    tokenizer = load_tokenizer(checkpoint.path)
    training = options.training
    windows = training_windows(tokenizer, training.corpus, lengths.original,
                               training.steps * training.batch_size * training.grad_accum)
    with RotaryOverride(model) as rotary:
        hook = E2Augmentation(rotary, lengths.original, g_max, seed=training.seed, rank=process_rank())
        model, summary = run_training(model, checkpoint.arch, windows, options, hook, "e2llm",
                                      tag={"method": "e2llm", "input": checkpoint.path, "g_max": g_max},
                                      rebuild=lambda: load_unscaled_model(checkpoint, original))
    summary.update(g_max=g_max, sampled_scales=scale_histogram(hook.history))
    return _write(model, plan, target, options, force, summary)


def inference_lengths(lengths: Lengths) -> Lengths:
    """The stock linear scaling written for inference: g = ceil(L/L0), readable up to g·L0."""
    scale = lengths.whole_factor
    return Lengths(lengths.original, max(lengths.target, scale * lengths.original), float(scale))


def _write(model, plan, target: str, options: ExtendOptions, force: bool, summary: dict) -> str:
    checkpoint, original = plan.checkpoint, plan.original
    written = inference_lengths(plan.lengths)
    config = extended_config(checkpoint.config, "linear", original, rotary_dim(checkpoint.arch), written, options)
    config.pop("auto_map", None)
    config.pop("clex", None)
    results = {**extension_record(original, written, "e2llm"), "training": summary}
    write_trained(model, checkpoint, target, config, options, force, results)
    return target
