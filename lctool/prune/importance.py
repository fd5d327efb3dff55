"""Importance of each coupled structure (LLM-Pruner, section 3.2), from weights and calibration gradients.

Every estimator scores each row (output channel) or column (input channel) of a projection; a
structure's importance is the sum over the rows/columns it owns (see `lctool.prune.groups`):

    taylor-vector   |sum_k w_k g_k| per row/column     first-order Taylor, one vector at a time
    taylor-element  sum_k |w_k g_k|                    first-order Taylor, element by element
    second-order    sum_k |w_k g_k - 1/2 w_k^2 F_kk|   the paper's second-order term, with the Hessian
                                                       diagonal approximated by the Fisher diagonal F
                                                       (mean over calibration samples of g_n^2)
    l1, l2          sum_k |w_k|, sum_k w_k^2           magnitude baselines
    random          uniform noise                      baseline

g is the gradient of the mean next-token loss over the calibration windows (the paper: 10 samples).
Only the weights of the layers and roles being pruned take gradients, so the extra memory is two
copies of those weights (gradient, Fisher) rather than of the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lctool.arch import ModelArch
from lctool.prune.groups import LayerScores, per_head


@dataclass
class Gradients:
    """Mean gradient and, for second-order importance, the Fisher diagonal of each pruned weight."""

    grad: dict[str, torch.Tensor]
    fisher: dict[str, torch.Tensor]


def vector_scores(kind: str, weight: torch.Tensor, grad: torch.Tensor | None, fisher: torch.Tensor | None,
                  per_row: bool, generator: torch.Generator) -> torch.Tensor:
    """One score per row (`per_row`) or per column of a weight matrix."""
    reduce_dim = 1 if per_row else 0
    count = weight.shape[0] if per_row else weight.shape[1]
    w = weight.double()
    if kind == "random":
        return torch.rand(count, generator=generator, dtype=torch.float64)
    if kind == "l1":
        return w.abs().sum(reduce_dim)
    if kind == "l2":
        return w.pow(2).sum(reduce_dim)
    salience = w * grad.double()
    if kind == "taylor-vector":
        return salience.sum(reduce_dim).abs()
    if kind == "taylor-element":
        return salience.abs().sum(reduce_dim)
    if kind == "second-order":
        return (salience - 0.5 * w * w * fisher.double()).abs().sum(reduce_dim)
    raise ValueError(f"unknown importance {kind!r}")


def layer_scores(arch: ModelArch, layer: int, kind: str, weights: dict[str, torch.Tensor],
                 gradients: Gradients | None, generator: torch.Generator) -> LayerScores:
    """Scores of the query heads, kv heads and MLP channels of `layer` (weights keyed by role)."""

    def scores(role: str, per_row: bool) -> torch.Tensor:
        name = arch.weight(role, layer)
        grad = gradients.grad.get(name) if gradients else None
        fisher = gradients.fisher.get(name) if gradients else None
        if grad is None and kind not in ("random", "l1", "l2"):
            # A role outside --scope has no gradient and is never ranked: give it a neutral score.
            count = weights[role].shape[0 if per_row else 1]
            return torch.zeros(count, dtype=torch.float64)
        return vector_scores(kind, weights[role], grad, fisher, per_row, generator)

    hd = arch.head_dim
    heads = per_head(scores("q", True), hd) + per_head(scores("o", False), hd)
    kv_heads = per_head(scores("k", True), hd) + per_head(scores("v", True), hd)
    channels = scores("gate", True) + scores("up", True) + scores("down", False)
    return LayerScores(heads=heads, kv_heads=kv_heads, channels=channels)


def prunable_weight_names(arch: ModelArch, layers: list[int], roles: list[str]) -> list[str]:
    return [arch.weight(role, layer) for layer in layers for role in roles]


def collect_gradients(model: torch.nn.Module, names: list[str], windows: torch.Tensor, fisher: bool,
                      micro_batch: int = 4, dtype: str = "float32") -> Gradients:
    """Gradients of the mean causal-LM loss over `windows` [n, T] for the named weights.

    With `fisher`, every window gets its own backward pass so the squared per-sample gradients
    (the empirical Fisher diagonal) can be averaged too; otherwise windows go in micro-batches.
    The passes run where the model is, under autocast to `dtype`; the sums are float32 on the CPU.
    """
    from lctool.devices import autocast

    device = next(model.parameters()).device
    parameters = dict(model.named_parameters())
    wanted = {name: parameters[name] for name in names}
    for parameter in parameters.values():
        parameter.requires_grad_(False)
    for parameter in wanted.values():
        parameter.requires_grad_(True)
        parameter.grad = None
    model.eval()
    count = windows.shape[0]
    step = 1 if fisher else micro_batch
    fisher_sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in wanted.items()} if fisher else {}
    grad_sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in wanted.items()}
    for start in range(0, count, step):
        batch = windows[start : start + step].to(device)
        with autocast(str(device), dtype):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        (loss * (batch.shape[0] / count)).backward()
        for name, parameter in wanted.items():
            grad_sums[name] += parameter.grad.float()
            if fisher:
                per_sample = parameter.grad.float() * count  # undo the 1/count weighting of this sample
                fisher_sums[name] += per_sample * per_sample / count
            parameter.grad = None
    for parameter in wanted.values():
        parameter.requires_grad_(False)
    return Gradients(grad={k: v.cpu() for k, v in grad_sums.items()}, fisher={k: v.cpu() for k, v in fisher_sums.items()})
