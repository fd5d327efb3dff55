"""Training CLEX on the shared loop and writing a checkpoint that ships its modeling code.

Per optimizer step (the `before_step` hook): t is drawn uniformly from {1, …, t_max}; the rotary
embedding integrates the ODE to t; the batch keeps its L0 tokens and, as in the paper's reference
code, reads them at sorted random positions spanning [0, t·L0) (0 and t·L0−1 always included), so the
model sees the rotation angles of length t·L0 while training at L0. With `clex_sample_positions`
off the positions stay 0 … L0−1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from lctool.ops.clex import modeling_clex
from lctool.ops.extend.finetune import (
    load_unscaled_model,
    process_rank,
    run_training,
    training_windows,
    unscaled_config,
    write_trained,
)
from lctool.ops.extend.options import ExtendOptions
from lctool.ops.extend.scaling import Lengths, OriginalRope, rotary_dim
from lctool.ops.extend.training_free import extension_record


def clex_settings(original: OriginalRope, dim: int, lengths: Lengths, options: ExtendOptions, t_max: int) -> dict:
    return {
        "original_length": lengths.original,
        "rope_theta": original.rope.theta,
        "dim": dim,
        "hidden_factor": options.clex_hidden_factor,
        "step_size": options.clex_step_size,
        "t_max": t_max,
        "fixed_t": None,
    }


def clex_config(config: dict, original: OriginalRope, lengths: Lengths, settings: dict) -> dict:
    """Unscaled stock RoPE (the ODE is the scaling), the CLEX model type and its auto_map."""
    out = unscaled_config(config, original)
    stock_type = out["model_type"]
    config_class, model_class = modeling_clex.CLASSES[stock_type]
    out["model_type"] = modeling_clex.CLEX_MODEL_TYPE_PREFIX + stock_type
    out["architectures"] = [model_class]
    out["auto_map"] = {"AutoConfig": f"modeling_clex.{config_class}",
                       "AutoModelForCausalLM": f"modeling_clex.{model_class}"}
    out["clex"] = settings
    out["max_position_embeddings"] = lengths.target
    return out


@dataclass
class ClexAugmentation:
    """The `before_step` hook: sample t, point the rotary embeddings at it, spread the positions."""

    rotaries: list
    original_length: int
    t_max: int
    seed: int = 0
    rank: int = 0
    sample_positions: bool = True
    history: list[tuple[int, int]] = field(default_factory=list)  # (step, t)
    _step: int = -1
    _micro: int = 0

    def _generator(self, step: int, *extra: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.seed, step, self._micro, *extra)) & 0x7FFF_FFFF_FFFF_FFFF)

    def positions(self, t: int, rows: int, length: int, generator: torch.Generator) -> torch.Tensor:
        if t == 1 or not self.sample_positions:
            return torch.arange(length).expand(rows, length).clone()
        span = t * self.original_length
        chosen = []
        for _ in range(rows):
            inner = torch.randperm(span - 2, generator=generator)[: length - 2].sort().values + 1
            chosen.append(torch.cat([torch.tensor([0]), inner, torch.tensor([span - 1])]))
        return torch.stack(chosen)

    def __call__(self, step: int, model, batch: dict) -> dict:
        self._micro = self._micro + 1 if step == self._step else 0
        self._step = step
        t = int(torch.randint(1, self.t_max + 1, (1,), generator=self._generator(step)))
        input_ids = batch["input_ids"]
        positions = self.positions(t, input_ids.shape[0], input_ids.shape[1], self._generator(step, self.rank + 1))
        for rotary in self.rotaries:
            rotary.time_override = t
        self.history.append((step, t))
        # An explicit mask: without one, transformers reads non-consecutive positions as packed sequences.
        return {**batch, "position_ids": positions, "attention_mask": torch.ones_like(input_ids)}


def build_clex_model(checkpoint, original: OriginalRope, settings: dict):
    """The input model (float32, unscaled) with CLEX rotary embeddings; untrained = NTK by 2t−1."""
    model = load_unscaled_model(checkpoint, original)
    rotaries = modeling_clex.install_clex_rotary(model, SimpleNamespace(clex=settings))
    return model, rotaries


def train_clex(plan, target: str, options: ExtendOptions, force: bool) -> str:
    from lctool.io.hf import load_tokenizer

    checkpoint, original, lengths = plan.checkpoint, plan.original, plan.lengths
    t_max = options.t_max or lengths.whole_factor
    settings = clex_settings(original, rotary_dim(checkpoint.arch), lengths, options, t_max)
    model, rotaries = build_clex_model(checkpoint, original, settings)
    training = options.training
    windows = training_windows(load_tokenizer(checkpoint.path), training.corpus, lengths.original,
                               training.steps * training.batch_size * training.grad_accum)
    hook = ClexAugmentation(rotaries, lengths.original, t_max, seed=training.seed, rank=process_rank(),
                            sample_positions=options.clex_sample_positions)
    try:
        model, summary = run_training(model, checkpoint.arch, windows, options, hook, "clex",
                                      tag={"method": "clex", "input": checkpoint.path, "t_max": t_max},
                                      also_train=[rotary.dynamics for rotary in rotaries])
    finally:
        for rotary in rotaries:
            rotary.time_override = None
    times: dict[int, int] = {}
    for _, t in hook.history:
        times[t] = times.get(t, 0) + 1
    summary.update(t_max=t_max, sampled_times=dict(sorted(times.items())),
                   ode_parameters=sum(p.numel() for r in rotaries for p in r.dynamics.parameters()))
    config = clex_config(checkpoint.config, original, lengths, settings)
    results = {**extension_record(original, lengths, "clex"), "training": summary}
    write_trained(model, checkpoint, target, config, options, force, results,
                  extra_files={"modeling_clex.py": os.path.abspath(modeling_clex.__file__)})
    return target
