"""lctool quantize: the math (grids, GPTQ, SpQR, packing), the formats, the layer streaming, the CLI."""

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lctool.io import Checkpoint
from lctool.quant import QuantizeOptions, formats, load_reference, quantize
from lctool.quant.engine import LayerStream
from lctool.quant.gptq import gptq_quantize, hessian_error, rtn_quantize
from lctool.quant.packing import pack_stream, unpack_stream
from lctool.quant.spqr import SpqrSettings, paper_bits, spqr_quantize
from tests.tiny_models import save_tiny

CALIB = dict(calib_n=4, calib_len=32)


@pytest.fixture
def calib_text(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(("The quick brown fox jumps over the lazy dog. " * 40 + "\n") * 10)
    return str(path)


def correlated_problem(out_features=64, in_features=128, samples=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=g) * 0.3 + torch.eye(in_features)
    x = torch.randn(samples, in_features, generator=g) @ mix
    weight = torch.randn(out_features, in_features, generator=g) * 0.05
    return weight, 2 * x.T @ x / samples


# ---- packing ---------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), rows=st.integers(1, 4), n=st.integers(1, 70), seed=st.integers(0, 1000))
def test_pack_stream_round_trip(bits, rows, n, seed):
    codes = torch.randint(0, 2**bits, (rows, n), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(unpack_stream(pack_stream(codes, bits), bits, n), codes)


def test_pack_stream_matches_gptq_word_layouts():
    assert pack_stream(torch.full((1, 8), 7), 4).item() & 0xFFFFFFFF == 0x77777777
    # 3 bits: 32 codes in 3 words, code 10 split 2+1 bits across words 0/1, code 21 split 1+2 across 1/2
    codes = torch.zeros(1, 32, dtype=torch.int64)
    codes[0, 10] = 0b101
    codes[0, 21] = 0b110
    words = [w & 0xFFFFFFFF for w in pack_stream(codes, 3)[0].tolist()]
    assert words == [0b01 << 30, (0b1) | (0b0 << 31), 0b11]


# ---- GPTQ / RTN ------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_and_w_hat_is_what_is_stored(act_order):
    weight, hessian = correlated_problem()
    gptq = gptq_quantize(weight, hessian, bits=4, group_size=32, sym=True, act_order=act_order)
    rtn = rtn_quantize(weight, bits=4, group_size=32, sym=True)
    assert hessian_error(weight, gptq.w_hat, hessian) < 0.8 * hessian_error(weight, rtn.w_hat, hessian)
    tensors = formats.gptq_tensors(gptq, 4)
    assert torch.equal(formats.gptq_dequantize(tensors, 4, 128, 64), gptq.w_hat)
    groups = torch.bincount(gptq.g_idx.long())
    assert groups.tolist() == [32] * 4
    if not act_order:
        assert torch.equal(gptq.g_idx.long(), torch.arange(128) // 32)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_gptq_asymmetric_v1_storage_round_trips(bits):
    weight, hessian = correlated_problem(out_features=32, in_features=64)
    weight = weight.abs()  # all-positive groups: the zero point would be 0, which v1 cannot store
    result = gptq_quantize(weight, hessian, bits=bits, group_size=32, sym=False, min_zero=1)
    assert result.zeros.min() >= 1
    assert torch.equal(formats.gptq_dequantize(formats.gptq_tensors(result, bits), bits, 64, 32), result.w_hat)


# ---- SpQR ------------------------------------------------------------------------------------------
SPQR_CASES = [
    (SpqrSettings(bits=3), 64, 128),
    (SpqrSettings(bits=4, act_order=True), 48, 80),
    (SpqrSettings(bits=2, beta1=8, beta2=32, stat_bits=4), 40, 50),
    (SpqrSettings(bits=3, outlier_threshold=float("inf")), 32, 32),
]


@pytest.mark.parametrize("spqr_settings,out_features,in_features", SPQR_CASES)
def test_spqr_stored_weight_is_exactly_what_error_feedback_assumed(spqr_settings, out_features, in_features):
    weight, hessian = correlated_problem(out_features, in_features)
    weight[torch.rand(weight.shape, generator=torch.Generator().manual_seed(5)) < 0.01] *= 10
    result = spqr_quantize(weight, hessian, spqr_settings)
    lctool_layout = formats.spqr_lctool_tensors(result, spqr_settings, out_features)
    qconfig = {"quant_method": "lctool_spqr", "bits": spqr_settings.bits, "stat_bits": spqr_settings.stat_bits,
               "beta1": spqr_settings.beta1, "beta2": spqr_settings.beta2}
    parts = formats.spqr_parts(lctool_layout, qconfig, out_features, in_features)
    assert torch.equal(parts.weight(), result.w_hat)  # dense + sparse outliers, bit for bit
    if formats.hf_spqr_allowed(spqr_settings, [(out_features, in_features)]):
        hf_layout = formats.spqr_hf_tensors(result, out_features, in_features)
        assert torch.equal(formats.spqr_parts(hf_layout, {"quant_method": "spqr"}, out_features, in_features).weight(),
                           result.w_hat)
        tiles = (out_features // 16) * (in_features // 16)
        assert hf_layout["dense_weights"].shape == (tiles * 16,) and hf_layout["dense_weights"].dtype == torch.int64
        assert hf_layout["row_offsets"].shape == (out_features + 1,)
        assert hf_layout["in_perm"].shape == (in_features // 2,)
    if spqr_settings.outlier_threshold == float("inf"):
        assert result.outlier_count == 0


def test_spqr_outliers_help_and_are_rare():
    weight, hessian = correlated_problem(64, 128)
    weight[torch.rand(weight.shape, generator=torch.Generator().manual_seed(2)) < 0.005] *= 20
    plain = spqr_quantize(weight, hessian, SpqrSettings(outlier_threshold=float("inf")))
    sparse = spqr_quantize(weight, hessian, SpqrSettings(outlier_threshold=0.2))
    assert 0 < sparse.outlier_count < 0.1 * weight.numel()
    assert hessian_error(weight, sparse.w_hat, hessian) < hessian_error(weight, plain.w_hat, hessian)


def test_paper_bits_accounting():
    assert paper_bits(SpqrSettings(bits=3), 0.0) == pytest.approx(3 + 6 / 16 + 64 / 256)
    assert paper_bits(SpqrSettings(bits=4), 0.01) == pytest.approx(4.625 + 0.32)


# ---- layer streaming -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
def test_layer_stream_reproduces_the_full_model(tmp_path, family):
    from transformers import AutoModelForCausalLM

    path = save_tiny(str(tmp_path / "m"), family)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    stream = LayerStream(Checkpoint(path), ids, batch_size=2)
    torch.testing.assert_close(stream.hidden, hidden[0])
    layer = stream.load_layer(0)
    hessians = stream.collect_hessians(layer, ("q", "k", "v"))
    first_input = model.model.layers[0].input_layernorm(hidden[0]).reshape(-1, 64)
    torch.testing.assert_close(hessians["q"], 2 * first_input.T @ first_input / first_input.shape[0], rtol=1e-4, atol=1e-5)
    stream.advance(layer)
    torch.testing.assert_close(stream.hidden, hidden[1], rtol=1e-5, atol=1e-5)


# ---- the operation ---------------------------------------------------------------------------------
METHOD_CASES = {
    "rtn": dict(method="rtn", group_size=32),
    "gptq": dict(method="gptq", group_size=32, **CALIB),
    "gptq3-actorder-asym": dict(method="gptq", bits=3, group_size=32, act_order=True, sym=False, **CALIB),
    "spqr-hf": dict(method="spqr", **CALIB),
    "spqr-lctool": dict(method="spqr", bits=4, act_order=True, **CALIB),
}


@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_quantize_writes_a_loadable_checkpoint(tmp_path, calib_text, case):
    source = save_tiny(str(tmp_path / "m"))
    options = QuantizeOptions(**METHOD_CASES[case], calib=calib_text)
    summary = quantize(source, str(tmp_path / "q"), options)
    checkpoint = Checkpoint(str(tmp_path / "q"))
    qconfig = checkpoint.quantization_config
    assert qconfig["quant_method"] == summary["quant_method"]
    assert checkpoint.manifest["operation"] == "quantize"
    assert checkpoint.manifest["results"]["quantized_params"] == summary["quantized_params"] == 2 * (
        2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)  # 2 layers of q,o 64x64; k,v 32x64; gate,up,down 64x128
    assert len(summary["layers"]) == 2 and all(len(rec["modules"]) == 7 for rec in summary["layers"])
    assert "tokenizer.json" in os.listdir(tmp_path / "q")
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(source).eval()
    model = load_reference(str(tmp_path / "q"))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, expected = model(ids).logits, reference(ids).logits
    assert torch.isfinite(logits).all()
    tolerance = 0.2 if summary["bits"] >= 4 else 0.4  # random tiny weights at 3 bits are far off
    assert (logits - expected).abs().mean() < tolerance * expected.abs().mean()
    if summary["method"] == "spqr":
        expected_format = "spqr" if case == "spqr-hf" else "lctool_spqr"
        assert qconfig["quant_method"] == expected_format
        stored = sum(checkpoint.entry(n).nbytes * 8 for n in checkpoint.tensor_names()
                     if any(n.endswith(k) for k in ("dense_weights", "row_offsets", "col_vals", "in_perm",
                                                     "dense_codes", "stat_codes", "second_order")))
        assert summary["bits_per_param_stored"] == pytest.approx(stored / summary["quantized_params"], abs=1e-3)
        assert summary["bits_per_param_paper"] == pytest.approx(
            paper_bits(SpqrSettings(bits=summary["bits"]), summary["outlier_rate"]), abs=1e-3)
        if expected_format == "spqr":
            assert set(qconfig) >= {"bits", "beta1", "beta2", "shapes", "modules_to_not_convert"}
            assert qconfig["shapes"]["model.layers.0.self_attn.q_proj.dense_weights.shape"] == 16 * 4 * 4
            assert checkpoint.config["dtype"] == "float16"


def test_quantized_weights_in_model_match_the_written_artifact(tmp_path, calib_text):
    """The per-layer reference (what later layers were calibrated against) is what the file holds."""
    source = save_tiny(str(tmp_path / "m"))
    quantize(source, str(tmp_path / "q"), QuantizeOptions(method="gptq", group_size=32, calib=calib_text, **CALIB))
    model = load_reference(str(tmp_path / "q"))
    checkpoint = Checkpoint(str(tmp_path / "q"))
    arch = checkpoint.arch
    name = arch.module("down", 1)
    tensors = {k: checkpoint.get(f"{name}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
    assert torch.equal(model.get_submodule(name).weight, formats.gptq_dequantize(tensors, 4, 128, 64))
    assert model.get_submodule(arch.module("lm_head")).weight.data_ptr() == model.get_submodule(arch.module("embed")).weight.data_ptr() or not arch.tied


def test_gptq_calibration_beats_rtn_on_the_model(tmp_path, calib_text):
    source = save_tiny(str(tmp_path / "m"))
    rtn = quantize(source, str(tmp_path / "r"), QuantizeOptions(method="rtn", bits=3, group_size=64))
    gptq = quantize(source, str(tmp_path / "g"), QuantizeOptions(method="gptq", bits=3, group_size=64, calib=calib_text, calib_n=8, calib_len=64))
    assert gptq["mean_error"] < rtn["mean_error"]


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_bitsandbytes_round_trip(tmp_path, method):
    from transformers import AutoModelForCausalLM

    source = save_tiny(str(tmp_path / "m"))
    quantize(source, str(tmp_path / "q"), QuantizeOptions(method=method))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), device_map="cpu").eval()
    fresh = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), device_map="cpu").eval()
    reference = AutoModelForCausalLM.from_pretrained(source).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, again, want = reloaded(ids).logits, fresh(ids).logits, reference(ids).logits
    torch.testing.assert_close(got, again)
    relative = ((got - want).norm() / want.norm()).item()
    assert relative < (0.2 if method == "nf4" else 0.05)
    assert Checkpoint(str(tmp_path / "q"), check_shapes=False).manifest["results"]["method"] == method


def test_nf4_refuses_widths_its_cpu_kernel_cannot_run_unless_skipped(tmp_path, run_cli):
    from transformers import AutoModelForCausalLM

    source = save_tiny(str(tmp_path / "m"), intermediate_size=96)  # down_proj: 96 inputs, not a multiple of 64
    code, out, err = run_cli("quantize", source, str(tmp_path / "q"), "--method", "nf4")
    assert code == 2 and err.strip().startswith("error: nf4: down of layer 0 has 96 inputs") and "--skip down" in err
    assert not os.path.exists(tmp_path / "q")
    quantize(source, str(tmp_path / "s"), QuantizeOptions(method="nf4", skip=["down"]))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "s"), device_map="cpu").eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 256, (1, 8))).logits).all()


