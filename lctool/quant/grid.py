"""Uniform min-max grids: the round-to-nearest arithmetic every method here shares.

A grid is (scale, zero) per row of a group: code = clamp(round(w / scale + zero), 0, 2^bits - 1) and
w_hat = scale * (code - zero). `zero` is integer-valued for RTN/GPTQ and real-valued for SpQR, whose
zero points are themselves quantized.
"""

from __future__ import annotations

import torch


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def minmax_grid(w: torch.Tensor, bits: int, sym: bool, round_zero: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), each [rows, 1], of the min-max grid of each row of `w` [rows, cols].

    The range always contains 0 (as GPTQ's quantizer does), so a zero weight stays exactly zero.
    """
    maxq = max_code(bits)
    w_min = w.min(dim=1, keepdim=True).values.clamp(max=0)
    w_max = w.max(dim=1, keepdim=True).values.clamp(min=0)
    if sym:
        w_max = torch.maximum(w_min.abs(), w_max)
        w_min = -w_max
    empty = (w_min == 0) & (w_max == 0)
    w_min = torch.where(empty, -torch.ones_like(w_min), w_min)
    w_max = torch.where(empty, torch.ones_like(w_max), w_max)
    scale = (w_max - w_min) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = -w_min / scale
        if round_zero:
            zero = zero.round()
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float) of `w` on the grid (scale, zero), broadcast over columns."""
    return torch.clamp(torch.round(w / scale + zero), 0, max_code(bits))


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)


