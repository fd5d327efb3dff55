"""The acceptance: the same YAML through mergekit 0.1.5 and lctool gives the same tensors.

mergekit runs from its side environment (bench/setup_mergekit.sh), all merges of a module in one
process. Deterministic methods must agree within 1e-6 in fp32 (they agree bit for bit). DARE and
DELLA are compared mask for mask in lctool's `mergekit` seeding mode, which replays mergekit's draw
order; their laws in the default per-tensor mode are tested in test_merge_methods.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from lctool.merge import MergeOptions, merge
from tests.test_merge_support import (
    MERGEKIT_MISSING,
    load_tensors,
    max_abs_diff,
    mergekit_available,
    run_mergekit_batch,
    save_extended_vocab,
    save_finetunes,
    write_yaml,
)

pytestmark = pytest.mark.skipif(not mergekit_available(), reason=MERGEKIT_MISSING)

TOLERANCE = 1e-6
SEED = 7


def _gta(method, m, dtype="float32", **params):
    first = {"weight": 1.0, "density": 0.4, **params}
    second = {"weight": [0.3, 0.9], "density": [{"filter": "mlp", "value": 0.7}, {"value": 0.5}]}
    if "epsilon" in params:
        second["epsilon"] = 0.1
    if "gamma" in params:
        second["gamma"] = 0.02
    return {
        "merge_method": method,
        "base_model": m["base"],
        "models": [{"model": m["ft1"], "parameters": first}, {"model": m["ft2"], "parameters": second}],
        "dtype": dtype,
    }


def tiny_cases(m: dict) -> dict[str, dict]:
    two = [{"model": m["ft1"], "parameters": {"weight": 0.6}}, {"model": m["ft2"], "parameters": {"weight": 0.4}}]
    return {
        "linear": {"merge_method": "linear", "models": two, "dtype": "float32"},
        "linear_unnormalized_gradient": {
            "merge_method": "linear",
            "models": [{"model": m["ft1"], "parameters": {"weight": [0.1, 1.0]}}, two[1]],
            "parameters": {"normalize": False},
            "dtype": "float32",
        },
        "task_arithmetic": {**_gta("task_arithmetic", m), "parameters": {"lambda": 1.3}},
        "ties": _gta("ties", m),
        "ties_bf16": _gta("ties", m, dtype="bfloat16"),
        "breadcrumbs": _gta("breadcrumbs", m, gamma=0.05),
        "breadcrumbs_ties": _gta("breadcrumbs_ties", m, gamma=0.05),
        "slerp": {
            "merge_method": "slerp",
            "base_model": m["base"],
            "models": [{"model": m["base"]}, {"model": m["far"]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.3}]},
            "dtype": "float32",
        },
        "model_stock": {"merge_method": "model_stock", "base_model": m["base"],
                        "models": [{"model": m["ft1"]}, {"model": m["ft2"]}], "dtype": "float32"},
        "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": m["base"],
                                    "models": [{"model": m["ft1"]}, {"model": m["ft2"]}, {"model": m["far"]}],
                                    "parameters": {"filter_wise": True}, "dtype": "float32"},
        "dare_ties": _gta("dare_ties", m),
        "dare_linear": _gta("dare_linear", m),
        "dare_ties_bf16": {**_gta("dare_ties", m, dtype="bfloat16"), "out_dtype": "float32"},
        "della": _gta("della", m, epsilon=0.15),
        "della_linear": _gta("della_linear", m, epsilon=0.15),
        "tokenizer_union": {**_gta("ties", m), "tokenizer_source": "union",
                            "models": [{"model": m["ft1"], "parameters": {"weight": 1.0, "density": 0.5}},
                                       {"model": m["ext"], "parameters": {"weight": 0.5, "density": 0.5}}]},
        "tokenizer_base": {"merge_method": "task_arithmetic", "base_model": m["base"], "tokenizer_source": "base",
                           "models": [{"model": m["ft1"], "parameters": {"weight": 1.0}},
                                      {"model": m["ext"], "parameters": {"weight": 0.5}}], "dtype": "float32"},
        "tokenizer_model_padded": {"merge_method": "linear", "dtype": "float32",
                                   "models": [two[0], {"model": m["ext"], "parameters": {"weight": 0.4}}],
                                   "tokenizer": {"source": m["ext"], "pad_to_multiple_of": 8}},
        "slices_passthrough": {"merge_method": "passthrough", "dtype": "float32", "slices": [
            {"sources": [{"model": m["ft1"], "layer_range": [0, 2]}]},
            {"sources": [{"model": m["ft2"], "layer_range": [1, 2], "parameters": {"scale": 0.5}}]},
        ]},
        "slices_ties": {"merge_method": "ties", "base_model": m["base"], "dtype": "float32", "slices": [
            {"sources": [{"model": m["base"], "layer_range": [0, 2]},
                         {"model": m["ft1"], "layer_range": [0, 2], "parameters": {"weight": 1.0, "density": 0.3}},
                         {"model": m["ft2"], "layer_range": [0, 2], "parameters": {"weight": [1.0, 0.2], "density": 0.6}}]},
        ]},
    }


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("mergekit-eq"))
    base, ft1, ft2 = save_finetunes(folder, count=2)
    far = save_finetunes(os.path.join(folder, "far"), count=1, scale=0.6, seed=0)[1]
    ext = save_extended_vocab(ft2, os.path.join(folder, "ext"), ["<extra1>", "<extra2>", "zzq"])
    models = {"base": base, "ft1": ft1, "ft2": ft2, "far": far, "ext": ext}
    cases = tiny_cases(models)
    jobs = []
    for name, config in cases.items():
        path = write_yaml(os.path.join(folder, f"{name}.yml"), config)
        jobs.append((path, os.path.join(folder, f"mk-{name}"), SEED))
    run_mergekit_batch(jobs)
    return folder, cases


@pytest.mark.slow
@pytest.mark.parametrize("case", list(tiny_cases({k: k for k in ("base", "ft1", "ft2", "far", "ext")})))
def test_lctool_equals_mergekit(tiny_runs, case):
    folder, _ = tiny_runs
    config = os.path.join(folder, f"{case}.yml")
    ours = os.path.join(folder, f"lc-{case}")
    merge(config, ours, MergeOptions(seed=SEED, seed_mode="mergekit"), force=True)
    theirs = load_tensors(os.path.join(folder, f"mk-{case}"))
    mine = load_tensors(ours)
    diff, where = max_abs_diff(theirs, mine)
    assert diff <= TOLERANCE, f"{case}: max abs diff {diff} at {where}"
    assert {n: t.dtype for n, t in theirs.items()} == {n: t.dtype for n, t in mine.items()}


@pytest.mark.slow
def test_output_config_and_tokenizer_match_mergekit(tiny_runs):
    import json

    from transformers import AutoTokenizer

    folder, _ = tiny_runs
    for case in ("tokenizer_union", "tokenizer_model_padded", "slices_passthrough"):
        ours = os.path.join(folder, f"lc-{case}")
        if not os.path.exists(ours):
            merge(os.path.join(folder, f"{case}.yml"), ours, MergeOptions(seed=SEED, seed_mode="mergekit"))
        with open(os.path.join(folder, f"mk-{case}", "config.json")) as f:
            theirs = json.load(f)
        with open(os.path.join(ours, "config.json")) as f:
            mine = json.load(f)
        for key in ("vocab_size", "num_hidden_layers", "hidden_size"):
            assert mine[key] == theirs[key], (case, key)
        their_vocab = AutoTokenizer.from_pretrained(os.path.join(folder, f"mk-{case}")).get_vocab()
        assert AutoTokenizer.from_pretrained(ours).get_vocab() == their_vocab, case


@pytest.mark.slow
def test_default_tensor_seeding_differs_from_mergekit_stream_but_keeps_the_law(tiny_runs):
    folder, _ = tiny_runs
    ours = os.path.join(folder, "lc-dare-tensor-mode")
    merge(os.path.join(folder, "dare_linear.yml"), ours, MergeOptions(seed=SEED), force=True)
    base = load_tensors(os.path.join(folder, "base"))
    theirs = load_tensors(os.path.join(folder, "mk-dare_linear"))
    mine = load_tensors(ours)
    name = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(mine[name], theirs[name])
    kept_mine = (mine[name] - base[name]) != 0
    kept_theirs = (theirs[name] - base[name]) != 0
    # Two independent masks of one law: similar kept fractions.
    assert abs(kept_mine.float().mean().item() - kept_theirs.float().mean().item()) < 0.05


# ---- the testbed: a base and two fine-tunes of it ----------------------------------------------


@pytest.mark.testbed
@pytest.mark.slow
def test_testbed_merges_equal_mergekit(testbed_dir, tmp_path):
    from tests.test_merge_support import save_checkpoint_finetunes

    base, ft1, ft2, far = save_checkpoint_finetunes(testbed_dir, str(tmp_path), scales=(0.02, 0.03, 0.6))
    m = {"base": base, "ft1": ft1, "ft2": ft2, "far": far}
    cases = {
        "ties": _gta("ties", m),
        "dare_ties": _gta("dare_ties", m),
        "task_arithmetic": _gta("task_arithmetic", m),
        "breadcrumbs": _gta("breadcrumbs", m, gamma=0.05),
        "linear": {"merge_method": "linear", "dtype": "float32",
                   "models": [{"model": ft1, "parameters": {"weight": 0.6}}, {"model": ft2, "parameters": {"weight": 0.4}}]},
        "slerp": {"merge_method": "slerp", "base_model": base, "dtype": "float32",
                  "models": [{"model": base}, {"model": far}], "parameters": {"t": [0.2, 0.7]}},
        "model_stock": {"merge_method": "model_stock", "base_model": base, "dtype": "float32",
                        "models": [{"model": ft1}, {"model": ft2}]},
        "della": _gta("della", m, epsilon=0.1),
    }
    jobs = [(write_yaml(str(tmp_path / f"{n}.yml"), c), str(tmp_path / f"mk-{n}"), SEED) for n, c in cases.items()]
    run_mergekit_batch(jobs)
    for name in cases:
        ours = str(tmp_path / f"lc-{name}")
        merge(str(tmp_path / f"{name}.yml"), ours, MergeOptions(seed=SEED, seed_mode="mergekit"))
        diff, where = max_abs_diff(load_tensors(str(tmp_path / f"mk-{name}")), load_tensors(ours))
        assert diff <= TOLERANCE, f"{name}: max abs diff {diff} at {where}"
