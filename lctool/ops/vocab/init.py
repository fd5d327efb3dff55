"""Rows for new tokens in an embedding (or untied lm_head) matrix.

    mean    the mean of the rows of the old tokens the new token is built from (its merge-tree leaves:
            exactly the old pieces BPE joined to make it)
    merge   the mean of the two tokens its merge rule joins, recursively (older pieces weigh less)
    random  the baseline: normal draws with the old rows' per-dimension mean and spread
    align   a weighted mix of old rows, weights from an auxiliary embedding's similarities (align.py)

Padding rows (pad-to-multiple) get the mean of the old rows: their logit is then an average one, so
tokens that can never occur take little probability mass.
"""

from __future__ import annotations

import torch

from lctool.ops.vocab.bpe import Merge

INIT_METHODS = ("mean", "merge", "random", "align")


def merge_tree_leaves(token: str, parts: dict[str, Merge]) -> list[str]:
    """The old tokens a new token is built from, left to right."""
    if token not in parts:
        return [token]
    left, right = parts[token]
    return merge_tree_leaves(left, parts) + merge_tree_leaves(right, parts)


def mean_rows(old: torch.Tensor, new_tokens: list[str], parts: dict[str, Merge], old_ids: dict[str, int]) -> torch.Tensor:
    rows = [old[[old_ids[t] for t in merge_tree_leaves(token, parts)]].mean(dim=0) for token in new_tokens]
    return torch.stack(rows)


def merge_rows(old: torch.Tensor, new_tokens: list[str], parts: dict[str, Merge], old_ids: dict[str, int]) -> torch.Tensor:
    made: dict[str, torch.Tensor] = {}

    def row(token: str) -> torch.Tensor:
        if token in made:
            return made[token]
        return old[old_ids[token]]

    for token in new_tokens:  # in rank order: a merge's parts are old or made earlier
        left, right = parts[token]
        made[token] = (row(left) + row(right)) / 2
    return torch.stack([made[t] for t in new_tokens])


def random_rows(old: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same rows on every device
    noise = torch.randn(count, old.shape[1], generator=generator, dtype=torch.float32, device="cpu")
    return old.mean(dim=0) + noise.to(old.device, old.dtype) * old.std(dim=0)


def mixed_rows(old: torch.Tensor, weights: list[dict[int, float]]) -> torch.Tensor:
    """Row i = sum of weights[i][j] * old[j]."""
    rows = []
    for mix in weights:
        ids = torch.tensor(list(mix), dtype=torch.long, device=old.device)
        w = torch.tensor(list(mix.values()), dtype=old.dtype, device=old.device)
        rows.append((w[:, None] * old[ids]).sum(dim=0))
    return torch.stack(rows)


def new_rows(
    method: str,
    old: torch.Tensor,
    new_tokens: list[str],
    parts: dict[str, Merge],
    old_ids: dict[str, int],
    seed: int,
    align_weights: list[dict[int, float] | None] | None = None,
) -> torch.Tensor:
    """Rows for `new_tokens` (in id order) from the old rows `old`, on its device and in its dtype.

    `align_weights[k]` mixes old rows for new token k; None there falls back to `mean`.
    """
    if not new_tokens:
        return old.new_zeros(0, old.shape[1])
    if method == "mean":
        return mean_rows(old, new_tokens, parts, old_ids)
    if method == "merge":
        return merge_rows(old, new_tokens, parts, old_ids)
    if method == "random":
        return random_rows(old, len(new_tokens), seed)
    if method == "align":
        assert align_weights is not None and len(align_weights) == len(new_tokens), "align init needs its weights"
        rows = mean_rows(old, new_tokens, parts, old_ids)  # for tokens the auxiliary text never shows
        for k, mix in enumerate(align_weights):
            if mix is not None:
                rows[k] = mixed_rows(old, [mix])[0]
        return rows
    raise ValueError(f"unknown init method {method!r}")
