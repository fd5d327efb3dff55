"""AQLM: the math (codes/codebooks reconstruction, beam search, refits), the quantize op, stock loading."""

import json
import os

os.environ.setdefault("NUMBA_NUM_THREADS", "1")  # the aqlm 8-bit CPU kernel races with more threads

import pytest
import torch

from lctool.io import Checkpoint
from lctool.quant import QuantizeOptions, quantize
from lctool.quant import aqlm as aq
from lctool.quant.aqlm_job import load_aqlm_reference
from lctool.quant.gptq import rtn_quantize
from tests.tiny_models import save_tiny

FAST = dict(beam_size=2, aqlm_rounds=1, calib_n=4, calib_len=32)


@pytest.fixture
def calib_text(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(("The quick brown fox jumps over the lazy dog. " * 40 + "\n") * 10)
    return str(path)


def correlated_problem(out_features=32, in_features=64, samples=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=g) * 0.3 + torch.eye(in_features)
    x = torch.randn(samples, in_features, generator=g) @ mix
    weight = torch.randn(out_features, in_features, generator=g) * 0.05
    return weight, 2 * x.T @ x / samples


def aqlm_installed() -> bool:
    try:
        import aqlm  # noqa: F401
    except ImportError:
        return False
    return True


# ---- math ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nbits", [4, 8, 12])
def test_signed_storage_round_trips_and_matches_the_definition(nbits):
    g = torch.Generator().manual_seed(nbits)
    codes = torch.randint(0, 1 << nbits, (6, 4, 2), generator=g)
    codebooks = torch.randn(2, 1 << nbits, 1, 8, generator=g)
    scales = torch.rand(6, 1, 1, 1, generator=g) + 0.5
    stored = aq.stored_codes(codes, nbits)
    assert stored.dtype == (torch.int8 if nbits <= 8 else torch.int16)
    weight = aq.dequantize(stored, codebooks, scales)
    for o, j in [(0, 0), (5, 3), (2, 1)]:
        expected = scales[o, 0, 0, 0] * (codebooks[0, codes[o, j, 0], 0] + codebooks[1, codes[o, j, 1], 0])
        assert torch.allclose(weight[o, j * 8:(j + 1) * 8], expected)


@pytest.mark.skipif(not aqlm_installed(), reason="the aqlm package is not installed")
def test_dequantize_matches_the_aqlm_package():
    from aqlm.utils import _dequantize_weight, unpack_int_data

    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 256, (16, 8, 2), generator=g)
    codebooks, scales = torch.randn(2, 256, 1, 4, generator=g), torch.rand(16, 1, 1, 1, generator=g)
    stored = aq.stored_codes(codes, 8)
    theirs = _dequantize_weight(unpack_int_data(stored, 8), codebooks, scales)
    assert torch.allclose(aq.dequantize(stored, codebooks, scales), theirs, atol=1e-6)


def test_beam_search_never_increases_the_output_error_and_wider_beams_help():
    weight, hessian = correlated_problem()
    s = aq.AqlmSettings(num_codebooks=2, nbits=4, in_group_size=8, kmeans_iters=5)
    h = aq._normalized_hessian(hessian, weight.shape[1])
    codes, codebooks, scales = aq.initialize(weight, h, s, torch.Generator().manual_seed(0))
    start = aq.output_error(weight, aq.dequantize(codes, codebooks, scales), h)
    errors = {}
    for beam in (1, 4):
        found = aq.beam_search(weight / scales.reshape(-1, 1), h, codes, codebooks, beam)
        errors[beam] = aq.output_error(weight, aq.dequantize(found, codebooks, scales), h)
    assert errors[1] < start and errors[4] <= errors[1] + 1e-6


def test_aqlm_at_two_bits_beats_rtn_at_two_bits_and_w_hat_is_what_is_stored():
    weight, hessian = correlated_problem()
    s = aq.AqlmSettings(num_codebooks=2, nbits=6, in_group_size=8, beam_size=2, rounds=2, adam_steps=30)
    result = aq.aqlm_quantize(weight, hessian, s)
    assert result.errors[-1] <= result.errors[0] + 1e-6
    stored = aq.aqlm_tensors(result, s.nbits)
    assert torch.equal(aq.dequantize(stored["codes"], stored["codebooks"].float(), stored["scales"].float()), result.w_hat)
    rtn = rtn_quantize(weight, bits=2, group_size=16, sym=False, min_zero=1)
    assert aq.output_error(weight, result.w_hat, hessian) < 0.5 * aq.output_error(weight, rtn.w_hat, hessian)


