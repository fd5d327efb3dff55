"""SpQR (Dettmers et al., 2023): GPTQ-style error feedback with tiny groups whose statistics are
themselves quantized, plus a sparse set of fp16 outliers for the weights the grid cannot serve.

Layout of the result (columns in quantization order, i.e. after the optional act-order permutation):
  * weights: `bits`-bit codes, one grid (scale s, zero z) per row and group of `beta1` columns;
  * first-order statistics: s and z quantized to `stat_bits` with one min-max grid per `beta2` rows
    of a column group (second-order: four fp16 numbers per beta2 x beta1 tile);
  * outliers: W_hat = dense + O, O sparse (CSR) in fp16.

`dequantize_stats` and `dequantize_dense` are the single definition of the arithmetic: the
quantizer's error feedback and every reader use them, so the weight the feedback assumed is
reproduced bit for bit from the stored tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lctool.quant.gptq import act_order_permutation, inverse_cholesky_upper, prepare_hessian
from lctool.quant.grid import max_code


@dataclass(frozen=True)
class SpqrSettings:
    bits: int = 3
    beta1: int = 16  # weight group: input columns sharing one (scale, zero) per row
    beta2: int = 16  # statistics group: rows sharing one second-order grid
    stat_bits: int = 3
    outlier_threshold: float = 1.0  # relative to the layer's mean sensitivity; inf = no outliers
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128


@dataclass
class SpqrResult:
    codes: torch.Tensor  # int32 [O, I] (quantization order)
    stat_codes: torch.Tensor  # int32 [2, groups, O]: scale codes, zero codes
    second_order: torch.Tensor  # fp16 [groups, ceil(O/beta2), 4]: scale-of-s, zero-of-s, scale-of-z, zero-of-z
    outlier_rows: torch.Tensor  # int64 [nnz]
    outlier_cols: torch.Tensor  # int64 [nnz] (quantization order)
    outlier_values: torch.Tensor  # fp16 [nnz], added to the dense part
    perm: torch.Tensor  # int64 [I]: stored column j is original column perm[j]
    w_hat: torch.Tensor  # float32 [O, I] in the ORIGINAL column order: the weight error feedback assumed

    @property
    def outlier_count(self) -> int:
        return int(self.outlier_values.numel())


def dequantize_stats(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """First-order statistic from its code and fp16 second-order grid, in float32."""
    return scale.float() * (codes.float() - zero.float())


def dequantize_dense(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes.float() - zero)


def quantize_dense(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale + zero), 0, max_code(bits))


def fit_stat_grid(values: torch.Tensor, stat_bits: int, beta2: int):
    """Quantize a per-row statistic [O] with one min-max grid per `beta2` rows.

    Returns (codes [O], fp16 scale [tiles], fp16 zero [tiles], dequantized [O]). The zero is a real
    number stored in fp16, so the grid spans exactly [min, max] and a positive statistic stays positive.
    """
    rows = values.shape[0]
    tiles = -(-rows // beta2)
    padded = torch.cat([values, values[-1:].expand(tiles * beta2 - rows)]).reshape(tiles, beta2)
    low, high = padded.min(dim=1).values, padded.max(dim=1).values
    # The zero (-low / scale) must fit in fp16, which also covers tiles whose values are all equal.
    reach = torch.maximum(low.abs(), high.abs()) / 30000
    scale = torch.maximum((high - low) / max_code(stat_bits), reach).clamp_min(torch.finfo(torch.float16).tiny)
    scale16 = scale.to(torch.float16)
    zero16 = (-low / scale16.float()).to(torch.float16)
    scale_rows = scale16.repeat_interleave(beta2)[:rows]
    zero_rows = zero16.repeat_interleave(beta2)[:rows]
    codes = torch.clamp(torch.round(values / scale_rows.float() + zero_rows.float()), 0, max_code(stat_bits))
    return codes, scale16, zero16, dequantize_stats(codes, scale_rows, zero_rows)


def leave_one_out_error(group: torch.Tensor, inv_diag: torch.Tensor, bits: int) -> torch.Tensor:
    """Squared, sensitivity-scaled error of each weight when its row's grid is fitted without it.

    The min and max excluding one element come from each row's two smallest / largest values.
    """
    cols = group.shape[1]
    if cols < 3:
        return torch.zeros_like(group)
    low2 = group.topk(2, dim=1, largest=False)
    high2 = group.topk(2, dim=1, largest=True)
    index = torch.arange(cols)
    is_min = index[None, :] == low2.indices[:, :1]
    is_max = index[None, :] == high2.indices[:, :1]
    w_min = torch.where(is_min, low2.values[:, 1:2], low2.values[:, :1]).clamp(max=0)
    w_max = torch.where(is_max, high2.values[:, 1:2], high2.values[:, :1]).clamp(min=0)
    scale = ((w_max - w_min) / max_code(bits)).clamp_min(1e-12)
    zero = -w_min / scale
    error = group - dequantize_dense(quantize_dense(group, scale, zero, bits), scale, zero)
    return (error / inv_diag[None, :]).square()


def first_order_stats(group: torch.Tensor, likely_outliers: torch.Tensor, bits: int):
    """Per-row min-max (scale, zero) of a group, fitted as if its likely outliers were the row mean."""
    keep = (~likely_outliers).float()
    mean = (group * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
    cleaned = torch.where(likely_outliers, mean, group)
    w_min = cleaned.min(dim=1).values.clamp(max=0)
    w_max = cleaned.max(dim=1).values.clamp(min=0)
    flat = w_max == w_min
    w_max = torch.where(flat, w_max + 1e-6, w_max)
    scale = (w_max - w_min) / max_code(bits)
    zero = -w_min / scale
    return scale, zero


def spqr_quantize(weight: torch.Tensor, hessian: torch.Tensor, settings: SpqrSettings) -> SpqrResult:
    s = settings
    out_features, in_features = weight.shape
    h, w = prepare_hessian(hessian, weight, s.damp)
    perm = act_order_permutation(h) if s.act_order else torch.arange(in_features)
    w, h = w[:, perm], h[perm][:, perm]
    h_inv = inverse_cholesky_upper(h, s.damp).float()
    w = w.float()
    inv_diag = torch.diag(h_inv)
    del h

    # The paper's relative threshold: τ times the layer's mean error sensitivity.
    sensitivity_scale = (w.var(dim=0) / inv_diag.square()).mean().item()
    threshold = s.outlier_threshold * sensitivity_scale

    groups = -(-in_features // s.beta1)
    tiles = -(-out_features // s.beta2)
    codes = torch.zeros(out_features, in_features, dtype=torch.int32)
    stat_codes = torch.zeros(2, groups, out_features, dtype=torch.int32)
    second_order = torch.zeros(groups, tiles, 4, dtype=torch.float16)
    w_hat = torch.zeros(out_features, in_features)
    outliers = torch.zeros(out_features, in_features, dtype=torch.bool)
    outlier_values = torch.zeros(out_features, in_features, dtype=torch.float16)
    block = max(s.block_size // s.beta1, 1) * s.beta1

    for start in range(0, in_features, block):
        end = min(start + block, in_features)
        w_block = w[:, start:end].clone()
        errors = torch.zeros_like(w_block)
        h_inv_block = h_inv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % s.beta1 == 0:
                group = column // s.beta1
                width = min(s.beta1, in_features - column)
                members = w_block[:, i : i + width]
                likely = leave_one_out_error(members, inv_diag[column : column + width], s.bits) > threshold
                scale, zero = first_order_stats(members, likely, s.bits)
                s_codes, s_scale, s_zero, scale = fit_stat_grid(scale, s.stat_bits, s.beta2)
                z_codes, z_scale, z_zero, zero = fit_stat_grid(zero, s.stat_bits, s.beta2)
                stat_codes[0, group], stat_codes[1, group] = s_codes.to(torch.int32), z_codes.to(torch.int32)
                second_order[group] = torch.stack([s_scale, s_zero, z_scale, z_zero], dim=1)
            current = w_block[:, i]
            q = quantize_dense(current, scale, zero, s.bits)
            dense = dequantize_dense(q, scale, zero)
            error = (current - dense) / h_inv_block[i, i]
            is_outlier = error.square() > threshold
            if is_outlier.any():
                # An outlier's dense code is that of 0; the fp16 residual on top restores the weight.
                q = torch.where(is_outlier, quantize_dense(torch.zeros_like(current), scale, zero, s.bits), q)
                dense = dequantize_dense(q, scale, zero)
                residual = (current - dense).to(torch.float16)
                outlier_values[:, column] = torch.where(is_outlier, residual, torch.zeros_like(residual))
                outliers[:, column] = is_outlier
                dense = dense + outlier_values[:, column].float()
                error = (current - dense) / h_inv_block[i, i]
            codes[:, column] = q.to(torch.int32)
            w_hat[:, column] = dense
            w_block[:, i:] -= error[:, None] * h_inv_block[i : i + 1, i:]
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]

    rows, cols = outliers.nonzero(as_tuple=True)
    inverse = torch.argsort(perm)
    return SpqrResult(
        codes=codes,
        stat_codes=stat_codes,
        second_order=second_order,
        outlier_rows=rows,
        outlier_cols=cols,
        outlier_values=outlier_values[rows, cols],
        perm=perm,
        w_hat=w_hat[:, inverse],
    )


def paper_bits(settings: SpqrSettings, outlier_rate: float) -> float:
    """Average bits per parameter in the paper's accounting: b_w + (b_s+b_z)/β1 + 64/(β1·β2) + 32·outlier rate."""
    s = settings
    return s.bits + 2 * s.stat_bits / s.beta1 + 64 / (s.beta1 * s.beta2) + 32 * outlier_rate
