"""EvoPress: the exact target under mutation, SparseGPT, the three spaces from the CLI, resume, bad inputs.

Tiny random models (2-4 layers, hidden 64) and a small calibration text; every search runs a few
generations with a handful of offspring. Outputs are checked against the in-memory model the search
scored (same configuration applied), so the checkpoint really holds what the search chose.
"""

from __future__ import annotations

import json
import os
import random
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lctool.errors import LctoolError
from lctool.io import Checkpoint
from lctool.prune.evopress import EvoPressPruneOptions, run_evopress_prune
from lctool.prune.evopress.search import Search, SearchPlan
from lctool.prune.evopress.space import build_space, mutate, random_config
from lctool.quant.sparsegpt import magnitude_prune, sparsegpt_prune
from tests.tiny_models import save_tiny

SEARCH = ["--calib-n", "8", "--calib-len", "32", "--selection-tokens", "64,256", "--survivors", "2,1",
          "--offspring", "4"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("evopress")
    calib = root / "calib.txt"
    calib.write_text("Evolution keeps what works and drops what does not. " * 300)
    return {"root": root, "calib": str(calib), "tiny": save_tiny(str(root / "tiny")),
            "tiny4": save_tiny(str(root / "tiny4"), num_hidden_layers=4)}


def _args(work, *extra):
    return [*extra, "--calib", work["calib"], *SEARCH]


def _one_line_error(code, err):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err


def _manifest(path):
    with open(os.path.join(path, "lctool.json")) as f:
        return json.load(f)


# ---- the space: the target is exact under every mutation -----------------------------------------


@st.composite
def spaces(draw):
    num_levels = draw(st.integers(2, 6))
    step = Fraction(draw(st.sampled_from([1, 2, 5])), draw(st.sampled_from([1, 10, 100])))
    start = Fraction(draw(st.integers(0, 8)), 10)
    levels = [start + i * step for i in range(num_levels)]
    sizes = draw(st.lists(st.sampled_from([16, 64, 256]), min_size=2, max_size=12))
    by_size = {s: sizes.count(s) for s in sizes}
    # A reachable target: m/d level steps per unit, with d dividing every group's unit count.
    divisor = draw(st.sampled_from([d for d in range(1, 7) if all(c % d == 0 for c in by_size.values())]))
    steps = Fraction(draw(st.integers(0, (num_levels - 1) * divisor)), divisor)
    return build_space([f"u{i}" for i in range(len(sizes))], sizes, levels, start + steps * step)


@settings(max_examples=60, deadline=None)
@given(space=spaces(), seed=st.integers(0, 2**16), rounds=st.integers(1, 30), switches=st.integers(1, 5))
def test_every_mutation_meets_the_target_exactly(space, seed, rounds, switches):
    rng = random.Random(seed)
    config = random_config(space, rng)
    target = space.average(config)
    assert space.meets_target(config)
    for _ in range(rounds):
        child = mutate(space, config, rng, switches)
        assert space.meets_target(child)
        assert space.average(child) == target  # exactly, as fractions
        config = child


def test_unreachable_targets_are_refused():
    levels = [Fraction(i, 10) for i in range(10)]
    with pytest.raises(LctoolError, match="unreachable target 0.33"):
        build_space(["a", "b", "c"], [8, 8, 8], levels, Fraction("0.33"))
    with pytest.raises(LctoolError, match="unreachable target 0.95"):
        build_space(["a", "b"], [8, 8], levels, Fraction("0.95"))
    with pytest.raises(LctoolError, match="evenly spaced"):
        build_space(["a", "b"], [8, 8], [Fraction(2), Fraction(3), Fraction(4), Fraction(8)], Fraction(3))
    space = build_space(["a", "b", "c", "d"], [8, 8, 4, 4], levels, Fraction("0.55"))  # 0.5 + 0.6 per group
    assert space.group_sums == (11, 11)


def test_search_only_ever_scores_configurations_on_target():
    levels = [Fraction(b) for b in (2, 3, 4, 5)]
    space = build_space([f"m{i}" for i in range(9)], [64] * 6 + [16] * 3, levels, Fraction(3))
    seen = []

    def fitness(config, windows):
        seen.append(config)
        return sum((i + 1) * level for i, level in enumerate(config)) + len(windows) * 0.001

    plan = SearchPlan(generations=15, offspring=6, stage_windows=[2, 4], survivors=[2, 1], max_switches=3,
                      initial_candidates=3, num_windows=8, seed=3)
    state = Search(space, fitness, plan, None, {}).run()
    assert seen and all(space.meets_target(c) for c in seen)
    assert state["evaluated"] == len(seen)
    # The fitness prefers low levels on later units: the search moved away from the even start.
    assert state["history"][-1]["fitness"] < state["history"][0]["fitness"]


# ---- SparseGPT --------------------------------------------------------------------------------------


def test_sparsegpt_prunes_exactly_and_beats_magnitude_on_the_layer_output():
    torch.manual_seed(0)
    mixing = torch.randn(48, 48)
    x = torch.randn(512, 48) @ mixing  # correlated inputs: where the Hessian matters
    hessian = 2 * x.T @ x / x.shape[0]
    weight = torch.randn(40, 48)
    for sparsity in (0.3, 0.5, 0.7):
        ours = sparsegpt_prune(weight, hessian, sparsity, block_size=16)
        base = magnitude_prune(weight, sparsity)
        expected = round(weight.numel() * sparsity)
        assert int((ours.weight == 0).sum()) == expected == ours.pruned
        assert int((base.weight == 0).sum()) == expected
        error = ((x @ (weight - ours.weight).T).square().sum() / (x @ weight.T).square().sum()).item()
        error_magnitude = ((x @ (weight - base.weight).T).square().sum() / (x @ weight.T).square().sum()).item()
        assert error < 0.8 * error_magnitude, (sparsity, error, error_magnitude)


# ---- blocks -----------------------------------------------------------------------------------------


def _reference_model(path):
    from lctool.io.hf import load_causal_lm

    return load_causal_lm(path)


def _apply_blocks(path, dropped):
    """The dense model with the given sub-blocks dropped in memory (what the search scored)."""
    from lctool.prune.evopress import modeling_dropped

    model = _reference_model(path)
    arch = Checkpoint(path).arch
    layers = model.get_submodule(arch.family.layers)
    sublayers = {k: arch.sublayer_path(k) for k in ("attn", "mlp")}
    norms = {k: arch.sublayer_norm_path(k) for k in ("attn", "mlp")}
    for kind, indices in dropped.items():
        for index in indices:
            modeling_dropped.drop_sublayer(layers[index], kind, index, sublayers, norms)
    return model


IDS = torch.arange(96).reshape(3, 32) * 7 % 256


def test_blocks_whole_layers_give_a_stock_model(work, run_cli, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    code, stdout, err = run_cli("--quiet", "prune", work["tiny4"], out, "--method", "evopress", "--space", "blocks",
                                "--block-unit", "layer", "--target", "0.5", "--generations", "2",
                                "--state", tmp_path / "s.json", *_args(work), "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    removed = summary["layers_removed"]
    assert len(removed) == 2 and summary["stock_loadable"] and summary["num_layers"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and "auto_map" not in config
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # stock class, no remote code
    reference = _apply_blocks(work["tiny4"], {"attn": removed, "mlp": removed})
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits)
    assert _manifest(out)["results"]["layers_removed"] == removed


def test_blocks_sublayers_use_flags_and_generate_with_the_cache(work, run_cli, tmp_path):
    from lctool.eval import load_for_eval
    from lctool.io import CheckpointWriter
    from lctool.prune.evopress import output

    out = tmp_path / "out"
    code, stdout, err = run_cli("--quiet", "prune", work["tiny4"], out, "--method", "evopress", "--space", "blocks",
                                "--target", "1", "--generations", "2", "--state", tmp_path / "s.json",
                                *_args(work), "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    # One attention and one MLP block go (a whole layer when they share one).
    assert sum(level for level in summary["levels"].values()) == 2
    model, _ = load_for_eval(str(out), trust_remote_code=True)
    dropped = {k: [int(u.split(".")[1]) for u, level in summary["levels"].items() if level and u.startswith(k)]
               for k in ("attn", "mlp")}
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, _apply_blocks(work["tiny4"], dropped)(IDS).logits)

    # Attention gone from layer 0 (the layer generation asks for the cache length) and an MLP elsewhere.
    chosen = {"attn": [0], "mlp": [2]}
    flagged = tmp_path / "flagged"
    checkpoint = Checkpoint(work["tiny4"])
    with CheckpointWriter(str(flagged), operation="prune", inputs=[checkpoint]) as writer:
        output.write_blocks(checkpoint, writer, chosen)
    assert not any(".layers.0.self_attn." in n or ".layers.2.mlp." in n for n in Checkpoint(str(flagged)).tensor_names())
    model, _ = load_for_eval(str(flagged), trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, _apply_blocks(work["tiny4"], chosen)(IDS).logits)
        cached = model.generate(IDS[:1, :8], max_new_tokens=12, do_sample=False, use_cache=True)
        uncached = model.generate(IDS[:1, :8], max_new_tokens=12, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()


# ---- sparsity ---------------------------------------------------------------------------------------


def test_sparsity_meets_the_average_and_writes_dense_zeros(work, run_cli, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run_cli("--quiet", "prune", work["tiny"], out, "--method", "evopress", "--space", "sparsity",
                                "--target", "0.5", "--sparsity-method", "magnitude", "--generations", "3",
                                "--database", tmp_path / "db", *_args(work), "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["average_level_exact"] == "1/2"
    checkpoint = Checkpoint(str(out))
    assert not checkpoint.is_quantized and "auto_map" not in checkpoint.config
    total = zeros = 0
    for module, record in _manifest(out)["results"]["modules"].items():
        weight = checkpoint.get(module + ".weight")
        numel = weight.numel()
        assert int((weight == 0).sum()) == round(numel * record["level"])  # magnitude: exactly the level
        total, zeros = total + numel, zeros + numel * Fraction(str(record["level"]))
    assert zeros / total == Fraction(1, 2)  # size-weighted: the target, exactly


def test_sparsegpt_levels_from_the_cli(work, run_cli, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run_cli("--quiet", "prune", work["tiny"], out, "--method", "evopress", "--space", "sparsity",
                                "--target", "0.5", "--levels", "0.25,0.5,0.75", "--generations", "2",
                                "--database", tmp_path / "db", *_args(work), "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["sparsity_method"] == "sparsegpt" and summary["average_level"] == 0.5
    assert abs(summary["measured_sparsity"] - 0.5) < 1e-3
    assert summary["kl_final"] <= summary["kl_initial"] * 1.5  # scored on the same windows; elitist search


# ---- bits -------------------------------------------------------------------------------------------


def test_bits_search_writes_gptq_with_per_module_bits(work, run_cli, tmp_path):
    from lctool.eval import load_for_eval
    from lctool.prune.evopress.database import open_database
    from lctool.quant import formats

    out = tmp_path / "out"
    code, stdout, err = run_cli("--quiet", "quantize", work["tiny"], out, "--search", "evopress", "--bits-choices",
                                "2,3,4", "--target-bits", "3", "--group-size", "32", "--generations", "3",
                                "--database", tmp_path / "db", *_args(work), "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    checkpoint = Checkpoint(str(out), check_shapes=False)
    qconfig = checkpoint.quantization_config
    assert qconfig["quant_method"] == "gptq" and qconfig["bits"] == summary["base_bits"]
    source = Checkpoint(work["tiny"])
    bits_sum = params = 0
    for module, record in summary["modules"].items():
        assert formats.gptq_module_bits(qconfig, module) == record["bits"]
        numel = source.entry(module + ".weight").numel
        bits_sum, params = bits_sum + numel * record["bits"], params + numel
    assert Fraction(bits_sum, params) == 3
    # lctool's reader of the written file computes what the search scored.
    model, _ = load_for_eval(str(out))
    database = open_database(summary["database"], json.load(open(os.path.join(summary["database"], "database.json"))),
                             source, [Fraction(b) for b in (2, 3, 4)])
    reference = _reference_model(work["tiny"])
    with torch.no_grad():
        for module, record in summary["modules"].items():
            reference.get_submodule(module).weight.copy_(database.weight(module, Fraction(record["bits"])))
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits)


# ---- resume -----------------------------------------------------------------------------------------


def test_an_interrupted_search_resumes_to_the_same_result(work, tmp_path):
    common = dict(space="sparsity", target=0.4, sparsity_method="magnitude", generations=5, database=str(tmp_path / "db"),
                  calib=work["calib"], calib_n=8, calib_len=32, selection_tokens=[64, 256], survivors=[2, 1],
                  offspring=4, initial_candidates=2, seed=7)
    whole = run_evopress_prune(work["tiny"], str(tmp_path / "whole"),
                               EvoPressPruneOptions(**common, state=str(tmp_path / "whole.json")))

    def stop_after_two(record):
        if record["generation"] == 2:
            raise KeyboardInterrupt

    options = EvoPressPruneOptions(**common, state=str(tmp_path / "cut.json"))
    with pytest.raises(KeyboardInterrupt):
        run_evopress_prune(work["tiny"], str(tmp_path / "cut"), options, on_generation=stop_after_two)
    assert not os.path.exists(tmp_path / "cut")  # nothing half-written
    assert json.load(open(tmp_path / "cut.json"))["generation"] == 2
    resumed = run_evopress_prune(work["tiny"], str(tmp_path / "cut"), options)
    assert resumed["levels"] == whole["levels"]

    def path(history):
        return [{k: v for k, v in record.items() if k != "seconds"} for record in history]

    assert path(resumed["history"]) == path(whole["history"])
    assert resumed["kl_final"] == whole["kl_final"] and resumed["evaluated"] == whole["evaluated"]


# ---- bad inputs -------------------------------------------------------------------------------------


def test_bad_inputs_are_one_line_errors(work, run_cli, tmp_path):
    base = ["prune", work["tiny"], tmp_path / "out", "--method", "evopress"]
    cases = [
        ([*base, "--space", "blocks", "--target", "0.3"], "unreachable target"),
        ([*base, "--space", "sparsity", "--target", "0.33", "--sparsity-method", "magnitude"], "unreachable target"),
        (["quantize", work["tiny"], tmp_path / "out", "--search", "evopress", "--bits-choices", "2,3,4",
          "--target-bits", "5", "--group-size", "32"], "unreachable target"),
        (["quantize", work["tiny"], tmp_path / "out", "--search", "evopress", "--bits-choices", "2,3,5",
          "--target-bits", "3", "--group-size", "32"], "GPTQ format stores"),
        ([*base, "--space", "blocks", "--target", "1", "--database", tmp_path], "do not apply to --space blocks"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append(([*base, "--space", "sparsity", "--target", "0.5", "--sparsity-method", "magnitude",
                   "--database", empty], "is empty"))
    for args, message in cases:
        code, _, err = run_cli(*args, *_args(work))
        _one_line_error(code, err)
        assert message in err, err
        assert not os.path.exists(tmp_path / "out")


def test_a_database_of_another_model_is_refused(work, run_cli, tmp_path):
    database = tmp_path / "db"
    code, _, err = run_cli("--quiet", "prune", work["tiny"], tmp_path / "a", "--method", "evopress", "--space",
                           "sparsity", "--target", "0.5", "--sparsity-method", "magnitude", "--generations", "0",
                           "--database", database, *_args(work))
    assert code == 0, err
    other = save_tiny(str(tmp_path / "other"), seed=1)
    code, _, err = run_cli("prune", other, tmp_path / "b", "--method", "evopress", "--space", "sparsity", "--target",
                           "0.5", "--sparsity-method", "magnitude", "--database", database, *_args(work))
    _one_line_error(code, err)
    assert "built from another model" in err and not os.path.exists(tmp_path / "b")
    code, _, err = run_cli("prune", work["tiny"], tmp_path / "c", "--method", "evopress", "--space", "sparsity",
                           "--target", "0.5", "--database", database, *_args(work))  # sparsegpt != magnitude
    _one_line_error(code, err)
    assert "other settings" in err
