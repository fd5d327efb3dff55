"""GPTQ (Frantar et al., 2022): quantize one weight matrix column by column, pushing each column's
rounding error onto the columns not yet quantized through the inverse Hessian of the layer's inputs.

Pure math on tensors: no model, no file. `hessian` is 2/n Σ x xᵀ over the calibration inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lctool.errors import LctoolError
from lctool.quant.grid import dequantize_codes, minmax_grid, quantize_codes

DEFAULT_BLOCK = 128


@dataclass
class GroupedResult:
    """A weight quantized with one grid per group of input columns (RTN or GPTQ)."""

    codes: torch.Tensor  # int32 [O, I], in the original column order
    scales: torch.Tensor  # float [O, groups]
    zeros: torch.Tensor  # float (integer-valued) [O, groups]
    g_idx: torch.Tensor  # int32 [I]: the group of each original column
    w_hat: torch.Tensor  # float [O, I]: exactly scales[g_idx] * (codes - zeros[g_idx])


def prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor, damp: float):
    """(damped H, weight with dead inputs zeroed): inputs never seen get H_ii = 1 and a zero weight."""
    h = hessian.double().clone()
    w = weight.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    diagonal = torch.arange(h.shape[0])
    h[diagonal, diagonal] += damp * torch.diag(h).mean()
    return h, w


def inverse_cholesky_upper(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ (the quantities GPTQ's updates need), with a clear error if H is not PD."""
    try:
        lower = torch.linalg.cholesky(h)
        return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    except torch.linalg.LinAlgError:
        raise LctoolError(
            f"the calibration Hessian is not positive definite even with --damp {damp}; raise --damp or use more calibration data"
        ) from None


def act_order_permutation(hessian: torch.Tensor) -> torch.Tensor:
    """Columns by decreasing H_ii: the most salient inputs are quantized first, while most columns can still absorb error."""
    return torch.argsort(torch.diag(hessian), descending=True, stable=True)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = DEFAULT_BLOCK,
    min_zero: int = 0,
) -> GroupedResult:
    """GPTQ with groups of `group_size` columns (in quantization order) and lazy block updates.

    `min_zero` raises asymmetric zero points to at least that value (GPTQ v1 storage cannot hold 0).
    """
    out_features, in_features = weight.shape
    group_size = group_size if group_size > 0 else in_features
    h, w = prepare_hessian(hessian, weight, damp)
    perm = act_order_permutation(h) if act_order else torch.arange(in_features)
    w, h = w[:, perm], h[perm][:, perm]
    # Factor in float64 (stability), iterate in float32 (speed).
    h_inv = inverse_cholesky_upper(h, damp).float()
    w = w.float()
    del h

    codes = torch.zeros(out_features, in_features)
    groups = in_features // group_size
    scales = torch.zeros(out_features, groups)
    zeros = torch.zeros(out_features, groups)
    # Blocks hold whole groups so each group's grid is fitted on up-to-date weights.
    block = max(block_size // group_size, 1) * group_size if group_size <= block_size else block_size

    for start in range(0, in_features, block):
        end = min(start + block, in_features)
        w_block = w[:, start:end].clone()
        errors = torch.zeros_like(w_block)
        h_inv_block = h_inv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % group_size == 0:
                group = column // group_size
                ahead = torch.cat([w_block[:, i:], w[:, end : column + group_size]], dim=1)[:, :group_size]
                scale, zero = minmax_grid(ahead, bits, sym)
                scale, zero = scale.half().float(), zero.clamp(min=min_zero)  # scales are stored in fp16
                scales[:, group], zeros[:, group] = scale[:, 0], zero[:, 0]
            scale, zero = scales[:, group : group + 1], zeros[:, group : group + 1]
            current = w_block[:, i : i + 1]
            q = quantize_codes(current, scale, zero, bits)
            codes[:, column] = q[:, 0]
            error = (current - dequantize_codes(q, scale, zero)) / h_inv_block[i, i]
            w_block[:, i:] -= error * h_inv_block[i : i + 1, i:]
            errors[:, i] = error[:, 0]
        w[:, end:] -= errors @ h_inv[start:end, end:]

    inverse = torch.argsort(perm)
    g_idx = (torch.arange(in_features) // group_size)[inverse].to(torch.int32)
    codes = codes[:, inverse]
    w_hat = dequantize_codes(codes, scales[:, g_idx.long()], zeros[:, g_idx.long()])
    return GroupedResult(codes.to(torch.int32), scales.float(), zeros.float(), g_idx, w_hat.float())


def rtn_quantize(weight: torch.Tensor, *, bits: int, group_size: int, sym: bool, min_zero: int = 0) -> GroupedResult:
    """Round-to-nearest on the same grouped grid (the baseline GPTQ must beat)."""
    out_features, in_features = weight.shape
    group_size = group_size if group_size > 0 else in_features
    w = weight.double().reshape(out_features, in_features // group_size, group_size)
    flat = w.reshape(-1, group_size)
    scale, zero = minmax_grid(flat, bits, sym)
    scale, zero = scale.half().float(), zero.clamp(min=min_zero)
    codes = quantize_codes(flat, scale, zero, bits)
    w_hat = dequantize_codes(codes, scale, zero).reshape(out_features, in_features)
    g_idx = (torch.arange(in_features) // group_size).to(torch.int32)
    return GroupedResult(
        codes.reshape(out_features, in_features).to(torch.int32),
        scale.reshape(out_features, -1).float(),
        zero.reshape(out_features, -1).float(),
        g_idx,
        w_hat.float(),
    )


def hessian_error(weight: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """Relative output error ‖(W−Ŵ)X‖² / ‖WX‖² from H (plain relative weight error without H)."""
    delta = (weight.double() - w_hat.double())
    if hessian is None:
        return float((delta.square().sum() / weight.double().square().sum().clamp_min(1e-30)).item())
    h = hessian.double()
    num = torch.einsum("oi,ij,oj->", delta, h, delta)
    den = torch.einsum("oi,ij,oj->", weight.double(), h, weight.double())
    return float((num / den.clamp_min(1e-30)).item())
