"""Merge methods: small functions over one tensor's inputs, registered by name.

A kernel receives the base tensor (or None), the other inputs in config order (fresh tensors it may
overwrite), the shared parameters, the per-input parameters and a `KernelContext` (randomness and
rules). It returns the merged tensor. Formulas follow mergekit 0.1.5 so that the same YAML gives the
same tensors; /work/shared/notes/mergekit-facts.md records the measured details.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from lctool.errors import LctoolError
from lctool.merge import sparsify

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # float or bool
    per_input: bool
    default: object = REQUIRED
    # Per-input parameters of base-aware methods apply to the non-base inputs only.
    non_base: bool = True


@dataclass
class KernelContext:
    tensor_name: str
    generator: torch.Generator | None = None
    mergekit_stream: bool = False
    rescale_rule: str = "l1"
    tie_break: str = "argsort"
    workers: int = 1  # threads for per-input work that has no random draws


Kernel = Callable[[torch.Tensor | None, list, dict, list, KernelContext], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    kernel: Kernel
    params: tuple[Param, ...]
    needs_base: bool
    min_inputs: int = 1
    max_inputs: int | None = None
    random: bool = False
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise LctoolError(f"unknown merge method {name!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


# ---- task arithmetic and its sparsified variants (TIES, DARE, breadcrumbs, DELLA) ----------------


def _sparsify(delta, kind: str | None, params: dict, rescale: bool, ctx: KernelContext):
    density = params["density"]
    if kind is None or density >= 1:
        return delta
    if kind == "magnitude":
        mask = sparsify.magnitude_mask(delta, density, ctx.tie_break)
        return sparsify.magnitude_drop(delta, mask, rescale=rescale)
    if kind == "magnitude_outliers":
        mask = sparsify.outlier_mask(delta, density, params["gamma"], ctx.tie_break)
        return sparsify.magnitude_drop(delta, mask, rescale=rescale)
    if kind == "random":
        return sparsify.random_drop(
            delta, density, ctx.generator, rescale=rescale, rule=ctx.rescale_rule, mergekit_stream=ctx.mergekit_stream
        )
    return sparsify.della_drop(
        delta,
        density,
        params["epsilon"],
        ctx.generator,
        rescale=rescale,
        rule=ctx.rescale_rule,
        mergekit_stream=ctx.mergekit_stream,
    )


def task_arithmetic_kernel(consensus: bool, sparsification: str | None) -> Kernel:
    """base + λ·Σ wᵢ·sparsify(xᵢ − base), with TIES sign election when `consensus`.

    Memory: the base, one delta per input and one accumulator; deltas are built in the inputs'
    own buffers.
    """

    def kernel(base, others, shared, per_input, ctx):
        if not others:
            return base

        def weighted_delta(index: int) -> torch.Tensor:
            params = per_input[index]
            delta = _sparsify(others[index].sub_(base), sparsification, params, shared["rescale"], ctx)
            return delta.mul_(torch.tensor(params["weight"], dtype=delta.dtype))

        # Magnitude trimming draws nothing, so the inputs' (single-threaded) sorts can run side by side;
        # random drops stay in order, since their masks come from one generator stream.
        if ctx.workers > 1 and sparsification in ("magnitude", "magnitude_outliers") and len(others) > 1:
            with ThreadPoolExecutor(min(ctx.workers, len(others))) as pool:
                deltas = list(pool.map(weighted_delta, range(len(others))))
        else:
            deltas = [weighted_delta(index) for index in range(len(others))]
        weights = torch.tensor([p["weight"] for p in per_input], dtype=deltas[0].dtype)
        if consensus:
            mixed, divisor = _elect_and_sum(deltas, weights, divisor_needed=shared["normalize"])
        else:
            mixed = _sum_in_order(deltas)
            divisor = weights.sum()
            if divisor.abs() < 1e-8:
                divisor = torch.ones_like(divisor)
        del deltas
        if shared["normalize"]:
            mixed.div_(divisor)
        if shared["lambda"] != 1:
            mixed.mul_(shared["lambda"])
        return mixed.add_(base).to(base.dtype)

    return kernel


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _sum_in_order(tensors: list) -> torch.Tensor:
    """Σ tensors as torch's `stack(tensors).sum(dim=0)` adds them (mergekit's sums): in order, half
    precision accumulated in float32 and rounded once. May reuse the first tensor's buffer."""
    dtype = tensors[0].dtype
    total = tensors[0].to(_accumulation_dtype(dtype))
    for tensor in tensors[1:]:
        total.add_(tensor)
    return total.to(dtype)


