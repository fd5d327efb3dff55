"""`lctool extend`, training-free types: stock loading, frequencies equal to transformers' own, bad input."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from lctool.arch import read_rope
from lctool.ops.extend import ExtendOptions, extend
from lctool.ops.extend.scaling import expected_frequencies
from tests.tiny_models import TINY_SHAPES, save_tiny

TYPES = ("linear", "ntk", "dynamic", "yarn", "llama3", "longrope")
L0 = TINY_SHAPES["max_position_embeddings"]
DIM = TINY_SHAPES["head_dim"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("src") / "tiny"))


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _rotary(model):
    return next(m for m in model.modules() if hasattr(m, "inv_freq") and hasattr(m, "attention_scaling"))


def _transformers_frequencies(path, seq_len=None):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(path)
    kind = config.rope_parameters["rope_type"]
    if kind == "default":
        theta = config.rope_parameters["rope_theta"]
        return 1.0 / theta ** (torch.arange(0, DIM, 2).float() / DIM), 1.0
    return ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=seq_len)


def _rotary_after_forward(model, length):
    """Run the rotary embedding on positions 0..length-1 (dynamic/longrope update themselves there)."""
    rotary = _rotary(model)
    positions = torch.arange(length)[None]
    cos, _ = rotary(torch.zeros(1, length, DIM), positions)
    return rotary, cos


@pytest.mark.parametrize("kind", TYPES)
def test_each_type_loads_in_stock_transformers_with_its_frequencies(source, tmp_path, kind):
    out = extend(source, str(tmp_path / kind), ExtendOptions(method=kind, factor=4))
    config = json.load(open(os.path.join(out, "config.json")))
    assert "rope_scaling" not in config and "rope_theta" not in config
    rope = read_rope(config)
    assert config["max_position_embeddings"] == (L0 if kind == "dynamic" else 4 * L0)
    assert "auto_map" not in config

    model = _load(out)  # no trust_remote_code
    rotary = _rotary(model)
    ours, our_scaling = expected_frequencies(rope, DIM, L0)
    theirs, their_scaling = _transformers_frequencies(out)
    torch.testing.assert_close(rotary.inv_freq, theirs, rtol=1e-6, atol=0)
    torch.testing.assert_close(rotary.inv_freq, ours, rtol=1e-6, atol=0)
    assert rotary.attention_scaling == pytest.approx(their_scaling) == pytest.approx(our_scaling)

    original = _rotary(_load(source)).inv_freq
    if kind in ("linear",):
        torch.testing.assert_close(rotary.inv_freq, original / 4)
    if kind in ("ntk", "yarn", "llama3"):  # highest frequency kept, lowest interpolated
        assert rotary.inv_freq[0] == pytest.approx(float(original[0]))
        assert float(rotary.inv_freq[-1]) < float(original[-1]) / 3
    if kind == "yarn":
        assert rope.params["attention_factor"] == pytest.approx(0.1 * math.log(4) + 1)  # 1.1386
        assert rope.params["beta_fast"] == 32 and rope.params["beta_slow"] == 1
    if kind == "llama3":
        assert rope.params["low_freq_factor"] == 1 and rope.params["high_freq_factor"] == 4
    if kind == "longrope":
        assert len(rope.params["short_factor"]) == len(rope.params["long_factor"]) == DIM // 2


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_length_dependent_types_match_transformers_beyond_l0(source, tmp_path, kind):
    out = extend(source, str(tmp_path / kind), ExtendOptions(method=kind, factor=4))
    rope = read_rope(json.load(open(os.path.join(out, "config.json"))))
    length = 3 * L0
    rotary, _ = _rotary_after_forward(_load(out), length)
    theirs, _ = _transformers_frequencies(out, seq_len=length)
    ours, _ = expected_frequencies(rope, DIM, L0, seq_len=length)
    torch.testing.assert_close(rotary.inv_freq, theirs, rtol=1e-6, atol=0)
    torch.testing.assert_close(rotary.inv_freq, ours, rtol=1e-5, atol=0)
    base = _rotary(_load(source)).inv_freq
    assert float(rotary.inv_freq[-1]) < float(base[-1])  # scaled at 3×L0


def test_weights_untouched_and_hard_linked(source, tmp_path):
    out = extend(source, str(tmp_path / "yarn"), ExtendOptions(method="yarn", factor=8))
    src_file, out_file = os.path.join(source, "model.safetensors"), os.path.join(out, "model.safetensors")
    assert os.stat(src_file).st_ino == os.stat(out_file).st_ino
    for name in ("tokenizer.json", "lctool.json"):
        assert os.path.exists(os.path.join(out, name))
    before, after = _load(source).state_dict(), _load(out).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    manifest = json.load(open(os.path.join(out, "lctool.json")))
    assert manifest["operation"] == "extend"
    assert manifest["results"]["original_length"] == L0 and manifest["results"]["target_length"] == 8 * L0


def test_logits_equal_within_l0_for_types_that_keep_short_context(source, tmp_path):
    """Dynamic NTK leaves sequences up to L0 exactly as the model was trained."""
    ids = torch.randint(0, 256, (1, 64))
    reference = _load(source)(ids).logits
    out = extend(source, str(tmp_path / "dyn"), ExtendOptions(method="dynamic", factor=4))
    torch.testing.assert_close(_load(out)(ids).logits, reference)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma"])
def test_other_families(tmp_path, family):
    src = save_tiny(str(tmp_path / family), family=family)
    out = extend(src, str(tmp_path / "out"), ExtendOptions(method="yarn", target_length=4 * L0))
    rotary = _rotary(_load(out))
    theirs, scaling = _transformers_frequencies(out)
    torch.testing.assert_close(rotary.inv_freq, theirs, rtol=1e-6, atol=0)
    assert rotary.attention_scaling == pytest.approx(scaling) == pytest.approx(1.1386, abs=1e-4)


def test_factor_from_target_length_and_v4_input(tmp_path):
    src = save_tiny(str(tmp_path / "v4"))
    path = os.path.join(src, "config.json")
    config = json.load(open(path))
    config.pop("rope_parameters", None)
    config["rope_theta"] = 50000.0  # v4 spelling, unscaled
    json.dump(config, open(path, "w"))
    out = extend(src, str(tmp_path / "out"), ExtendOptions(method="linear", target_length=1536))
    written = json.load(open(os.path.join(out, "config.json")))
    assert written["rope_parameters"] == {"rope_type": "linear", "rope_theta": 50000.0, "factor": 3.0}
    assert written["max_position_embeddings"] == 1536
    out = extend(src, str(tmp_path / "ntk"), ExtendOptions(method="ntk", factor=2, original_length=256))
    written = json.load(open(os.path.join(out, "config.json")))
    assert written["rope_parameters"]["rope_theta"] == pytest.approx(50000 * 2 ** (DIM / (DIM - 2)))
    assert written["max_position_embeddings"] == 512


def test_rescaling_needs_force_and_restarts_from_l0(source, tmp_path, run_cli):
    first = str(tmp_path / "first")
    assert run_cli("extend", source, first, "--method", "ntk", "--factor", "2")[0] == 0
    code, _, err = run_cli("extend", first, str(tmp_path / "second"), "--method", "yarn", "--factor", "4")
    assert code == 2 and "already has RoPE scaling" in err and "--force" in err
    assert not os.path.exists(tmp_path / "second")
    code, out, err = run_cli("extend", first, str(tmp_path / "second"), "--method", "yarn", "--factor", "4",
                             "--force", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["original_length"] == L0 and info["rope"]["theta"] == 10000.0  # ntk's theta undone


def test_v4_scaled_input_counts_as_scaled(tmp_path):
    src = save_tiny(str(tmp_path / "scaled"))
    path = os.path.join(src, "config.json")
    config = json.load(open(path))
    config.pop("rope_parameters", None)
    config.update(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 2.0}, max_position_embeddings=1024)
    json.dump(config, open(path, "w"))
    from lctool.errors import LctoolError

    with pytest.raises(LctoolError, match="already has RoPE scaling"):
        extend(src, str(tmp_path / "out"), ExtendOptions(method="linear", factor=4))
    out = extend(src, str(tmp_path / "out"), ExtendOptions(method="yarn", factor=4), force=True)
    rope = read_rope(json.load(open(os.path.join(out, "config.json"))))
    assert rope.params["original_max_position_embeddings"] == 512  # 1024 / 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "yarn", "--factor", "1"], "factor"),
        (["--method", "linear", "--factor", "0.5"], "factor"),
        (["--method", "yarn", "--target-length", "256"], "not longer than the original length"),
        (["--method", "yarn", "--target-length", "512"], "not longer than the original length"),
        (["--method", "rope9"], "method"),
        (["--method", "yarn"], "--factor or --target-length"),
        (["--method", "yarn", "--factor", "4", "--beta-fast", "0.5"], "beta_fast"),
        (["--method", "longrope", "--factor", "4", "--long-factor", "1,2,3"], "long_factor needs 8 values"),
        (["--method", "linear", "--factor", "4", "--long-factor", "1,2"], "longrope"),
    ],
)
def test_bad_options_exit_2_and_write_nothing(source, tmp_path, run_cli, args, message):
    target = tmp_path / "out"
    code, out, err = run_cli("extend", source, target, *args)
    assert code == 2
    assert err.startswith("error:") and message in err and "Traceback" not in err
    assert not os.path.exists(target)


def test_non_rope_model_refused(tmp_path, run_cli):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    json.dump({"model_type": "gpt2", "n_positions": 1024}, open(folder / "config.json", "w"))
    code, _, err = run_cli("extend", folder, tmp_path / "out", "--method", "yarn", "--factor", "4")
    assert code == 2 and "not RoPE" in err
    assert not os.path.exists(tmp_path / "out")


def test_existing_output_needs_force(source, tmp_path, run_cli):
    target = tmp_path / "out"
    assert run_cli("extend", source, target, "--method", "linear", "--factor", "2")[0] == 0
    code, _, err = run_cli("extend", source, target, "--method", "yarn", "--factor", "2")
    assert code == 2 and "already exists" in err
    assert json.load(open(target / "config.json"))["rope_parameters"]["rope_type"] == "linear"
    code, out, _ = run_cli("extend", source, target, "--method", "yarn", "--factor", "2", "--force")
    assert code == 0 and "yarn" in out
    assert json.load(open(target / "config.json"))["rope_parameters"]["rope_type"] == "yarn"


def test_longrope_searched_factors_from_a_file(source, tmp_path, run_cli):
    factors = tmp_path / "long.json"
    json.dump([1.0, 1.0, 1.5, 2.0, 3.0, 4.0, 4.0, 4.0], open(factors, "w"))
    code, out, err = run_cli("extend", source, tmp_path / "out", "--method", "longrope", "--factor", "4",
                             "--long-factor", factors, "--json")
    assert code == 0, err
    rope = read_rope(json.load(open(tmp_path / "out" / "config.json")))
    assert rope.params["long_factor"] == [1.0, 1.0, 1.5, 2.0, 3.0, 4.0, 4.0, 4.0]
    assert rope.params["short_factor"] == [1.0] * 8


@pytest.mark.parametrize("kind", ["yarn", "dynamic"])
def test_search_picks_the_lowest_heldout_ppl_and_writes_it(source, tmp_path, kind):
    from lctool.data import load_text_source
    from lctool.eval import perplexity
    from lctool.io.hf import load_tokenizer
    from lctool.ops.extend.search import SearchOptions

    search = SearchOptions(max_tokens=2 * 2 * L0)
    out = extend(source, str(tmp_path / kind), ExtendOptions(method=kind, factor=2), search=search)
    tried = json.load(open(os.path.join(out, "lctool.json")))["results"]["search"]
    assert len(tried) == (16 if kind == "yarn" else 4) and {t["factor"] for t in tried} == {2.0, 2.5, 3.0, 4.0}
    best = min(tried, key=lambda t: t["ppl"])
    rope = read_rope(json.load(open(os.path.join(out, "config.json"))))
    assert rope.factor == best["factor"]
    if kind == "yarn":
        assert rope.params["beta_fast"] == best["beta_fast"]
    # What the search measured in place is what stock transformers computes from the written config.
    text = load_text_source("wiki:calib", split="calib")
    stock = perplexity(_load(out), load_tokenizer(out), text, 2 * L0, max_tokens=search.max_tokens)
    assert stock["ppl"] == pytest.approx(best["ppl"], rel=1e-4)


def test_search_refused_for_trained_methods(source, tmp_path, run_cli):
    code, _, err = run_cli("extend", source, tmp_path / "out", "--method", "clex", "--factor", "2", "--search")
    assert code == 2 and "--search" in err
