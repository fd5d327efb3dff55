"""Training CLEX on the shared loop and writing a checkpoint that ships its modeling code.

Per optimizer step (the `before_step` hook): t is drawn uniformly from {1, …, t_max}; the rotary
embedding integrates the ODE to t; the batch keeps its L0 tokens. Two choices decide whether the
short run helps at 4·L0 and 8·L0 (measured on the bench testbed, bench/results/extend.md):

- The ODE trains at its own, lower learning rate (`clex_ode_lr_scale`, default 0.001 × lr). At the
  model's lr (the paper's code uses one lr for everything, over far more steps) a few hundred Adam
  steps move the tiny ODE far from its NTK start (log-frequency deviations of ±1–3 at t = 8): a loss
  measured at L0 tokens rewards whatever re-creates the angles of pre-training there, and the
  frequencies that do that fail on real long inputs. Every position scheme below, trained with the
  ODE at full lr, ended worse at 8·L0 than untrained.
- Positions (`clex_positions`):
  - "consecutive" (default): 0 … L0−1, what the issue specifies: the model learns to read the
    ODE-scaled frequencies for every t exactly as inference presents them (neighbours one apart).
  - "runs": the tokens in runs of `clex_run_length` consecutive positions placed in order at random
    in [0, t·L0) (first at 0), to show distances up to t·L0.
  - "sampled": the paper's reference code, L0 sorted random positions in [0, t·L0) (0 and t·L0−1
    always included); neighbours are then ~t apart, which inference never shows.
  With `clex_long_text` the rows are t_max·L0 tokens of text and the L0 tokens fed are those at the
  positions (from a random start), so a gap in positions is a gap in the text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Literal

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
    mode: Literal["runs", "sampled", "consecutive"] = "runs"
    run_length: int = 32
    history: list[tuple[int, int]] = field(default_factory=list)  # (step, t)
    _step: int = -1
    _micro: int = 0

    def _generator(self, step: int, *extra: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.seed, step, self._micro, *extra)) & 0x7FFF_FFFF_FFFF_FFFF)

    def positions(self, t: int, rows: int, length: int, generator: torch.Generator) -> torch.Tensor:
        if t == 1 or self.mode == "consecutive":
            return torch.arange(length).expand(rows, length).clone()
        span = t * self.original_length
        if self.mode == "sampled":
            return torch.stack([self._sampled(span, length, generator) for _ in range(rows)])
        return torch.stack([self._runs(span, length, generator) for _ in range(rows)])

    @staticmethod
    def _sampled(span: int, length: int, generator: torch.Generator) -> torch.Tensor:
        inner = torch.randperm(span - 2, generator=generator)[: length - 2].sort().values + 1
        return torch.cat([torch.tensor([0]), inner, torch.tensor([span - 1])])

    def _runs(self, span: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """Runs of `run_length` consecutive positions (the last run takes the remainder); run j starts
        at its place in 0 … L0−1 plus the j-th of sorted random shifts in [0, span − length]."""
        starts = torch.arange(0, length, self.run_length)
        shifts = torch.randint(0, span - length + 1, (starts.numel() - 1,), generator=generator).sort().values
        shift_of_run = torch.cat([torch.zeros(1, dtype=torch.long), shifts])
        run_index = torch.arange(length) // self.run_length
        return torch.arange(length) + shift_of_run[run_index]

    def __call__(self, step: int, model, batch: dict) -> dict:
        self._micro = self._micro + 1 if step == self._step else 0
        self._step = step
        t = int(torch.randint(1, self.t_max + 1, (1,), generator=self._generator(step)))
        input_ids = batch["input_ids"]
        rows, width = input_ids.shape
        length = min(width, self.original_length)
        generator = self._generator(step, self.rank + 1)
        positions = self.positions(t, rows, length, generator)
        for rotary in self.rotaries:
            rotary.time_override = t
        self.history.append((step, t))
        # An explicit mask: without one, transformers reads non-consecutive positions as packed sequences.
        out = {**batch, "position_ids": positions, "attention_mask": torch.ones(rows, length, dtype=torch.long)}
        if width > length:
            out.update(self._tokens_at(input_ids, positions, t * self.original_length, generator))
        return out

    @staticmethod
    def _tokens_at(long_rows: torch.Tensor, positions: torch.Tensor, span: int, generator) -> dict:
        """Rows longer than L0: each row's tokens at `positions` of a random span of it, so a gap in
        positions is a gap in the text; the token after a gap is not the next token, so it is no label."""
        starts = torch.randint(0, long_rows.shape[1] - span + 1, (long_rows.shape[0], 1), generator=generator)
        input_ids = long_rows.gather(1, starts + positions)
        labels = input_ids.clone()
        labels[:, 1:][positions[:, 1:] - positions[:, :-1] != 1] = -100
        return {"input_ids": input_ids, "labels": labels}


def build_clex_model(checkpoint, original: OriginalRope, settings: dict, seed: int = 0):
    """The input model (float32, unscaled) with CLEX rotary embeddings; untrained = NTK by 2t−1."""
    model = load_unscaled_model(checkpoint, original)
    with torch.random.fork_rng(devices=[]):
        # The ODE's first layer is drawn at random: from `seed`, not from whatever ran before in this process.
        torch.manual_seed(seed)
        rotaries = modeling_clex.install_clex_rotary(model, SimpleNamespace(clex=settings))
    return model, rotaries


def ode_lr_scales(model, rotaries: list, scale: float) -> dict[str, float]:
    """The ODE's own learning rate, by the module names of its parameters (kept inside a LoRA wrapper's names)."""
    names = {name for name, module in model.named_modules() if any(module is r.dynamics for r in rotaries)}
    return {f"{name}.": scale for name in sorted(names)}


def train_clex(plan, target: str, options: ExtendOptions, force: bool) -> str:
    from lctool.io.hf import load_tokenizer

    checkpoint, original, lengths = plan.checkpoint, plan.original, plan.lengths
    t_max = options.t_max or lengths.whole_factor
    settings = clex_settings(original, rotary_dim(checkpoint.arch), lengths, options, t_max)
    model, rotaries = build_clex_model(checkpoint, original, settings, options.training.seed)
    training = options.training
    row_length = t_max * lengths.original if options.clex_long_text else lengths.original
    windows = training_windows(load_tokenizer(checkpoint.path), training.corpus, row_length,
                               training.steps * training.batch_size * training.grad_accum)
    hook = ClexAugmentation(rotaries, lengths.original, t_max, seed=training.seed, rank=process_rank(),
                            mode=options.clex_positions, run_length=options.clex_run_length)
    try:
        model, summary = run_training(model, checkpoint.arch, windows, options, hook, "clex",
                                      tag={"method": "clex", "input": checkpoint.path, "t_max": t_max,
                                           "ode_lr_scale": options.clex_ode_lr_scale},
                                      rebuild=lambda: build_clex_model(checkpoint, original, settings, training.seed)[0],
                                      also_train=[rotary.dynamics for rotary in rotaries],
                                      lr_scales=ode_lr_scales(model, rotaries, options.clex_ode_lr_scale))
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