def _elect_and_sum(deltas: list, weights: torch.Tensor, divisor_needed: bool = True):
    """TIES: elect each element's sign by the weighted sum, then sum the deltas that agree with it.

    As mergekit: the elected sign is + where the sum is ≥ 0 (else −); a delta agrees when its sign
    equals it (zeros never do); the divisor is the sum of the agreeing inputs' weights (0 → 1).
    Each delta's agreement is `delta · sign > 0`, a 0/1 mask in the deltas' dtype, so the sums are
    mergekit's `Σ delta·mask` term for term (the products are exact). Half-precision sums accumulate
    in float32 and round once, as torch's `sum(dim=0)` over mergekit's stacked deltas does. Consumes
    `deltas`.
    """
    dtype = deltas[0].dtype
    accumulate = _accumulation_dtype(dtype)
    vote = _sum_in_order([deltas[0].clone(), *deltas[1:]])
    one = torch.ones((), dtype=dtype, device=vote.device)
    sign = torch.where(vote >= 0, one, -one)
    agreeing = vote  # the vote's buffer, reused for each delta's mask
    divisor = torch.zeros_like(vote, dtype=accumulate) if divisor_needed else None
    mixed = None if accumulate == dtype else torch.zeros_like(vote, dtype=accumulate)
    for index, delta in enumerate(deltas):
        torch.mul(delta, sign, out=agreeing).gt_(0)
        if divisor is not None:
            divisor.add_(agreeing, alpha=weights[index].item())
        mixed = delta.mul_(agreeing) if mixed is None else mixed.addcmul_(delta, agreeing)
        deltas[index] = None
    if divisor is not None:
        divisor = divisor.to(dtype)
        divisor.masked_fill_(divisor == 0, 1)
    return mixed.to(dtype), divisor


def _gta_params(normalize: bool, rescale: bool, extra: tuple[Param, ...] = ()) -> tuple[Param, ...]:
    return (
        Param("weight", float, per_input=True),
        Param("density", float, per_input=True, default=1.0),
        *extra,
        Param("normalize", bool, per_input=False, default=normalize),
        Param("rescale", bool, per_input=False, default=rescale),
        Param("lambda", float, per_input=False, default=1.0),
        Param("int8_mask", bool, per_input=False, default=False),
    )


GAMMA = Param("gamma", float, per_input=True, default=0.01)
EPSILON = Param("epsilon", float, per_input=True, default=0.15)

for _name, _consensus, _sparsify_kind, _normalize, _rescale, _extra in (
    ("task_arithmetic", False, None, False, False, ()),
    ("ties", True, "magnitude", True, False, ()),
    ("dare_ties", True, "random", False, True, ()),
    ("dare_linear", False, "random", False, True, ()),
    ("breadcrumbs", False, "magnitude_outliers", False, False, (GAMMA,)),
    ("breadcrumbs_ties", True, "magnitude_outliers", False, False, (GAMMA,)),
    ("della", True, "della", True, True, (EPSILON,)),
    ("della_linear", False, "della", False, True, (EPSILON,)),
):
    register(
        MergeMethod(
            _name,
            task_arithmetic_kernel(_consensus, _sparsify_kind),
            _gta_params(_normalize, _rescale, _extra),
            needs_base=True,
            random=_sparsify_kind in ("random", "della"),
            extra={"consensus": _consensus, "sparsification": _sparsify_kind},
        )
    )


