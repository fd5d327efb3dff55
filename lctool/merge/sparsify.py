"""Dropping parts of a task vector (delta = fine-tune − base) before it is combined.

Four ways, as mergekit 0.1.5 names them: `magnitude` (TIES: keep the k largest |delta|),
`magnitude_outliers` (breadcrumbs: drop the largest gamma share and the smallest), `random` (DARE:
keep each element with probability density) and `della` (DELLA: keep probability grows with the
element's magnitude rank in its row).

Survivors are rescaled by one of two named rules:
  "l1"              mergekit's rule: multiply by sum|delta| / sum|kept| (skipped below 1e-7).
  "inverse_density" the papers' rule: divide each survivor by its keep probability (1/density for DARE),
                    which makes the expectation over seeds equal the undropped delta.
Magnitude pruning with `rescale: true` always uses "l1" (its keep "probability" is 0 or 1).
"""

from __future__ import annotations

import numpy as np
import torch

RESCALE_RULES = ("l1", "inverse_density")
TIE_BREAKS = ("argsort", "index")
RESCALE_EPS = 1e-7


def stable_abs_sum(tensor: torch.Tensor) -> float:
    """sum |x| independent of the thread count.

    torch splits a full reduction between threads, so its rounding changes with the thread count;
    numpy's pairwise float64 sum runs on one thread in a fixed order.
    """
    return _stable_sum(tensor.detach().abs())


def _stable_sum(values: torch.Tensor) -> float:
    flat = values.reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    return float(np.sum(flat.cpu().numpy(), dtype=np.float64))


def rescale_l1(original: torch.Tensor, kept: torch.Tensor, mergekit_sums: bool = False) -> torch.Tensor:
    """`kept` scaled so its L1 norm equals the original's (in place).

    `mergekit_sums` repeats mergekit's own arithmetic (sums in the tensor's dtype, split by thread)
    so that its masks and ours give the same bits; otherwise the sums are thread-count independent.
    """
    if mergekit_sums:
        before, after = original.abs().sum(), kept.abs().sum()
        if before < RESCALE_EPS or after < RESCALE_EPS:
            return kept
        return kept * (before / after)
    before, after = stable_abs_sum(original), stable_abs_sum(kept)
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept.mul_(torch.tensor(before / after, dtype=torch.float64).to(kept.dtype))


# ---- magnitude selection --------------------------------------------------------------------------


