"""Change a live model's RoPE frequencies in place, step by step, and put them back afterwards.

Stock rotary embeddings (Llama, Mistral, Qwen2/3, Gemma) keep `inv_freq` as a buffer and
`attention_scaling` as a float, and compute cos/sin from them on every forward. Rewriting those two
values changes the scaling without rebuilding the model, which is how E²-LLM trains under a
different scale every step.
"""

from __future__ import annotations

import torch


def rotary_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every rotary embedding of a model (found by what it holds, not by its name)."""
    found = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)
             and hasattr(m, "attention_scaling")]
    if not found:
        raise ValueError(f"{type(model).__name__} has no rotary embedding with an inv_freq buffer")
    return found


class RotaryOverride:
    """`with RotaryOverride(model) as rotary: rotary.set(inv_freq)` — restored on exit."""

    def __init__(self, model: torch.nn.Module):
        self.modules = rotary_modules(model)
        self._saved = [(m.inv_freq.detach().clone(), m.attention_scaling) for m in self.modules]

    @property
    def base_inv_freq(self) -> torch.Tensor:
        return self._saved[0][0].clone()

    def set(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> None:
        for module in self.modules:
            module.inv_freq.copy_(inv_freq.to(module.inv_freq))
            module.attention_scaling = attention_scaling

    def scale_linearly(self, factor: float) -> None:
        """Position interpolation by `factor` (every frequency divided by it)."""
        self.set(self.base_inv_freq / factor)

    def restore(self) -> None:
        for module, (inv_freq, scaling) in zip(self.modules, self._saved, strict=True):
            module.inv_freq.copy_(inv_freq)
            module.attention_scaling = scaling

    def __enter__(self) -> RotaryOverride:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
