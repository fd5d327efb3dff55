"""CLEX (Continuous Length EXtrapolation, Chen et al., ICLR 2024) for stock transformers causal LMs.

Written into a checkpoint folder by `lctool extend --method clex` and loaded with
`AutoModelForCausalLM.from_pretrained(folder)` with `trust_remote_code` enabled by the user. It depends only on torch and
transformers: each class subclasses the stock model of its family and replaces its rotary embedding,
nothing else.

The RoPE frequencies at length scale t are the solution of a learned ODE in the log-frequency domain:

    log θ(t) = log θ_ntk(t) + y(t),   y(1) = 0,
    dy/dt    = W_out · silu(W_in · [log θ_ntk(t) + y(t); log t] + b_in)

θ_ntk(t) is NTK-aware scaling with factor 2t−1, so d/dt log θ(t) = d/dt log θ_ntk(t) + MLP(log θ(t), t):
the same dynamics as the paper (a learned term plus NTK's own derivative), written as a deviation
from NTK so that a zero W_out gives NTK scaling exactly. The ODE is integrated with fixed-step RK4.
At inference t = max(1, ceil(L / L0)) for the longest position L of a call starting at position 0
(or `fixed_t`); calls that continue a cached sequence keep the t their prefill used, so cached keys
and new queries share one set of frequencies.

config.json carries {"clex": {"original_length", "rope_theta", "dim", "hidden_factor", "step_size",
"t_max", "fixed_t"}}; the ODE weights are ordinary tensors of the checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

CLEX_MODEL_TYPE_PREFIX = "clex_"


def base_log_frequencies(theta: float, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    return (-exponents * math.log(theta)).float()


def ntk_log_frequencies(base_log_freq: torch.Tensor, t: float, dim: int) -> torch.Tensor:
    """log θ_ntk(t): NTK-aware scaling by α = 2t − 1 multiplies θ_i by α^(−2i/(dim−2))."""
    alpha = max(2.0 * t - 1.0, 1.0)
    index = torch.arange(base_log_freq.numel(), dtype=torch.float32, device=base_log_freq.device)
    return base_log_freq - (2 * index / (dim - 2)) * math.log(alpha)


class ClexDynamics(nn.Module):
    """The learned part of d/dt log θ: a one-hidden-layer MLP whose output layer starts at zero."""

    def __init__(self, dim: int, hidden_factor: int):
        super().__init__()
        half = dim // 2
        self.dim = dim
        self.inp = nn.Linear(half + 1, hidden_factor * dim)
        self.out = nn.Linear(hidden_factor * dim, half, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.inp.weight, a=math.sqrt(5))
        nn.init.zeros_(self.inp.bias)
        nn.init.zeros_(self.out.weight)

    def forward(self, t: float, deviation: torch.Tensor, base_log_freq: torch.Tensor) -> torch.Tensor:
        log_freq = ntk_log_frequencies(base_log_freq, t, self.dim) + deviation
        features = torch.cat([log_freq, log_freq.new_tensor([math.log(t)])])
        return self.out(nn.functional.silu(self.inp(features)))


def rk4_deviation(dynamics: ClexDynamics, base_log_freq: torch.Tensor, t_end: float, step_size: float) -> torch.Tensor:
    """y(t_end) from y(1) = 0 by classic fixed-step Runge–Kutta (equal steps of at most step_size)."""
    deviation = torch.zeros_like(base_log_freq)
    if t_end <= 1.0:
        return deviation
    steps = max(1, math.ceil((t_end - 1.0) / step_size - 1e-9))
    h = (t_end - 1.0) / steps
    t = 1.0
    for _ in range(steps):
        k1 = dynamics(t, deviation, base_log_freq)
        k2 = dynamics(t + h / 2, deviation + h / 2 * k1, base_log_freq)
        k3 = dynamics(t + h / 2, deviation + h / 2 * k2, base_log_freq)
        k4 = dynamics(t + h, deviation + h * k3, base_log_freq)
        deviation = deviation + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        t += h
    return deviation


class ClexRotaryEmbedding(nn.Module):
    """Drop-in for a stock rotary embedding: forward(x, position_ids) -> (cos, sin)."""

    def __init__(self, config):
        super().__init__()
        settings = dict(config.clex)
        self.dim = int(settings["dim"])
        self.original_length = int(settings["original_length"])
        self.step_size = float(settings.get("step_size", 0.1))
        self.fixed_t = settings.get("fixed_t")
        self.attention_scaling = 1.0
        self.time_override: float | None = None  # set by a trainer to the sampled t
        # Not a buffer: transformers leaves a custom module's non-persistent buffers uninitialised on load.
        self.rope_theta = float(settings["rope_theta"])
        self.dynamics = ClexDynamics(self.dim, int(settings.get("hidden_factor", 4)))
        self._cache: dict[float, torch.Tensor] = {}
        self._last_t: float | None = None

    def time_for(self, position_ids: torch.Tensor) -> float:
        if self.time_override is not None:
            return float(self.time_override)
        if self.fixed_t is not None:
            return float(self.fixed_t)
        if int(position_ids.min()) > 0 and self._last_t is not None:
            # Decoding with a KV cache: the cached keys were rotated at the prefill's t; keep it.
            return self._last_t
        length = int(position_ids.max()) + 1
        self._last_t = float(max(1, math.ceil(length / self.original_length)))
        return self._last_t

    def inv_freq(self, t: float) -> torch.Tensor:
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.dynamics.parameters()):
            self._cache.clear()
            return self._solve(t)
        if t not in self._cache:
            self._cache[t] = self._solve(t).detach()
        return self._cache[t]

    def _solve(self, t: float) -> torch.Tensor:
        base = base_log_frequencies(self.rope_theta, self.dim).to(self.dynamics.out.weight.device)
        deviation = rk4_deviation(self.dynamics, base, t, self.step_size)
        if t <= 1.0 and torch.is_grad_enabled():
            # Keep the ODE in the graph at t = 1 so data-parallel training sees every parameter used.
            deviation = deviation + 0.0 * sum(p.sum() for p in self.dynamics.parameters())
        return torch.exp(ntk_log_frequencies(base, t, self.dim) + deviation)

    def train(self, mode: bool = True):
        self._cache.clear()
        return super().train(mode)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        inv_freq = self.inv_freq(self.time_for(position_ids)).to(x.device)
        freqs = position_ids[..., None].float() * inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def install_clex_rotary(model: nn.Module, config) -> list[ClexRotaryEmbedding]:
    """Replace every stock rotary embedding of `model` by a CLEX one (found by class name)."""
    installed = []
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding") and not isinstance(module, ClexRotaryEmbedding):
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            rotary = ClexRotaryEmbedding(config)
            setattr(parent, attribute, rotary)
            installed.append(rotary)
    if not installed:
        raise ValueError(f"{type(model).__name__} has no rotary embedding to replace")
    return installed


class ClexLlamaConfig(LlamaConfig):
    model_type = "clex_llama"


class ClexMistralConfig(MistralConfig):
    model_type = "clex_mistral"


class ClexQwen2Config(Qwen2Config):
    model_type = "clex_qwen2"


class ClexQwen3Config(Qwen3Config):
    model_type = "clex_qwen3"


class ClexGemmaConfig(GemmaConfig):
    model_type = "clex_gemma"


class ClexLlamaForCausalLM(LlamaForCausalLM):
    config_class = ClexLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        install_clex_rotary(self, config)


class ClexMistralForCausalLM(MistralForCausalLM):
    config_class = ClexMistralConfig

    def __init__(self, config):
        super().__init__(config)
        install_clex_rotary(self, config)


class ClexQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = ClexQwen2Config

    def __init__(self, config):
        super().__init__(config)
        install_clex_rotary(self, config)


class ClexQwen3ForCausalLM(Qwen3ForCausalLM):
    config_class = ClexQwen3Config

    def __init__(self, config):
        super().__init__(config)
        install_clex_rotary(self, config)


class ClexGemmaForCausalLM(GemmaForCausalLM):
    config_class = ClexGemmaConfig

    def __init__(self, config):
        super().__init__(config)
        install_clex_rotary(self, config)


# stock model_type -> (config class, model class) names, for the auto_map lctool writes.
CLASSES = {
    "llama": ("ClexLlamaConfig", "ClexLlamaForCausalLM"),
    "mistral": ("ClexMistralConfig", "ClexMistralForCausalLM"),
    "qwen2": ("ClexQwen2Config", "ClexQwen2ForCausalLM"),
    "qwen3": ("ClexQwen3Config", "ClexQwen3ForCausalLM"),
    "gemma": ("ClexGemmaConfig", "ClexGemmaForCausalLM"),
}