# ---- the CLI ---------------------------------------------------------------------------------------
def test_cli_json_summary(tmp_path, run_cli, calib_text):
    source = save_tiny(str(tmp_path / "m"))
    code, out, err = run_cli("quantize", source, tmp_path / "q", "--method", "spqr", "--calib", calib_text,
                             "--calib-n", "4", "--calib-len", "32", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["quant_method"] == "spqr" and summary["layers"][0]["modules"]["q"]["bits"] > 3
    code, out, err = run_cli("quantize", source, tmp_path / "r", "--method", "rtn", "--group-size", "32")
    assert code == 0 and "stored bits/param" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "gptq", "--bits", "9"], "bits"),
        (["--method", "gptq", "--bits", "1"], "bits"),
        (["--method", "gptq", "--bits", "5", "--group-size", "32"], "2, 3, 4 or 8"),
        (["--method", "gptq", "--group-size", "48"], "does not divide in_features"),
        (["--method", "awq"], "method"),
        (["--method", "gptq", "--damp", "0"], "damp"),
        (["--method", "spqr", "--sym"], "asymmetric"),
        (["--method", "gptq", "--group-size", "32", "--skip", "qq"], "unknown role"),
        (["--method", "gptq", "--group-size", "32", "--calib-n", "64", "--calib-len", "4096"], "calibration text"),
        (["--method", "nf4", "--bits", "4"], "do not apply"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, run_cli, calib_text, args, message):
    source = save_tiny(str(tmp_path / "m"))
    code, out, err = run_cli("quantize", source, tmp_path / "q", "--calib", calib_text, *args)
    assert code == 2, err
    assert err.startswith("error:") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "q").exists()
    assert [p for p in os.listdir(tmp_path) if "lctool-tmp" in p] == []


