"""RoPE inverse frequencies of every scaling method, written from the papers in plain PyTorch.

This is lctool's own statement of each method, independent of transformers: tests check that the
configs lctool writes make stock transformers compute exactly these frequencies, and the training
methods (E²-LLM, CLEX) use it to set the rotary embedding of a live model.

Every function returns `(inv_freq [dim/2] float32, attention_scaling)`; `dim` is the rotary
dimension (head_dim × partial_rotary_factor), `original_length` (L0) the length the model was
trained at.
"""

from __future__ import annotations

import math

import torch


def base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """Plain RoPE: θ_i = theta^(-2i/dim), i = 0 … dim/2 − 1."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (theta**exponents)


def linear_inv_freq(theta: float, dim: int, factor: float) -> tuple[torch.Tensor, float]:
    """Position interpolation: every frequency divided by the factor (positions squeezed by it)."""
    return base_inv_freq(theta, dim) / factor, 1.0


def ntk_theta(theta: float, dim: int, factor: float) -> float:
    """NTK-aware static scaling: the base grows so the lowest frequency is interpolated by `factor`
    while the highest is untouched: theta' = theta · factor^(dim/(dim−2))."""
    return theta * factor ** (dim / (dim - 2))


def ntk_inv_freq(theta: float, dim: int, factor: float) -> tuple[torch.Tensor, float]:
    return base_inv_freq(ntk_theta(theta, dim, factor), dim), 1.0


def dynamic_inv_freq(theta: float, dim: int, factor: float, original_length: int, seq_len: int) -> tuple[torch.Tensor, float]:
    """Dynamic NTK (as transformers defines it): at length L > L0 the NTK factor is F·L/L0 − (F−1)."""
    seq_len = max(seq_len, original_length)
    effective = factor * seq_len / original_length - (factor - 1)
    return ntk_inv_freq(theta, dim, effective)


def _correction_dim(rotations: float, dim: int, theta: float, original_length: int) -> float:
    """The (fractional) frequency index whose wavelength fits `rotations` times into L0."""
    return dim * math.log(original_length / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_ramp(theta: float, dim: int, original_length: int, beta_fast: float, beta_slow: float) -> torch.Tensor:
    """Per-index share of the interpolated frequency (0 = keep original, 1 = divide by the factor).

    YaRN's "NTK-by-parts": frequencies turning more than beta_fast times within L0 are kept, those
    turning fewer than beta_slow times are fully interpolated, a linear ramp over the index between.
    The index bounds are floored/ceiled, as the reference implementation does.
    """
    low = max(math.floor(_correction_dim(beta_fast, dim, theta, original_length)), 0)
    high = min(math.ceil(_correction_dim(beta_slow, dim, theta, original_length)), dim - 1)
    if low == high:
        high += 0.001
    index = torch.arange(dim // 2, dtype=torch.float32)
    return ((index - low) / (high - low)).clamp(0, 1)


def yarn_attention_factor(factor: float) -> float:
    """YaRN's temperature: cos/sin (so q·k) are scaled by 0.1·ln(s) + 1."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def yarn_inv_freq(
    theta: float, dim: int, factor: float, original_length: int, beta_fast: float = 32.0, beta_slow: float = 1.0,
    attention_factor: float | None = None,
) -> tuple[torch.Tensor, float]:
    original = base_inv_freq(theta, dim)
    ramp = yarn_ramp(theta, dim, original_length, beta_fast, beta_slow)
    inv_freq = original / factor * ramp + original * (1 - ramp)
    return inv_freq, yarn_attention_factor(factor) if attention_factor is None else attention_factor


def llama3_inv_freq(
    theta: float, dim: int, factor: float, original_length: int, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0
) -> tuple[torch.Tensor, float]:
    """Llama 3.1: wavelengths shorter than L0/high_freq_factor kept, longer than L0/low_freq_factor
    divided by the factor, a smooth blend between."""
    original = base_inv_freq(theta, dim)
    wavelength = 2 * math.pi / original
    smooth = ((original_length / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)
    inv_freq = (1 - smooth) * original / factor + smooth * original
    return inv_freq, 1.0


def longrope_attention_factor(factor: float, original_length: int) -> float:
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original_length))


def longrope_inv_freq(
    theta: float, dim: int, rescale: list[float], factor: float, original_length: int, attention_factor: float | None = None
) -> tuple[torch.Tensor, float]:
    """LongRoPE: each frequency divided by its own rescale factor (short or long list)."""
    inv_freq = base_inv_freq(theta, dim) / torch.tensor(rescale, dtype=torch.float32)
    scale = longrope_attention_factor(factor, original_length) if attention_factor is None else attention_factor
    return inv_freq, scale


def yarn_rescale_factors(theta: float, dim: int, factor: float, original_length: int,
                         beta_fast: float = 32.0, beta_slow: float = 1.0) -> list[float]:
    """Per-frequency divisors equal to YaRN's NTK-by-parts (1 for fast, `factor` for slow ones):
    lctool's starting point for LongRoPE's long factors when no searched factors are given."""
    original = base_inv_freq(theta, dim)
    scaled, _ = yarn_inv_freq(theta, dim, factor, original_length, beta_fast, beta_slow)
    return [round(float(r), 6) for r in (original / scaled)]
