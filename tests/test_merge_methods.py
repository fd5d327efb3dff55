"""Merge kernels and masks on plain tensors: the laws of DARE/DELLA, TIES trimming, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from lctool.merge import sortorder, sparsify
from lctool.merge.config import ConditionalParameter, evaluate_setting
from lctool.merge.methods import KernelContext, get_method
from lctool.merge.run import MaskRandomness, tensor_seed


def _delta(shape=(64, 96), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.01


# ---- DARE: the law of the masks -----------------------------------------------------------------


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_kept_fraction_within_three_sigma(density):
    delta = _delta((256, 256))
    kept = sparsify.random_drop(delta, density, torch.Generator().manual_seed(3), rescale=True,
                                rule="inverse_density", mergekit_stream=False)
    n = delta.numel()
    fraction = (kept != 0).sum().item() / n
    sigma = math.sqrt(density * (1 - density) / n)
    assert abs(fraction - density) <= 3 * sigma


def test_dare_inverse_density_rescales_survivors_by_exactly_one_over_density():
    delta = _delta()
    density = 0.3
    kept = sparsify.random_drop(delta, density, torch.Generator().manual_seed(1), rescale=True,
                                rule="inverse_density", mergekit_stream=False)
    survivors = kept != 0
    assert survivors.any()
    assert torch.equal(kept[survivors], delta[survivors] / density)


def test_dare_expectation_over_seeds_is_the_undropped_delta():
    delta = _delta((32, 32))
    density, seeds = 0.4, 2000
    total = torch.zeros_like(delta, dtype=torch.float64)
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(tensor_seed(seed, "w"))
        total += sparsify.random_drop(delta, density, generator, rescale=True, rule="inverse_density",
                                      mergekit_stream=False).double()
    mean = total / seeds
    # Each element's estimate has std |δ|·sqrt((1-p)/p / seeds); allow 4 of them (1024 elements).
    bound = 4 * delta.abs().double() * math.sqrt((1 - density) / density / seeds) + 1e-12
    assert ((mean - delta.double()).abs() <= bound).all()


def test_dare_l1_rule_preserves_the_l1_norm():
    delta = _delta()
    kept = sparsify.random_drop(delta, 0.25, torch.Generator().manual_seed(2), rescale=True, rule="l1",
                                mergekit_stream=False)
    assert kept.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)
    assert ((kept == 0) | (delta != 0)).all()


def test_dare_density_one_draws_nothing():
    delta = _delta()
    generator = torch.Generator().manual_seed(4)
    state = generator.get_state()
    out = sparsify.random_drop(delta, 1.0, generator, rescale=True, rule="l1", mergekit_stream=True)
    assert out is delta and torch.equal(generator.get_state(), state)


def test_mergekit_stream_draws_like_torch_bernoulli_on_the_global_generator():
    delta = _delta()
    torch.manual_seed(11)
    expected_mask = torch.bernoulli(torch.full_like(delta, 0.5))
    kept = sparsify.random_drop(delta, 0.5, torch.Generator().manual_seed(11), rescale=False, rule="l1",
                                mergekit_stream=True)
    assert torch.equal(kept != 0, (expected_mask != 0) & (delta != 0))


# ---- DELLA ---------------------------------------------------------------------------------------


def test_della_probabilities_follow_magnitude_rank():
    delta = _delta((8, 50))
    probabilities = sparsify.della_probabilities(delta, 0.5, 0.2, torch.float32)
    order = delta.abs().argsort(dim=1)
    ranked = probabilities.gather(1, order)
    assert torch.allclose(ranked[:, 0], torch.full((8,), 0.3))
    assert torch.allclose(ranked[:, -1], torch.full((8,), 0.7))
    assert (ranked[:, 1:] >= ranked[:, :-1]).all()


def test_della_inverse_rule_divides_each_survivor_by_its_probability():
    delta = _delta((16, 64))
    probabilities = sparsify.della_probabilities(delta, 0.5, 0.1, torch.float32)
    kept = sparsify.della_drop(delta, 0.5, 0.1, torch.Generator().manual_seed(9), rescale=True,
                               rule="inverse_density", mergekit_stream=False)
    survivors = kept != 0
    assert torch.allclose(kept[survivors], delta[survivors] / probabilities[survivors])
    fraction = survivors.float().mean().item()
    assert abs(fraction - 0.5) < 3 * math.sqrt(0.25 / delta.numel()) + 0.01


# ---- TIES / breadcrumbs trimming ----------------------------------------------------------------


def _argsort_mask(delta, density):
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]] = True
    return mask.reshape(delta.shape)


@pytest.mark.parametrize("density", [0.01, 0.3, 0.77])
def test_magnitude_mask_equals_mergekit_argsort_without_ties(density):
    delta = _delta()
    assert torch.equal(sparsify.magnitude_mask(delta, density, "argsort"), _argsort_mask(delta, density))


def test_magnitude_mask_reproduces_argsort_tie_order_when_ties_straddle_the_cut():
    delta = (torch.randint(-6, 7, (40, 50), generator=torch.Generator().manual_seed(0)) / 8.0).to(torch.bfloat16)
    for density in (0.2, 0.45, 0.6):
        assert torch.equal(sparsify.magnitude_mask(delta, density, "argsort"), _argsort_mask(delta, density))


def test_index_tie_break_keeps_exactly_k_with_lowest_indices():
    delta = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.5])
    mask = sparsify.magnitude_mask(delta, 0.5, "index")  # k = 3: 3.0 and the first two 2.0s
    assert mask.tolist() == [True, False, True, True, False, False]


def test_outlier_mask_matches_mergekit_sort_slice():
    delta = _delta()
    n = delta.numel()
    density, gamma = 0.6, 0.05
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    expected = torch.zeros(n, dtype=torch.bool)
    expected[torch.sort(delta.abs().reshape(-1), descending=False).indices[bottom : bottom + target]] = True
    assert torch.equal(sparsify.outlier_mask(delta, density, gamma, "argsort").reshape(-1), expected)


def _sort_slice(values, low, high, descending):
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[torch.sort(values, descending=descending).indices[low:high]] = True
    return mask


@pytest.mark.parametrize("descending", [True, False])
def test_sorted_slice_replay_equals_torch_sort_with_many_ties(descending):
    generator = torch.Generator().manual_seed(1)
    for n in (1, 2, 15, 16, 17, 33, 200, 5000):
        for levels in (1, 2, 5, 1000):
            values = torch.randint(0, levels, (n,), generator=generator).float() / 4
            for low, high in ((0, max(1, n // 3)), (n // 4, n - n // 5), (0, n), (n - 1, n)):
                expected = _sort_slice(values, low, high, descending)
                assert torch.equal(sortorder.sorted_slice_mask(values, low, high, descending), expected), (n, levels, low, high)


def test_sorted_slice_replay_on_float32_deltas_and_special_values():
    # A fine-tune's delta rounded to float32 holds runs of equal magnitudes around any cut.
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(300_000, generator=generator) * 0.02
    magnitudes = ((base + torch.randn(300_000, generator=generator) * 4e-4) - base).abs()
    k = int(0.3 * magnitudes.numel())
    assert torch.equal(sortorder.sorted_slice_mask(magnitudes, 0, k, True), _sort_slice(magnitudes, 0, k, True))
    for nan in ([], [float("nan")]):
        special = torch.tensor([0.0, -0.0, float("inf"), 1.0, *nan, 1.0, 0.0, float("-inf")] * 5)
        for low, high in ((0, 7), (3, 30)):
            for descending in (True, False):
                expected = _sort_slice(special, low, high, descending)
                assert torch.equal(sortorder.sorted_slice_mask(special, low, high, descending), expected)


@pytest.mark.parametrize("descending", [True, False])
def test_sorted_slice_falls_back_to_the_real_sort_where_introsort_would_use_heapsort(monkeypatch, descending):
    values = torch.randint(0, 3, (4000,), generator=torch.Generator().manual_seed(3)).float()
    monkeypatch.setattr(sortorder, "introsort_depth_limit", lambda n: 1)
    expected = _sort_slice(values, 100, 2100, descending)
    assert torch.equal(sortorder.sorted_slice_mask(values, 100, 2100, descending), expected)


# ---- kernels ------------------------------------------------------------------------------------


def _run(method, base, others, shared, per_input, generator=None):
    ctx = KernelContext("t", generator=generator)
    return get_method(method).kernel(base, [o.clone() for o in others], shared, per_input, ctx)


def test_ties_elects_sign_and_averages_agreeing_deltas():
    base = torch.zeros(4)
    a = torch.tensor([1.0, -2.0, 3.0, 0.0])
    b = torch.tensor([3.0, 1.0, -1.0, 0.0])
    shared = {"normalize": True, "rescale": False, "lambda": 1.0, "int8_mask": False}
    params = [{"weight": 1.0, "density": 1.0}, {"weight": 1.0, "density": 1.0}]
    merged = _run("ties", base, [a, b], shared, params)
    # element 0: both +, mean 2; element 1: vote -1 -> keep -2 only; element 2: vote +2 -> keep 3; 3: none.
    assert merged.tolist() == [2.0, -2.0, 3.0, 0.0]


def _stacked_combination(base, others, weights, consensus: bool, normalize: bool):
    """mergekit 0.1.5's combination step written out on stacked tensors (what lctool must equal)."""
    dtype = base.dtype
    stacked = torch.stack([o - base for o in others])
    weight = torch.tensor(weights, dtype=dtype).unsqueeze(-1)
    weighted = stacked * weight
    if consensus:
        majority = (weighted.sum(dim=0) >= 0).to(dtype) * 2 - 1
        mask = weighted.sign().to(dtype) == majority
        mixed, divisor = (weighted * mask).sum(dim=0), (weight * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = weighted.sum(dim=0), weight.sum(dim=0)
    return (base + (mixed / divisor if normalize else mixed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_combination_equals_stacked_sums_bit_for_bit_for_two_to_four_inputs(dtype, method):
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(20_000, generator=generator).to(dtype)
    weights = [0.6, 0.4, 0.25, 1.3]
    normalize = method == "ties"
    shared = {"normalize": normalize, "rescale": False, "lambda": 1.0, "int8_mask": False}
    for count in (2, 3, 4):
        # Sparse deltas: zeros must never count as agreeing, and many elements have mixed signs.
        others = [(base.float() + torch.randn(20_000, generator=generator) * (torch.rand(20_000, generator=generator) > 0.4)).to(dtype)
                  for _ in range(count)]
        params = [{"weight": w, "density": 1.0} for w in weights[:count]]
        merged = _run(method, base, others, shared, params)
        expected = _stacked_combination(base, others, weights[:count], consensus=method == "ties", normalize=normalize)
        assert torch.equal(merged, expected), (count, (merged.float() - expected.float()).abs().max())


def test_task_arithmetic_is_base_plus_weighted_deltas():
    base = torch.ones(3)
    a, b = torch.tensor([2.0, 1.0, 0.0]), torch.tensor([1.0, 3.0, 1.0])
    shared = {"normalize": False, "rescale": False, "lambda": 2.0, "int8_mask": False}
    merged = _run("task_arithmetic", base, [a, b], shared, [{"weight": 0.5, "density": 1.0}, {"weight": 1.0, "density": 1.0}])
    assert torch.allclose(merged, base + 2.0 * (0.5 * (a - base) + 1.0 * (b - base)))


def test_slerp_ends_and_midpoint():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    assert torch.allclose(_run("slerp", a, [b], {"t": 0.0}, [{}]), a)
    assert torch.allclose(_run("slerp", a, [b], {"t": 1.0}, [{}]), b)
    middle = _run("slerp", a, [b], {"t": 0.5}, [{}])
    assert torch.allclose(middle, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))


def test_model_stock_of_identical_finetunes_is_the_finetune():
    base = torch.zeros(10)
    ft = torch.linspace(-1, 1, 10)
    merged = _run("model_stock", base, [ft, ft.clone()], {"filter_wise": False}, [{}, {}])
    assert torch.allclose(merged, ft)


def test_linear_normalizes_weights():
    a, b = torch.ones(3), torch.full((3,), 3.0)
    merged = _run("linear", None, [a, b], {"normalize": True}, [{"weight": 1.0}, {"weight": 3.0}])
    assert torch.allclose(merged, torch.full((3,), 2.5))


# ---- seeding and thread independence ------------------------------------------------------------


def test_tensor_seeds_depend_on_seed_and_name_only():
    randomness = MaskRandomness(5, "tensor")
    first = torch.rand(4, generator=randomness.for_tensor("a"))
    again = torch.rand(4, generator=MaskRandomness(5, "tensor").for_tensor("a"))
    other = torch.rand(4, generator=randomness.for_tensor("b"))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_dare_ties_bytes_do_not_depend_on_thread_count():
    base = _delta((300, 700), seed=1)
    others = [base + _delta((300, 700), seed=s) for s in (2, 3)]
    shared = {"normalize": False, "rescale": True, "lambda": 1.0, "int8_mask": False}
    params = [{"weight": 1.0, "density": 0.3}, {"weight": 0.7, "density": 0.6}]
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            generator = MaskRandomness(3, "tensor").for_tensor("w")
            results.append(_run("dare_ties", base, others, shared, params, generator))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_stable_abs_sum_is_exact_enough_and_thread_independent():
    x = _delta((1000, 300), seed=4)
    sums = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            sums.append(sparsify.stable_abs_sum(x))
    finally:
        torch.set_num_threads(before)
    assert sums[0] == sums[1]
    assert sums[0] == pytest.approx(x.double().abs().sum().item(), rel=1e-12)


# ---- parameter settings -------------------------------------------------------------------------


def test_gradient_interpolates_across_layers():
    setting = [0.0, 1.0, 0.0]
    assert evaluate_setting("x", setting, 0.0, float) == 0.0
    assert evaluate_setting("x", setting, 0.25, float) == pytest.approx(0.5)
    assert evaluate_setting("x", setting, 0.5, float) == 1.0
    assert evaluate_setting("x", setting, 1.0, float) == 0.0


def test_filters_pick_the_first_matching_condition():
    setting = [ConditionalParameter(filter="self_attn", value=0.1), ConditionalParameter(value=[0.0, 1.0])]
    assert evaluate_setting("model.layers.0.self_attn.q_proj.weight", setting, 0.5, float) == 0.1
    assert evaluate_setting("model.layers.0.mlp.up_proj.weight", setting, 0.5, float) == 0.5