# ---- linear -------------------------------------------------------------------------------------


def linear_kernel(base, inputs, shared, per_input, ctx):
    """Σ wᵢ·xᵢ (/ Σ wᵢ when normalize), accumulated in float32 (float64 for float64 inputs)."""
    first = inputs[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = torch.tensor([p["weight"] for p in per_input], dtype=dtype)
    result = torch.zeros(first.shape, dtype=dtype, device=first.device)
    for tensor, weight in zip(inputs, weights, strict=True):
        result.addcmul_(tensor, weight.to(first.device))
    if shared["normalize"]:
        result.div_(weights.sum().to(first.device))
    return result.to(first.dtype)


register(
    MergeMethod(
        "linear",
        linear_kernel,
        (Param("weight", float, per_input=True, non_base=False), Param("normalize", bool, per_input=False, default=True)),
        needs_base=False,
    )
)


# ---- SLERP --------------------------------------------------------------------------------------

SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8


def slerp_kernel(base, others, shared, per_input, ctx):
    """Spherical interpolation of the whole (flattened) tensor from the base (t=0) to the other
    input (t=1), in float32; linear when the two are (anti)parallel (|cos| > 0.9995)."""
    other = others[0]
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    a = base.reshape(-1).to(dtype)
    b = other.reshape(-1).to(dtype)
    t = torch.tensor(shared["t"], dtype=dtype)
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > SLERP_EPS, norm_a, torch.ones_like(norm_a))
    norm_b = torch.where(norm_b > SLERP_EPS, norm_b, torch.ones_like(norm_b))
    dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    if dot.abs() > SLERP_DOT_THRESHOLD:
        coef_a, coef_b = 1 - t, t
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a, coef_b = torch.sin((1 - t) * theta) / sin_theta, torch.sin(t * theta) / sin_theta
    return (coef_a * a + coef_b * b).reshape(base.shape)


register(
    MergeMethod(
        "slerp",
        slerp_kernel,
        (Param("t", float, per_input=False),),
        needs_base=True,
        min_inputs=2,
        max_inputs=2,
    )
)


# ---- Model Stock --------------------------------------------------------------------------------


def model_stock_kernel(base, others, shared, per_input, ctx):
    """Interpolate between the base and the fine-tunes' average by t = N·cos/(1 + (N−1)·cos), where
    cos is the mean pairwise cosine of the fine-tunes' deltas (per row with filter_wise)."""
    out_shape = base.shape
    if shared["filter_wise"]:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [w.unsqueeze(0) if w.dim() == 1 else w for w in others]
    else:
        w0 = base.reshape(-1)
        ws = [w.reshape(-1) for w in others]
    offsets = [w - w0 for w in ws]
    cosines = []
    for index, offset_a in enumerate(offsets):
        for offset_b in offsets[index + 1 :]:
            norms = torch.norm(offset_a, dim=-1) * torch.norm(offset_b, dim=-1)
            cosines.append(((offset_a * offset_b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    del offsets
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), (count * cos) / safe)
    average = sum(ws) / count
    return (t * average + (1 - t) * w0).reshape(out_shape)


register(
    MergeMethod(
        "model_stock",
        model_stock_kernel,
        (Param("filter_wise", bool, per_input=False, default=False),),
        needs_base=True,
        min_inputs=3,
    )
)


# ---- passthrough (layer stacking with slices) ---------------------------------------------------


def passthrough_kernel(base, inputs, shared, per_input, ctx):
    scale = per_input[0].get("scale")
    return inputs[0] if scale is None else inputs[0] * scale


register(
    MergeMethod(
        "passthrough",
        passthrough_kernel,
        (Param("scale", float, per_input=True, default=None, non_base=False),),
        needs_base=False,
        max_inputs=1,
    )
)


def method_names() -> list[str]:
    return sorted(METHODS)