def test_cli_refuses_already_quantized_and_existing_output(tmp_path, run_cli):
    source = save_tiny(str(tmp_path / "m"))
    assert run_cli("quantize", source, tmp_path / "q", "--method", "rtn", "--group-size", "32")[0] == 0
    code, _, err = run_cli("quantize", tmp_path / "q", tmp_path / "q2", "--method", "rtn", "--group-size", "32")
    assert code == 2 and "already quantized" in err
    code, _, err = run_cli("quantize", source, tmp_path / "q", "--method", "rtn", "--group-size", "32")
    assert code == 2 and "--force" in err


def test_failure_midway_leaves_nothing(tmp_path, calib_text, monkeypatch):
    import lctool.quant.api as api

    source = save_tiny(str(tmp_path / "m"))

    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(api, "spqr_quantize", explode)
    with pytest.raises(RuntimeError):
        quantize(source, str(tmp_path / "q"), QuantizeOptions(method="spqr", calib=calib_text, **CALIB))
    assert sorted(p for p in os.listdir(tmp_path) if not p.endswith("lctool-lock")) == ["calib.txt", "m"]


# ---- the testbed -----------------------------------------------------------------------------------
TESTBED_CASES = {
    "rtn": ["--method", "rtn"],
    "gptq": ["--method", "gptq", "--act-order"],
    "spqr": ["--method", "spqr"],
    "nf4": ["--method", "nf4"],
    "int8": ["--method", "int8"],
}


