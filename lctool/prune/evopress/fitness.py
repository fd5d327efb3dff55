"""Fitness of a configuration: KL(dense ‖ compressed) on calibration windows, as `lctool eval --reference`
computes it (`lctool.eval.kl_of_stream`: the same scored positions, float32 logits, nats per token).

The model is held in memory once. The dense model's final hidden states on every calibration window
are computed first and kept (hidden_size floats per token, not vocab-sized logits); the reference's
logits come from them through the model's own output head, which no space ever changes. A
configuration is applied in place before it is scored: blocks swap weightless stand-ins for dropped
sub-blocks (`modeling_dropped`), weight spaces copy each changed unit's level from the database.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from lctool.arch import ModelArch
from lctool.errors import check
from lctool.eval.runners import InMemoryRunner
from lctool.eval.scoring import kl_of_stream
from lctool.eval.tokens import TokenStream
from lctool.eval.windows import plan_windows
from lctool.prune.evopress import modeling_dropped
from lctool.prune.evopress.space import Config, SearchSpace


class _CachedReference(InMemoryRunner):
    """A runner (see lctool.eval.runners) replaying the dense model's stored final hidden states."""

    def __init__(self, hidden: torch.Tensor, window_len: int, runner: InMemoryRunner):  # noqa: D107 - no super(): no model
        self.hidden = hidden  # [windows, T, hidden]
        self.window_len = window_len
        self.runner = runner
        self.vocab_size = runner.vocab_size

    def hidden_batches(self, batches, tracker):
        for batch in batches:
            yield self.hidden[batch.starts // self.window_len]

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        return self.runner.logits(rows)


def _stream(windows: torch.Tensor) -> TokenStream:
    ids = windows.reshape(-1)
    return TokenStream(ids, torch.ones_like(ids), exact_bytes=False)  # KL needs no byte counts


class KlFitness:
    """Callable (configuration, window indices) -> KL to the dense model, after applying the configuration."""

    def __init__(self, model: torch.nn.Module, windows: torch.Tensor, apply, batch_size: int = 8):
        self.runner = InMemoryRunner(model)
        check(self.runner.split, "EvoPress needs a model whose output head can be applied on its own")
        self.windows = windows
        self.window_len = windows.shape[1]
        self.apply = apply
        self.batch_size = batch_size
        self.reference = self._dense_hidden()

    def _dense_hidden(self) -> torch.Tensor:
        from lctool.eval.progress import SILENT

        plan = plan_windows(self.windows.numel(), self.window_len)
        batches = list(plan.batches(self.windows.reshape(-1), self.batch_size))
        return torch.cat([h.detach().clone() for h in self.runner.hidden_batches(batches, SILENT)])

    def kl(self, window_indices: list[int]) -> float:
        chosen = torch.tensor(window_indices, dtype=torch.long)
        reference = _CachedReference(self.reference[chosen], self.window_len, self.runner)
        result = kl_of_stream(self.runner, reference, _stream(self.windows[chosen]), self.window_len,
                              batch_size=self.batch_size)
        return result["kl"]

    def __call__(self, config: Config, window_indices: list[int]) -> float:
        self.apply(config)
        return self.kl(window_indices)


# ---- applying a configuration to the in-memory model --------------------------------------------


def block_units(arch: ModelArch, unit: str) -> list[tuple[str, int]]:
    """The sub-blocks a block unit stands for: attn.3 -> [(attn, 3)], layer.3 -> [(attn, 3), (mlp, 3)]."""
    kind, index = unit.split(".")
    kinds = ("attn", "mlp") if kind == "layer" else (kind,)
    return [(k, int(index)) for k in kinds]


class BlockApplier:
    """Drops and restores sub-blocks of an in-memory model (level 1 = dropped)."""

    def __init__(self, model: torch.nn.Module, arch: ModelArch, space: SearchSpace):
        self.layers = model.get_submodule(arch.family.layers)
        self.arch, self.space = arch, space
        self.sublayers = {kind: arch.sublayer_path(kind) for kind in ("attn", "mlp")}
        self.norms = {kind: arch.sublayer_norm_path(kind) for kind in ("attn", "mlp")}
        self.originals: dict[tuple[str, int], tuple] = {}

    def apply(self, config: Config) -> None:
        for unit, level in zip(self.space.units, config, strict=True):
            for kind, index in block_units(self.arch, unit):
                dropped = (kind, index) in self.originals
                if level and not dropped:
                    self.originals[(kind, index)] = modeling_dropped.drop_sublayer(
                        self.layers[index], kind, index, self.sublayers, self.norms)
                elif not level and dropped:
                    modeling_dropped.restore_sublayer(self.layers[index], kind, self.originals.pop((kind, index)),
                                                      self.sublayers, self.norms)


class WeightApplier:
    """Puts each unit's weight at its configured level (from the database) into the in-memory model."""

    def __init__(self, model: torch.nn.Module, database, space: SearchSpace):
        self.model, self.database, self.space = model, database, space
        self.current: dict[str, Fraction] = {}

    def apply(self, config: Config) -> None:
        for unit, index in zip(self.space.units, config, strict=True):
            level = self.space.levels[index]
            if self.current.get(unit) == level:
                continue
            linear = self.model.get_submodule(unit)
            with torch.no_grad():
                linear.weight.copy_(self.database.weight(unit, level).to(linear.weight.device, linear.weight.dtype))
            self.current[unit] = level
