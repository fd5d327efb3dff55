"""SparseGPT (Frantar & Alistarh, 2023): unstructured pruning of one weight matrix, column by column,
pushing each pruned column's error onto the columns not yet visited through the inverse Hessian of the
layer's inputs: GPTQ's update with "round to zero" in place of "round to the grid". The Hessian
preparation and the inverse Cholesky factor are GPTQ's own (`lctool.quant.gptq`).

The mask is chosen per block of `block_size` columns (the paper's adaptive mask selection): the
weights with the smallest w² / [H⁻¹]_jj² of the block, taken from the block's weights as updated by
the error of the blocks before it. Every block prunes its share of exactly `round(sparsity · numel)`
weights, so a matrix holds exactly that many pruned weights whatever its shape.

`magnitude_prune` is the calibration-free baseline: the smallest |w| of the whole matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lctool.errors import check
from lctool.quant.gptq import DEFAULT_BLOCK, inverse_cholesky_upper, prepare_hessian


@dataclass
class SparseResult:
    weight: torch.Tensor  # float32 [O, I]: pruned weights are exactly 0, the others updated
    pruned: int  # how many weights the mask removed


def pruned_count(numel: int, sparsity: float) -> int:
    return int(round(numel * sparsity))


def _block_quotas(total: int, block_sizes: list[int]) -> list[int]:
    """Split `total` pruned weights over blocks in proportion to their sizes, summing exactly to `total`."""
    numel = sum(block_sizes)
    quotas, done, seen = [], 0, 0
    for size in block_sizes:
        seen += size
        upto = (total * seen + numel // 2) // numel
        quotas.append(upto - done)
        done = upto
    return quotas


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, *, damp: float = 0.01,
                    block_size: int = DEFAULT_BLOCK) -> SparseResult:
    """Prune `round(sparsity · numel)` weights of `weight` [O, I] with SparseGPT's error feedback."""
    check(0.0 <= sparsity < 1.0, f"sparsity must be in [0, 1), got {sparsity}")
    out_features, in_features = weight.shape
    h, w = prepare_hessian(hessian, weight, damp)
    h_inv = inverse_cholesky_upper(h, damp).float()
    w = w.float()
    del h
    starts = list(range(0, in_features, block_size))
    widths = [min(block_size, in_features - s) for s in starts]
    quotas = _block_quotas(pruned_count(weight.numel(), sparsity), [out_features * width for width in widths])
    for start, width, quota in zip(starts, widths, quotas, strict=True):
        end = start + width
        w_block = w[:, start:end].clone()
        errors = torch.zeros_like(w_block)
        h_inv_block = h_inv[start:end, start:end]
        saliency = w_block.square() / torch.diag(h_inv_block)[None, :].square()
        mask = torch.zeros(out_features * width, dtype=torch.bool)
        if quota:
            mask[torch.topk(saliency.reshape(-1), quota, largest=False, sorted=False).indices] = True
        mask = mask.reshape(out_features, width)
        for i in range(width):
            current = w_block[:, i]
            kept = torch.where(mask[:, i], torch.zeros_like(current), current)
            error = (current - kept) / h_inv_block[i, i]
            w_block[:, i:] -= error[:, None] * h_inv_block[i : i + 1, i:]
            w_block[:, i] = kept  # exactly zero where pruned (the update above only moved later columns)
            errors[:, i] = error
        w[:, start:end] = w_block
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return SparseResult(weight=w, pruned=sum(quotas))


def magnitude_prune(weight: torch.Tensor, sparsity: float) -> SparseResult:
    """Zero the `round(sparsity · numel)` weights of smallest magnitude (ties broken by position)."""
    check(0.0 <= sparsity < 1.0, f"sparsity must be in [0, 1), got {sparsity}")
    w = weight.float().clone()
    count = pruned_count(w.numel(), sparsity)
    if count:
        order = torch.argsort(w.abs().reshape(-1), stable=True)
        w.view(-1)[order[:count]] = 0
    return SparseResult(weight=w, pruned=count)
