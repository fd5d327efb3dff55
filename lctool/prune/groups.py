"""Coupled structures ("dependency groups") of one decoder layer, derived from the architecture map.

Removing a structure means removing every slice of every tensor that only exists for it:

- a query head h: rows h*d..(h+1)*d of q (and of q's bias) and the same columns of o. Whole heads
  go, so the RoPE pairs (i, i + d/2) of a head are always kept or removed together;
- a key/value group j (GQA): rows of k and v for kv head j, plus every query head sharing it
  (heads j*g..(j+1)*g-1, g = heads per kv head);
- an MLP channel c: row c of gate and up (and their biases) and column c of down.

GQA choice. By default (`gqa_unit="query-heads"`) lctool removes query heads *within* the KV groups
and keeps the group count: every group loses the same number of heads, so the layer stays a regular
GQA layer that stock code runs (heads = kv_heads x heads-per-group, contiguous per group). The
pruning unit is then a "slice": the r-th least important head of every group at once. Why: k and v
are the small part of a GQA layer (1/g of q each), yet one KV head feeds g query heads, so dropping
a whole group removes g heads in one step, a coarse cut that hurts more for fewer parameters.
`gqa_unit="kv-groups"` removes whole groups instead (k/v rows with all their query heads), which
also shrinks the KV cache. With multi-head attention (g = 1) both are the same: a head with its k/v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lctool.arch import ModelArch


@dataclass(frozen=True)
class LayerShape:
    """Sizes of one decoder layer and what each prunable structure costs in parameters."""

    layer: int
    hidden: int
    head_dim: int
    heads: int
    kv_heads: int
    intermediate: int
    q_bias: bool
    kv_bias: bool
    mlp_bias: bool

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def query_head_params(self) -> int:
        return 2 * self.head_dim * self.hidden + (self.head_dim if self.q_bias else 0)

    @property
    def kv_head_params(self) -> int:
        return 2 * self.head_dim * self.hidden + (2 * self.head_dim if self.kv_bias else 0)

    @property
    def channel_params(self) -> int:
        return 3 * self.hidden + (2 if self.mlp_bias else 0)

    def attention_unit_params(self, gqa_unit: str) -> int:
        if removes_kv(self, gqa_unit):
            return self.group * self.query_head_params + self.kv_head_params
        return self.kv_heads * self.query_head_params  # one slice: a head from every group

    def attention_units(self, gqa_unit: str) -> int:
        return self.kv_heads if removes_kv(self, gqa_unit) else self.group


def removes_kv(shape: LayerShape, gqa_unit: str) -> bool:
    """Whether an attention unit takes its key/value head along (whole groups, or plain MHA)."""
    return gqa_unit == "kv-groups" or shape.group == 1


def layer_shape(arch: ModelArch, layer: int) -> LayerShape:
    return LayerShape(
        layer=layer,
        hidden=arch.hidden_size,
        head_dim=arch.head_dim,
        heads=arch.heads_in(layer),
        kv_heads=arch.kv_heads_in(layer),
        intermediate=arch.intermediate_in(layer),
        q_bias=arch.has_bias("q"),
        kv_bias=arch.has_bias("k"),
        mlp_bias=arch.has_bias("gate"),
    )


@dataclass
class LayerScores:
    """Importance of each structure of a layer: per query head, per kv head, per MLP channel."""

    heads: torch.Tensor  # [heads]
    kv_heads: torch.Tensor  # [kv_heads]
    channels: torch.Tensor  # [intermediate]


@dataclass
class AttentionUnits:
    """The removable attention units of a layer, most important first, with their query/kv heads."""

    scores: list[float]
    query_heads: list[list[int]]
    kv_heads: list[list[int]]


def attention_units(shape: LayerShape, scores: LayerScores, gqa_unit: str) -> AttentionUnits:
    heads = scores.heads.tolist()
    if removes_kv(shape, gqa_unit):
        units = []
        for kv in range(shape.kv_heads):
            members = list(range(kv * shape.group, (kv + 1) * shape.group))
            units.append((float(scores.kv_heads[kv]) + sum(heads[h] for h in members), members, [kv]))
        units.sort(key=lambda u: -u[0])
        return AttentionUnits([u[0] for u in units], [u[1] for u in units], [u[2] for u in units])
    # Slices: rank heads inside each group; slice r holds the r-th most important head of every group.
    ranked = []
    for kv in range(shape.kv_heads):
        members = range(kv * shape.group, (kv + 1) * shape.group)
        ranked.append(sorted(members, key=lambda h: -heads[h]))
    slices = [[ranked[kv][r] for kv in range(shape.kv_heads)] for r in range(shape.group)]
    return AttentionUnits([sum(heads[h] for h in s) for s in slices], slices, [[] for _ in slices])


def kept_attention(shape: LayerShape, units: AttentionUnits, keep: int) -> tuple[list[int], list[int]]:
    """Query heads and kv heads kept when the `keep` most important units stay, in stock GQA order.

    Query heads are listed kv group by kv group, so kept kv head j serves kept heads j*g'..(j+1)*g'-1.
    """
    kept_q = sorted(h for unit in units.query_heads[:keep] for h in unit)
    if any(units.kv_heads):
        kept_kv = sorted(kv for unit in units.kv_heads[:keep] for kv in unit)
    else:
        kept_kv = list(range(shape.kv_heads))
    return kept_q, kept_kv


def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the given heads in a projection, in the given order."""
    if not heads:
        return torch.zeros(0, dtype=torch.long)
    return (torch.tensor(heads)[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def per_head(values: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Sum per-row (or per-column) values over each head's head_dim rows."""
    return values.reshape(-1, head_dim).sum(dim=1)