def _rank_range_mask(magnitudes: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Elements whose ascending rank by magnitude lies in [low, high), as a bool mask; equal magnitudes
    rank higher at lower indices (the "index" tie-break).

    Ranks are only ambiguous among equal magnitudes at a boundary: two O(n) selections find the
    boundary values, and only the tied elements there need ranking by index.
    """
    n = magnitudes.numel()
    floor = torch.kthvalue(magnitudes, low + 1).values if low > 0 else None
    ceiling = torch.kthvalue(magnitudes, high).values if high < n else None
    keep = torch.ones(n, dtype=torch.bool, device=magnitudes.device)
    if floor is not None:
        keep &= magnitudes > floor
    if ceiling is not None:
        keep &= magnitudes < ceiling
    for value in {v.item() for v in (floor, ceiling) if v is not None}:
        tied = magnitudes == value
        first_rank = int((magnitudes < value).sum())
        count = int(tied.sum())
        if count == 1:
            keep |= tied if low <= first_rank < high else torch.zeros_like(tied)
            continue
        rank = first_rank + count - torch.cumsum(tied, 0)  # among ties: the highest index ranks lowest
        keep |= tied & (rank >= low) & (rank < high)
    return keep


def _sorted_magnitudes_mask(delta: torch.Tensor, low: int, high: int, descending: bool, tie_break: str) -> torch.Tensor:
    """Elements at positions [low, high) of mergekit's `torch.sort(|delta|.float(), descending)`.

    "argsort" picks among equal magnitudes at a boundary exactly as that sort does (on CPU replayed in
    O(n), see sortorder.py); "index" ranks equal magnitudes by index instead.
    """
    n = delta.numel()
    magnitudes = delta.abs().reshape(-1).float()  # a fresh tensor: the replay may permute it
    if tie_break == "index":
        ranks = (n - high, n - low) if descending else (low, high)
        mask = _rank_range_mask(magnitudes, *ranks)
    elif delta.device.type == "cpu":
        from lctool.merge import sortorder  # numba: loaded only by the methods that sort

        mask = sortorder.sorted_slice_mask(magnitudes, low, high, descending, scratch=True)
    else:
        mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
        mask[torch.sort(magnitudes, descending=descending).indices[low:high]] = True
    return mask.reshape(delta.shape)


def magnitude_mask(delta: torch.Tensor, density: float, tie_break: str) -> torch.Tensor:
    """TIES trimming: the k = max(1, int(density·n)) largest |delta| (mergekit's argsort order)."""
    n = delta.numel()
    k = max(1, int(density * n))
    return _sorted_magnitudes_mask(delta, 0, k, True, tie_break)


def outlier_mask(delta: torch.Tensor, density: float, gamma: float, tie_break: str) -> torch.Tensor:
    """Breadcrumbs: drop the gamma share of largest |delta|, then the smallest, keeping int(density·n)."""
    n = delta.numel()
    target = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - target - top)
    return _sorted_magnitudes_mask(delta, bottom, bottom + target, False, tie_break)


def work_dtype(tensor: torch.Tensor) -> torch.dtype:
    # torch.bernoulli has no float16 CPU kernel; mergekit draws in float32 except for bfloat16.
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:
        return tensor.dtype
    return torch.float32


# ---- random drops -------------------------------------------------------------------------------


def keep_draw(probability, shape, dtype, generator: torch.Generator, mergekit_stream: bool) -> torch.Tensor:
    """A keep mask with P(keep) = probability (a number or a tensor), drawn on the CPU.

    In mergekit's stream the draw is `torch.bernoulli(p)` exactly as mergekit makes it (a 0/1 tensor
    of `dtype`); otherwise `uniform < p` (a float32 0/1 tensor made in the uniforms' buffer), which is
    cheaper and has the same law.
    """
    if mergekit_stream:
        if not isinstance(probability, torch.Tensor):
            probability = torch.full(shape, probability, dtype=dtype)
        return torch.bernoulli(probability.cpu(), generator=generator)
    uniform = torch.rand(shape, generator=generator, dtype=torch.float32)
    return uniform.lt_(probability.cpu() if isinstance(probability, torch.Tensor) else probability)


def random_drop(delta, density, generator, *, rescale: bool, rule: str, mergekit_stream: bool):
    """DARE: keep each element with probability `density`, then rescale the survivors."""
    if density >= 1:
        return delta
    compute = work_dtype(delta)
    mask = keep_draw(density, delta.shape, compute, generator, mergekit_stream).to(delta.device, compute)
    original = delta.to(compute)
    if rescale and rule == "l1" and not mergekit_stream:
        return _drop_and_rescale_l1(original, mask).to(delta.dtype)
    kept = original * mask
    del mask
    if rescale:
        kept = rescale_l1(original, kept, mergekit_stream) if rule == "l1" else kept.div_(density)
    return kept.to(delta.dtype)


def _drop_and_rescale_l1(original: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """original·mask rescaled to original's L1 norm, the same bits as rescale_l1(original, original·mask).

    The mask is 0/1, so |original·mask| = |original|·mask exactly: one abs serves both sums, and the
    mask's buffer (a fresh draw) becomes the result. This is most of DARE's cost on large tensors.
    """
    magnitudes = original.abs()
    before = _stable_sum(magnitudes)
    after = _stable_sum(magnitudes.mul_(mask))
    del magnitudes
    kept = mask.mul_(original)
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept.mul_(torch.tensor(before / after, dtype=torch.float64).to(kept.dtype))


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float, compute) -> torch.Tensor:
    """Per-row keep probabilities from density − ε (smallest |delta|) to density + ε (largest)."""
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    rows = rows.reshape(rows.shape[0], -1) if rows.dim() > 2 else rows
    order = torch.argsort(rows.abs(), dim=1, descending=False)
    ranks = torch.empty(rows.shape, dtype=compute, device=rows.device)
    positions = torch.arange(1, rows.shape[1] + 1, dtype=compute, device=rows.device)
    ranks.scatter_(1, order, positions.expand_as(ranks).contiguous())
    del order
    lowest = ranks.min(dim=1, keepdim=True).values
    highest = ranks.max(dim=1, keepdim=True).values
    spread = torch.where(highest > lowest, highest - lowest, torch.ones_like(highest))
    normalized = ((ranks - lowest) / spread).clamp(0, 1)
    return ((density - epsilon) + normalized * 2 * epsilon).reshape(delta.shape)


def della_drop(delta, density, epsilon, generator, *, rescale: bool, rule: str, mergekit_stream: bool):
    """DELLA's MagPrune: random drops whose keep probability follows the magnitude rank."""
    if density >= 1:
        return delta
    compute = work_dtype(delta)
    probabilities = della_probabilities(delta, density, epsilon, compute)
    mask = keep_draw(probabilities, delta.shape, compute, generator, mergekit_stream).to(delta.device, compute)
    original = delta.to(compute)
    kept = original * mask
    del mask
    if rescale:
        kept = rescale_l1(original, kept, mergekit_stream) if rule == "l1" else kept.div_(probabilities.to(delta.device))
    return kept.to(delta.dtype)


def magnitude_drop(delta, mask: torch.Tensor, *, rescale: bool) -> torch.Tensor:
    """`delta` (which the caller gives up) times the 0/1 mask, as mergekit's `tensor * mask`."""
    if not rescale:
        return delta.mul_(mask)
    return rescale_l1(delta, delta * mask)