def test_true_bits_accounting():
    s = aq.AqlmSettings(num_codebooks=2, nbits=8, in_group_size=8)
    bits = aq.true_bits(256, 768, s)
    assert bits == 256 * 96 * 2 * 8 + 2 * 256 * 8 * 16 + 256 * 16
    assert bits / (256 * 768) == pytest.approx(2.0 + 65536 / 196608 + 16 / 768)


# ---- the quantize op ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """One tiny llama quantized at 1 codebook x 8 bits, group 8, with a short block fine-tune."""
    root = tmp_path_factory.mktemp("aqlm")
    calib = root / "calib.txt"
    calib.write_text(("The quick brown fox jumps over the lazy dog. " * 40 + "\n") * 10)
    source = save_tiny(str(root / "m"))
    options = QuantizeOptions(method="aqlm", codebooks=1, codebook_bits=8, in_group_size=8, finetune_steps=10,
                              calib=str(calib), **FAST)
    summary = quantize(source, str(root / "q"), options)
    return source, str(root / "q"), summary


def test_artifact_layout_config_and_bits(quantized):
    source, target, summary = quantized
    checkpoint = Checkpoint(target)
    qconfig = checkpoint.quantization_config
    assert qconfig == {"quant_method": "aqlm", "in_group_size": 8, "out_group_size": 1, "num_codebooks": 1,
                       "nbits_per_codebook": 8, "linear_weights_not_to_quantize": ["lm_head"]}
    arch = checkpoint.arch
    q = arch.module("q", 0)
    assert checkpoint.entry(f"{q}.codes").dtype == "I8" and tuple(checkpoint.entry(f"{q}.codes").shape) == (64, 8, 1)
    assert tuple(checkpoint.entry(f"{q}.codebooks").shape) == (1, 256, 1, 8)
    assert tuple(checkpoint.entry(f"{q}.scales").shape) == (64, 1, 1, 1)
    assert arch.weight("q", 0) not in checkpoint.tensor_names()
    params = summary["quantized_params"]
    expected_bits = sum(aq.true_bits(*arch.linear_shape(r), aq.AqlmSettings()) for r in arch.linear_roles("all")) * 2
    assert summary["bits_per_param_true"] == pytest.approx(expected_bits / params, abs=1e-3)
    assert checkpoint.manifest["results"]["bits_per_param_true"] == summary["bits_per_param_true"]
    for layer in summary["layers"]:
        record = next(iter(layer["modules"].values()))
        assert record["block_mse_after"] <= record["block_mse_before"] * 1.05


def test_reference_loader_is_close_to_fp_and_registered_with_eval(quantized):
    source, target, _ = quantized
    from transformers import AutoModelForCausalLM

    from lctool.eval import load_for_eval

    reference = AutoModelForCausalLM.from_pretrained(source).eval()
    model = load_aqlm_reference(target)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, expected = model(ids).logits, reference(ids).logits
    assert torch.isfinite(logits).all()
    assert (logits - expected).abs().mean() < 0.4 * expected.abs().mean()
    evaluated, _ = load_for_eval(target)
    with torch.no_grad():
        assert torch.allclose(evaluated(ids).logits.float(), logits, atol=1e-5)


@pytest.mark.skipif(not aqlm_installed(), reason="aqlm[cpu] is not installed: stock loading untested here")
@pytest.mark.parametrize("shape", [(1, 8, 8), (2, 6, 4), (1, 10, 8)], ids=["1x8g8-numba", "2x6g4", "1x10g8"])
def test_stock_transformers_with_aqlm_loads_it_with_the_reference_logits(tmp_path, calib_text, shape):
    """Stock AutoModelForCausalLM + aqlm on CPU: 1x8 runs aqlm's numba kernel, others its dequantize path."""
    from transformers import AutoModelForCausalLM

    codebooks, nbits, group = shape
    source = save_tiny(str(tmp_path / "m"))
    options = QuantizeOptions(method="aqlm", codebooks=codebooks, codebook_bits=nbits, in_group_size=group,
                              finetune_steps=0, calib=calib_text, **FAST)
    quantize(source, str(tmp_path / "q"), options)
    stock = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), dtype=torch.float32).eval()
    assert type(stock.get_submodule(Checkpoint(source).arch.module("down", 1))).__module__.startswith("aqlm")
    ours = load_aqlm_reference(str(tmp_path / "q"))
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(stock(ids).logits, ours(ids).logits, atol=1e-4)
        assert torch.allclose(stock(ids[:1, :1]).logits, ours(ids[:1, :1]).logits, atol=1e-4)  # gemv path


