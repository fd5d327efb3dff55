"""From importance scores to what every layer keeps: per-layer or global ranking under a parameter budget.

`--ratio r` removes r x (all parameters of the model, embeddings included) from the decoder layers in
`--layers` (by default every layer but the first and the last, see `options.default_layers`).
Per-layer ranking removes the same fraction f of every selected layer's prunable parameters:
round(f x units) attention units first (heads are coarse), then as many MLP channels as bring the
layer's removal to f of its prunable parameters. Global ranking removes the structures with the
least importance per parameter across all selected layers until the budget is met, always leaving
every layer at least one attention unit and one channel; it suits Taylor and second-order
importance, which estimate a loss change and so compare across layers (magnitudes and random do
not). `--keep-heads-multiple` and `--channel-multiple` then round each layer's kept counts to the
nearest allowed value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lctool.arch import ModelArch
from lctool.errors import LctoolError, check
from lctool.prune.groups import (
    AttentionUnits,
    LayerScores,
    LayerShape,
    attention_units,
    kept_attention,
    layer_shape,
)
from lctool.prune.options import LlmPrunerOptions


@dataclass
class LayerPlan:
    """What one layer keeps, as indices into the input layer (kept query heads in stock GQA order)."""

    layer: int
    kept_heads: list[int]
    kept_kv_heads: list[int]
    kept_channels: list[int]
    pruned: bool = False

    def sizes(self) -> dict:
        return {"heads": len(self.kept_heads), "kv_heads": len(self.kept_kv_heads),
                "intermediate_size": len(self.kept_channels)}


@dataclass
class PrunePlan:
    layers: list[LayerPlan]
    total_params: int
    removed_params: int
    notes: list[str] = field(default_factory=list)

    @property
    def uniform(self) -> bool:
        return len({tuple(p.sizes().values()) for p in self.layers}) == 1

    def stock_loadable(self, arch: ModelArch) -> bool:
        """Uniform, with a head count the family's stock config accepts."""
        heads = self.layers[0].sizes()["heads"]
        return self.uniform and not (arch.family.heads_divide_hidden and arch.hidden_size % heads)

    @property
    def removed_fraction(self) -> float:
        return self.removed_params / self.total_params


@dataclass
class _LayerCounts:
    shape: LayerShape
    units: AttentionUnits
    channel_scores: list[float]
    channel_order: list[int]  # most important first
    keep_units: int
    keep_channels: int


def _unit_heads(shape: LayerShape, units: AttentionUnits) -> int:
    return len(units.query_heads[0])


def removed_params_of(c: _LayerCounts, gqa_unit: str) -> int:
    removed_units = len(c.units.scores) - c.keep_units
    removed_channels = c.shape.intermediate - c.keep_channels
    return removed_units * c.shape.attention_unit_params(gqa_unit) + removed_channels * c.shape.channel_params


def _capacity(c: _LayerCounts, scope: str, gqa_unit: str) -> int:
    attn = len(c.units.scores) * c.shape.attention_unit_params(gqa_unit) if scope in ("all", "attn") else 0
    mlp = c.shape.intermediate * c.shape.channel_params if scope in ("all", "mlp") else 0
    return attn + mlp


def _per_layer_counts(counts: list[_LayerCounts], target: int, options: LlmPrunerOptions,
                      hidden_rule: int | None) -> None:
    capacity = sum(_capacity(c, options.scope, options.gqa_unit) for c in counts)
    fraction = target / capacity if capacity else 1.0
    if fraction >= 1:
        raise LctoolError(_unreachable(options, target, capacity, counts))
    for c in counts:
        unit_count = len(c.units.scores)
        if options.scope in ("all", "attn"):
            c.keep_units = unit_count - round(fraction * unit_count)
            _check_heads_left(c, options)
            c.keep_units = _round_heads(c, options.keep_heads_multiple, hidden_rule)
        layer_target = fraction * _capacity(c, options.scope, options.gqa_unit)
        if options.scope in ("all", "mlp"):
            attn_removed = (unit_count - c.keep_units) * c.shape.attention_unit_params(options.gqa_unit)
            channels = round(max(0.0, layer_target - attn_removed) / c.shape.channel_params)
            c.keep_channels = c.shape.intermediate - channels
            if c.keep_channels < 1:
                raise LctoolError(f"--ratio {options.ratio} would prune all {c.shape.intermediate} MLP channels of "
                                  f"layer {c.shape.layer}; lower --ratio or prune more layers")
            c.keep_channels = _round_channels(c, options.channel_multiple)


def _check_heads_left(c: _LayerCounts, options: LlmPrunerOptions) -> None:
    if c.keep_units < 1:
        raise LctoolError(f"--ratio {options.ratio} would prune all {c.shape.heads} attention heads of layer "
                          f"{c.shape.layer}; lower --ratio, prune more layers, or use --scope mlp")


