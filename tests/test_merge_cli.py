"""`lctool merge` end to end on tiny models: outputs, determinism, and every bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.test_merge_support import load_tensors, save_finetunes, write_yaml


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge-models")
    base, ft1, ft2 = save_finetunes(str(folder), count=2)
    return {"base": base, "ft1": ft1, "ft2": ft2, "folder": str(folder)}


def _dare_config(models, **overrides):
    config = {
        "merge_method": "dare_ties",
        "base_model": models["base"],
        "models": [
            {"model": models["ft1"], "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": models["ft2"], "parameters": {"weight": 0.5, "density": 0.7}},
        ],
        "dtype": "float32",
    }
    config.update(overrides)
    return config


def _assert_failed(run_cli, args, *needles, target=None):
    code, out, err = run_cli(*args)
    assert code == 2, (code, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    if target is not None:
        assert not os.path.exists(target)
        parent = os.path.dirname(target)
        assert not [f for f in os.listdir(parent) if ".lctool-tmp-" in f]
    return err


# ---- outputs ------------------------------------------------------------------------------------


def test_yaml_merge_writes_a_checkpoint_that_stock_transformers_loads(models, tmp_path, run_cli):
    from transformers import AutoModelForCausalLM

    config = write_yaml(str(tmp_path / "m.yml"), _dare_config(models))
    out = tmp_path / "out"
    code, stdout, err = run_cli("merge", config, out, "--seed", 3, "--json")
    assert code == 0, err
    results = json.loads(stdout)
    assert results["method"] == "dare_ties" and results["tensors"] == 21
    manifest = json.loads((out / "lctool.json").read_text())
    assert manifest["operation"] == "merge" and manifest["seed"] == 3
    assert os.path.exists(out / "tokenizer.json")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_quick_merge_equals_the_same_yaml(models, tmp_path, run_cli):
    config = write_yaml(str(tmp_path / "m.yml"), _dare_config(models))
    assert run_cli("merge", config, tmp_path / "a", "--seed", 5)[0] == 0
    code, _, err = run_cli(
        "merge", "--method", "dare_ties", "--base", models["base"], models["ft1"], models["ft2"],
        "--weight", "1.0,0.5", "--density", "0.5", "--density", "0.7", "--dtype", "float32", "--seed", 5, tmp_path / "b",
    )
    assert code == 0, err
    a, b = load_tensors(str(tmp_path / "a")), load_tensors(str(tmp_path / "b"))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_same_seed_same_bytes_whatever_the_shard_layout(models, tmp_path, run_cli):
    config = write_yaml(str(tmp_path / "m.yml"), _dare_config(models))
    assert run_cli("merge", config, tmp_path / "one", "--seed", 9)[0] == 0
    assert run_cli("merge", config, tmp_path / "many", "--seed", 9, "--max-shard-size", "40KB")[0] == 0
    assert run_cli("merge", config, tmp_path / "other", "--seed", 10)[0] == 0
    one, many, other = (load_tensors(str(tmp_path / n)) for n in ("one", "many", "other"))
    assert len([f for f in os.listdir(tmp_path / "many") if f.endswith(".safetensors")]) > 1
    assert all(torch.equal(one[n], many[n]) for n in one)
    assert not all(torch.equal(one[n], other[n]) for n in one)


def test_same_seed_same_file_bytes(models, tmp_path, run_cli):
    config = write_yaml(str(tmp_path / "m.yml"), _dare_config(models))
    for name in ("x", "y"):
        assert run_cli("merge", config, tmp_path / name, "--seed", 2)[0] == 0
    assert (tmp_path / "x" / "model.safetensors").read_bytes() == (tmp_path / "y" / "model.safetensors").read_bytes()


def test_inverse_density_rule_keeps_survivors_at_delta_over_density(models, tmp_path, run_cli):
    config = write_yaml(str(tmp_path / "m.yml"), {
        "merge_method": "dare_linear", "base_model": models["base"], "dtype": "float32",
        "models": [{"model": models["ft1"], "parameters": {"weight": 1.0, "density": 0.25}}],
    })
    assert run_cli("merge", config, tmp_path / "o", "--rescale", "inverse_density")[0] == 0
    merged = load_tensors(str(tmp_path / "o"))
    base, ft = load_tensors(models["base"]), load_tensors(models["ft1"])
    name = "model.layers.0.mlp.up_proj.weight"
    delta, merged_delta = ft[name] - base[name], merged[name] - base[name]
    kept = merged_delta != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    assert torch.allclose(merged_delta[kept], delta[kept] / 0.25, rtol=1e-5, atol=1e-7)


def test_slices_stack_layers_and_set_the_layer_count(models, tmp_path, run_cli):
    config = write_yaml(str(tmp_path / "s.yml"), {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": models["ft1"], "layer_range": [0, 2]}]},
            {"sources": [{"model": models["ft2"], "layer_range": [1, 2]}]},
        ],
    })
    code, _, err = run_cli("merge", config, tmp_path / "o")
    assert code == 0, err
    out_config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert out_config["num_hidden_layers"] == 3
    merged, ft2 = load_tensors(str(tmp_path / "o")), load_tensors(models["ft2"])
    assert torch.equal(merged["model.layers.2.mlp.up_proj.weight"], ft2["model.layers.1.mlp.up_proj.weight"])


def test_existing_output_needs_force(models, tmp_path, run_cli):
    config = write_yaml(str(tmp_path / "m.yml"), _dare_config(models))
    (tmp_path / "o").mkdir()
    _assert_failed(run_cli, ["merge", config, tmp_path / "o"], "--force")
    assert run_cli("merge", config, tmp_path / "o", "--force")[0] == 0


# ---- bad inputs: one line, exit 2, nothing written ---------------------------------------------


def test_missing_model(models, tmp_path, run_cli):
    config = write_yaml(str(tmp_path / "m.yml"), _dare_config(models, base_model=str(tmp_path / "nope")))
    _assert_failed(run_cli, ["merge", config, tmp_path / "o"], "not found", "nope", target=str(tmp_path / "o"))


def test_missing_config(tmp_path, run_cli):
    _assert_failed(run_cli, ["merge", tmp_path / "none.yml", tmp_path / "o"], "not found")


def test_mismatched_family(models, tmp_path, run_cli):
    from tests.tiny_models import save_tiny

    qwen = save_tiny(str(tmp_path / "qwen"), "qwen2")
    config = _dare_config(models)
    config["models"][1]["model"] = qwen
    path = write_yaml(str(tmp_path / "m.yml"), config)
    _assert_failed(run_cli, ["merge", path, tmp_path / "o"], "qwen2", "llama", target=str(tmp_path / "o"))


def test_mismatched_shapes_name_the_first_tensor(models, tmp_path, run_cli):
    from tests.tiny_models import save_tiny

    wide = save_tiny(str(tmp_path / "wide"), "llama", intermediate_size=96)
    config = _dare_config(models)
    config["models"][1]["model"] = wide
    path = write_yaml(str(tmp_path / "m.yml"), config)
    _assert_failed(run_cli, ["merge", path, tmp_path / "o"], "model.layers.0.mlp.down_proj.weight", target=str(tmp_path / "o"))


@pytest.mark.parametrize("density", [0, -0.1, 1.5])
def test_density_outside_0_1(models, tmp_path, run_cli, density):
    config = _dare_config(models)
    config["models"][0]["parameters"]["density"] = density
    path = write_yaml(str(tmp_path / "m.yml"), config)
    _assert_failed(run_cli, ["merge", path, tmp_path / "o"], "density must be in (0, 1]", target=str(tmp_path / "o"))


def test_quick_density_outside_0_1(models, tmp_path, run_cli):
    _assert_failed(run_cli, ["merge", "--method", "dare_ties", "--base", models["base"], models["ft1"],
                             "--weight", "1", "--density", "1.2", tmp_path / "o"], "density", target=str(tmp_path / "o"))


def test_weights_summing_to_zero_with_normalize(models, tmp_path, run_cli):
    config = {
        "merge_method": "linear",
        "models": [{"model": models["ft1"], "parameters": {"weight": 0.5}},
                   {"model": models["ft2"], "parameters": {"weight": -0.5}}],
    }
    path = write_yaml(str(tmp_path / "m.yml"), config)
    _assert_failed(run_cli, ["merge", path, tmp_path / "o"], "weights sum to 0", target=str(tmp_path / "o"))
    ties = _dare_config(models, merge_method="ties", parameters={"normalize": True})
    ties["models"][1]["parameters"]["weight"] = -1.0
    ties["models"][0]["parameters"]["weight"] = 1.0
    path = write_yaml(str(tmp_path / "t.yml"), ties)
    _assert_failed(run_cli, ["merge", path, tmp_path / "o"], "weights sum to 0", target=str(tmp_path / "o"))


def test_unknown_method(models, tmp_path, run_cli):
    path = write_yaml(str(tmp_path / "m.yml"), _dare_config(models, merge_method="dare_tiez"))
    _assert_failed(run_cli, ["merge", path, tmp_path / "o"], "unknown merge method 'dare_tiez'", "dare_ties")
    _assert_failed(run_cli, ["merge", "--method", "frankenstein", models["ft1"], tmp_path / "o"], "unknown merge method")


def test_unknown_yaml_key_is_named(models, tmp_path, run_cli):
    config = _dare_config(models)
    config["models"][0]["paramters"] = config["models"][0].pop("parameters")
    path = write_yaml(str(tmp_path / "m.yml"), config)
    _assert_failed(run_cli, ["merge", path, tmp_path / "o"], "paramters")
    path = write_yaml(str(tmp_path / "n.yml"), _dare_config(models, merge_methd="ties"))
    _assert_failed(run_cli, ["merge", path, tmp_path / "o"], "merge_methd")


def test_unknown_parameter_is_named(models, tmp_path, run_cli):
    config = _dare_config(models)
    config["models"][0]["parameters"]["densty"] = 0.5
    path = write_yaml(str(tmp_path / "m.yml"), config)
    _assert_failed(run_cli, ["merge", path, tmp_path / "o"], "densty", "dare_ties")


def test_missing_required_weight(models, tmp_path, run_cli):
    config = _dare_config(models)
    del config["models"][0]["parameters"]["weight"]
    path = write_yaml(str(tmp_path / "m.yml"), config)
    _assert_failed(run_cli, ["merge", path, tmp_path / "o"], "weight is required")


def test_method_needing_a_base(models, tmp_path, run_cli):
    config = _dare_config(models)
    del config["base_model"]
    path = write_yaml(str(tmp_path / "m.yml"), config)
    _assert_failed(run_cli, ["merge", path, tmp_path / "o"], "needs a base_model")


def test_invalid_yaml(tmp_path, run_cli):
    path = tmp_path / "bad.yml"
    path.write_text("merge_method: [ties\nmodels: {")
    _assert_failed(run_cli, ["merge", path, tmp_path / "o"], "not valid YAML")


def test_different_vocabularies_need_tokenizer_source(models, tmp_path, run_cli):
    from tests.test_merge_support import save_extended_vocab

    extended = save_extended_vocab(models["ft2"], str(tmp_path / "ext"), ["<x>", "<y>"])
    config = _dare_config(models)
    config["models"][1]["model"] = extended
    path = write_yaml(str(tmp_path / "m.yml"), config)
    _assert_failed(run_cli, ["merge", path, tmp_path / "o"], "tokenizer_source", target=str(tmp_path / "o"))
    config["tokenizer_source"] = "union"
    path = write_yaml(str(tmp_path / "u.yml"), config)
    code, _, err = run_cli("merge", path, tmp_path / "o")
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "config.json").read_text())["vocab_size"] == 258


def test_same_rows_but_different_tokens_need_tokenizer_source(models, tmp_path, run_cli):
    import shutil

    from transformers import AutoTokenizer

    other = str(tmp_path / "other")
    shutil.copytree(models["ft2"], other)
    with open(os.path.join(other, "tokenizer.json")) as f:
        tokenizer = json.load(f)
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[:2]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    with open(os.path.join(other, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f)
    assert AutoTokenizer.from_pretrained(other).get_vocab() != AutoTokenizer.from_pretrained(models["ft1"]).get_vocab()
    config = _dare_config(models)
    config["models"][1]["model"] = other
    path = write_yaml(str(tmp_path / "m.yml"), config)
    _assert_failed(run_cli, ["merge", path, tmp_path / "o"], "tokenizers of", "differ")


def test_bad_options(models, tmp_path, run_cli):
    config = write_yaml(str(tmp_path / "m.yml"), _dare_config(models))
    _assert_failed(run_cli, ["merge", config, tmp_path / "o", "--seed-mode", "global"], "seed_mode")
    _assert_failed(run_cli, ["merge", config, tmp_path / "o", "--rescale", "l2"], "rescale_rule")
    _assert_failed(run_cli, ["merge", config, tmp_path / "o", "--weight", "1"], "--weight only applies")
    _assert_failed(run_cli, ["merge", config], "give CONFIG.yml OUT")
    if not torch.cuda.is_available():
        _assert_failed(run_cli, ["merge", config, tmp_path / "o", "--device", "cuda"], "no CUDA device")


def test_quick_slerp_with_a_global_parameter(models, tmp_path, run_cli):
    code, _, err = run_cli("merge", "--method", "slerp", "--base", models["base"], models["base"], models["ft1"],
                           "--param", "t=0.0", tmp_path / "o")
    assert code == 0, err
    merged, base = load_tensors(str(tmp_path / "o")), load_tensors(models["base"])
    assert all(torch.allclose(merged[n], base[n]) for n in base)
    _assert_failed(run_cli, ["merge", "--method", "slerp", "--base", models["base"], models["base"], models["ft1"],
                             "--param", "t=1.5", tmp_path / "p"], "t must be in [0, 1]")