@pytest.mark.testbed
@pytest.mark.slow
@pytest.mark.parametrize("method", list(TESTBED_CASES))
def test_every_method_on_the_testbed(testbed_dir, tmp_path, run_cli, method):
    """CLI and Python on the testbed with a small calibration; the result must still model the text."""
    from lctool.data import corpus_text
    from lctool.eval import load_for_eval, perplexity

    args = TESTBED_CASES[method]
    calib = ["--calib", "wiki", "--calib-n", "8", "--calib-len", "128"] if method in ("gptq", "spqr") else []
    code, out, err = run_cli("quantize", testbed_dir, tmp_path / "cli", *args, *calib, "--json")
    assert code == 0, err
    python_summary = quantize(testbed_dir, str(tmp_path / "py"), QuantizeOptions(
        method=method, act_order=method == "gptq", **({"calib_n": 8, "calib_len": 128} if method in ("gptq", "spqr") else {})))
    assert python_summary["method"] == json.loads(out)["method"]
    text = corpus_text("wiki", "eval")[:20000]
    base = perplexity(*load_for_eval(testbed_dir), text, ctx=128)["ppl"]
    quantized = perplexity(*load_for_eval(str(tmp_path / "cli")), text, ctx=128)["ppl"]
    assert quantized < base * 1.5