def test_qwen2_biases_survive(tmp_path, calib_text):
    source = save_tiny(str(tmp_path / "m"), "qwen2")
    options = QuantizeOptions(method="aqlm", codebook_bits=6, finetune_steps=2, calib=calib_text, **FAST)
    quantize(source, str(tmp_path / "q"), options)
    checkpoint = Checkpoint(str(tmp_path / "q"))
    bias_name = checkpoint.arch.module("q", 0) + ".bias"
    assert torch.allclose(checkpoint.get(bias_name).float(), Checkpoint(source).get(bias_name).float(), atol=1e-2)
    model = load_aqlm_reference(str(tmp_path / "q"))
    assert torch.isfinite(model(torch.arange(10)[None]).logits).all()


# ---- CLI ---------------------------------------------------------------------------------------------


def test_cli_json_summary(tmp_path, run_cli, calib_text):
    source = save_tiny(str(tmp_path / "m"))
    code, out, err = run_cli("quantize", source, tmp_path / "q", "--method", "aqlm", "--codebooks", "1",
                             "--codebook-bits", "6", "--in-group-size", "16", "--beam-size", "1", "--aqlm-rounds", "1",
                             "--finetune-steps", "0", "--calib", calib_text, "--calib-n", "4", "--calib-len", "32",
                             "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["quant_method"] == "aqlm" and summary["codebook_bits"] == 6 and summary["in_group_size"] == 16
    arch = Checkpoint(source).arch
    settings = aq.AqlmSettings(nbits=6, in_group_size=16)
    expected = 2 * sum(aq.true_bits(*arch.linear_shape(r), settings) for r in arch.linear_roles("all"))
    assert summary["bits_per_param_true"] == pytest.approx(expected / summary["quantized_params"], abs=1e-3)
    code, out, err = run_cli("quantize", source, tmp_path / "q2", "--method", "aqlm", "--codebook-bits", "4",
                             "--beam-size", "1", "--aqlm-rounds", "1", "--finetune-steps", "0", "--calib", calib_text,
                             "--calib-n", "2", "--calib-len", "16")
    assert code == 0, err
    assert "true bits/param" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--codebook-bits", "17"], "codebook_bits"),
        (["--in-group-size", "7"], "does not divide in_features"),
        (["--out-group-size", "2"], "supports only 1"),
        (["--bits", "2"], "do not apply to aqlm"),
        (["--codebooks", "0"], "codebooks"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, run_cli, calib_text, args, message):
    source = save_tiny(str(tmp_path / "m"))
    code, out, err = run_cli("quantize", source, tmp_path / "q", "--method", "aqlm", "--calib", calib_text, *args)
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "q")


def test_cli_refuses_an_aqlm_model_as_input(quantized, run_cli, tmp_path):
    _, target, _ = quantized
    code, _, err = run_cli("quantize", target, tmp_path / "again", "--method", "aqlm")
    assert code == 2 and "already quantized (aqlm)" in err


# ---- testbed -----------------------------------------------------------------------------------------


@pytest.mark.testbed
@pytest.mark.slow
def test_testbed_aqlm_two_bits_beats_rtn_two_bits(testbed_dir, tmp_path):
    from lctool.data import corpus_text
    from lctool.eval import load_for_eval, perplexity

    text = corpus_text("wiki", "eval")[:20000]
    common = dict(calib="wiki", calib_n=8, calib_len=128)
    quantize(testbed_dir, str(tmp_path / "a"), QuantizeOptions(method="aqlm", codebooks=2, codebook_bits=8,
                                                                 beam_size=2, aqlm_rounds=1, finetune_steps=20, **common))
    quantize(testbed_dir, str(tmp_path / "r"), QuantizeOptions(method="rtn", bits=2, group_size=64, sym=False))
    ppl = {}
    for name in ("a", "r"):
        model, tokenizer = load_for_eval(str(tmp_path / name))
        ppl[name] = perplexity(model, tokenizer, text, ctx=128)["ppl"]
    assert ppl["a"] < ppl["r"]