def _global_counts(counts: list[_LayerCounts], target: int, options: LlmPrunerOptions) -> None:
    candidates = []  # (importance per parameter, layer position, kind, params)
    for position, c in enumerate(counts):
        if options.scope in ("all", "attn"):
            params = c.shape.attention_unit_params(options.gqa_unit)
            candidates += [(score / params, position, "attn", params) for score in c.units.scores]
        if options.scope in ("all", "mlp"):
            params = c.shape.channel_params
            candidates += [(score / params, position, "mlp", params) for score in c.channel_scores]
    candidates.sort(key=lambda item: item[0])
    removed = 0
    for _, position, kind, params in candidates:
        if removed >= target:
            break
        c = counts[position]
        if kind == "attn" and c.keep_units > 1:
            c.keep_units -= 1
            removed += params
        elif kind == "mlp" and c.keep_channels > 1:
            c.keep_channels -= 1
            removed += params
    if removed < target:
        capacity = sum(_capacity(c, options.scope, options.gqa_unit) for c in counts)
        raise LctoolError(_unreachable(options, target, capacity, counts))
    for c in counts:
        c.keep_units = _round_heads(c, options.keep_heads_multiple)
        c.keep_channels = _round_channels(c, options.channel_multiple)


def _unreachable(options: LlmPrunerOptions, target: int, capacity: int, counts: list[_LayerCounts]) -> str:
    first, last = counts[0].shape.layer, counts[-1].shape.layer
    where = f"layer {first}" if first == last else f"layers {first}-{last}"
    hint = ""
    if options.layers is None and first > 0:  # the default range left layers out
        hint = " (the default keeps the first and last layers dense; --layers all prunes every layer)"
    return (f"--ratio {options.ratio} asks to remove {target:,} parameters, but pruning {where} "
            f"(--scope {options.scope}) can remove fewer than {capacity:,}; lower --ratio or widen --layers{hint}")


def _round_heads(c: _LayerCounts, multiple: int, hidden_rule: int | None = None) -> int:
    """The allowed unit count nearest to keep_units (ties: keep more) whose head count is a multiple
    of `multiple` and, when `hidden_rule` is set, divides it (see Family.heads_divide_hidden)."""
    per_unit = _unit_heads(c.shape, c.units)
    allowed = [k for k in range(1, len(c.units.scores) + 1)
               if (k * per_unit) % multiple == 0 and (hidden_rule is None or hidden_rule % (k * per_unit) == 0)]
    if not allowed:
        rule = f" and divides hidden_size {hidden_rule} (a stock transformers rule)" if hidden_rule else ""
        raise LctoolError(f"--keep-heads-multiple {multiple}: no head count layer {c.shape.layer} can keep "
                          f"({per_unit} heads per unit, {c.shape.heads} heads) is a multiple of it{rule}")
    return min(allowed, key=lambda k: (abs(k - c.keep_units), -k))


def _round_channels(c: _LayerCounts, multiple: int) -> int:
    if multiple == 1:
        return c.keep_channels
    check(c.shape.intermediate >= multiple, f"--channel-multiple {multiple} exceeds the {c.shape.intermediate} "
                                            f"MLP channels of layer {c.shape.layer}")
    nearest = max(multiple, round(c.keep_channels / multiple) * multiple)
    return min(nearest, (c.shape.intermediate // multiple) * multiple)


def total_parameters(arch: ModelArch) -> int:
    total = 0
    for shape in arch.expected_shapes().values():
        count = 1
        for size in shape:
            count *= size
        total += count
    return total


def make_plan(arch: ModelArch, options: LlmPrunerOptions, layers: list[int], scores: dict[int, LayerScores]) -> PrunePlan:
    """Decide what each layer keeps. `scores` holds the importance of every structure of each layer."""
    total = total_parameters(arch)
    target = round(options.ratio * total)
    counts = []
    for layer in layers:
        shape = layer_shape(arch, layer)
        units = attention_units(shape, scores[layer], options.gqa_unit)
        channel_scores = scores[layer].channels.tolist()
        order = sorted(range(shape.intermediate), key=lambda ch: -channel_scores[ch])
        counts.append(_LayerCounts(shape, units, channel_scores, order, len(units.scores), shape.intermediate))
    if options.ranking == "global":
        _global_counts(counts, target, options)
    else:
        # Per-layer ranking over every layer gives a uniform, stock-loadable model: keep its head count legal.
        uniform = len(layers) == arch.num_layers
        hidden_rule = arch.hidden_size if uniform and arch.family.heads_divide_hidden else None
        _per_layer_counts(counts, target, options, hidden_rule)
    by_layer = {c.shape.layer: c for c in counts}
    plans, removed = [], 0
    for layer in range(arch.num_layers):
        if layer not in by_layer:
            plans.append(LayerPlan(layer, list(range(arch.heads_in(layer))), list(range(arch.kv_heads_in(layer))),
                                   list(range(arch.intermediate_in(layer)))))
            continue
        c = by_layer[layer]
        kept_q, kept_kv = kept_attention(c.shape, c.units, c.keep_units)
        kept_channels = sorted(c.channel_order[: c.keep_channels])
        plans.append(LayerPlan(layer, kept_q, kept_kv, kept_channels, pruned=True))
        removed += removed_params_of(c, options.gqa_unit)
    return PrunePlan(plans, total, removed)
