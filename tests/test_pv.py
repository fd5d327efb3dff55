"""PV-Tuning and the STE fine-tune of AQLM models: the masked code search, the V and P steps, the
KL they lower, the stock aqlm output, resume, and one-line errors."""

import json
import os
import signal

os.environ.setdefault("NUMBA_NUM_THREADS", "1")  # the aqlm 8-bit CPU kernel races with more threads

import pytest
import torch

from lctool.io import Checkpoint
from lctool.quant import QuantizeOptions, pv, quantize
from lctool.quant import aqlm as aq
from lctool.quant.aqlm_job import load_aqlm_reference
from lctool.train import TrainingInterrupted
from tests.tiny_models import save_tiny

CALIB = dict(calib_n=8, calib_len=32)
AQLM = dict(method="aqlm", codebooks=1, codebook_bits=4, in_group_size=8, beam_size=1, aqlm_rounds=1,
            finetune_steps=0, **CALIB)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny fp llama and its AQLM (1 codebook x 4 bits, group 8) checkpoint."""
    root = tmp_path_factory.mktemp("pv")
    calib = root / "calib.txt"
    calib.write_text(("The quick brown fox jumps over the lazy dog. " * 40 + "\n") * 10)
    source = save_tiny(str(root / "fp"))
    quantize(source, str(root / "aqlm"), QuantizeOptions(calib=str(calib), **AQLM))
    return {"fp": source, "aqlm": str(root / "aqlm"), "calib": str(calib)}


def pv_options(models, method="pv", **overrides) -> pv.PvOptions:
    base = dict(method=method, steps=6, lr=1e-3, v_lr=1.0, subspace=0.05, beam_size=2, batch=4, calib=models["calib"],
                **CALIB)
    return pv.PvOptions(**{**base, **overrides})


def random_layer(rows=24, groups=6, g=4, nbits=3, codebooks=2, seed=0, shadow=False) -> pv.TunedAqlmLinear:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << nbits, (rows, groups, codebooks), generator=gen)
    words = torch.randn(codebooks, 1 << nbits, 1, g, generator=gen)
    scales = torch.rand(rows, 1, 1, 1, generator=gen) + 0.5
    return pv.TunedAqlmLinear(codes, words, scales, shadow=shadow)


def students_and_teacher(models, method="pv"):
    from lctool.io.hf import load_causal_lm

    student = pv.load_student(models["aqlm"], method)
    teacher = load_causal_lm(models["fp"])
    ids = pv.calibration_windows(Checkpoint(models["aqlm"], check_shapes=False), pv_options(models))
    return student, teacher, ids


# ---- the masked code search ------------------------------------------------------------------------


@pytest.mark.parametrize("identity", [True, False], ids=["h=None", "h=XXt"])
def test_masked_beam_search_changes_only_the_masked_groups_and_never_hurts(identity):
    layer = random_layer()
    rows, groups, _ = layer.codes.shape
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(rows, groups * 4, generator=gen)
    x = torch.randn(64, groups * 4, generator=gen)
    h = None if identity else x.T @ x / 64
    mask = torch.rand(rows, groups, generator=gen) < 0.3
    found = aq.beam_search(target, h, layer.codes, layer.codebooks, 2, mask)
    assert torch.equal(found[~mask], layer.codes[~mask])
    assert (found[mask] != layer.codes[mask]).any()
    weight = h if h is not None else torch.eye(groups * 4)

    def error(codes):
        delta = target - aq.dequantize(codes, layer.codebooks, torch.ones(rows, 1, 1, 1))
        return float(torch.einsum("oi,ij,oj->", delta, weight, delta))

    assert error(found) < error(layer.codes)


def test_groupwise_search_matches_the_general_search_with_identity_h():
    layer = random_layer(seed=3)
    target = torch.randn(24, 24, generator=torch.Generator().manual_seed(4))
    mask = torch.rand(24, 6, generator=torch.Generator().manual_seed(5)) < 0.5
    for m in (mask, None):  # beam 1 is greedy, where independent groups give the same answer either way
        assert torch.equal(aq.beam_search(target, None, layer.codes, layer.codebooks, 1, m),
                           aq.beam_search(target, torch.eye(24), layer.codes, layer.codebooks, 1, m))


# ---- V step, P step ------------------------------------------------------------------------------------


def test_v_step_reencodes_exactly_the_groups_with_the_largest_change_and_keeps_the_rest_pending():
    layer = random_layer()
    rows, groups, _ = layer.codes.shape
    grad = torch.randn(rows, groups * 4, generator=torch.Generator().manual_seed(7))
    before, w_before = layer.codes.clone(), layer.weight_hat().detach()
    state = pv.new_v_state(layer)
    mask = pv.v_step(layer, grad, state, lr=2.0, subspace=0.1, beam_size=2)
    assert int(mask.sum()) == pv.subspace_size(rows * groups, 0.1) == 14
    changed = (layer.codes != before).any(-1)
    assert changed.any() and not (changed & ~mask).any()
    # Adam's first direction is sign(grad): W' − Ŵ = −lr·s_o·sign(grad), largest in the chosen groups
    update = -2.0 * layer.scales.reshape(rows, 1) * grad.sign()
    size = update.reshape(rows, groups, 4).norm(dim=-1)
    assert size[mask].min() >= size[~mask].max()
    # what was not re-encoded stays pending; the re-encoded groups keep only their residual
    pending = state["pending"].reshape(rows, groups, 4)
    assert torch.allclose(pending[~mask], update.reshape(rows, groups, 4)[~mask])
    target = (w_before + update).reshape(rows, groups, 4)
    assert torch.allclose(pending[mask], (target - layer.weight_hat().reshape(rows, groups, 4))[mask])
    assert pending[mask].norm() < update.reshape(rows, groups, 4)[mask].norm()


def test_p_steps_alone_change_no_codes_and_lower_the_kl(models):
    student, teacher, ids = students_and_teacher(models)
    codes = {n: m.codes.clone() for n, m in pv.tuned_modules(student).items()}
    books = {n: m.codebooks.detach().clone() for n, m in pv.tuned_modules(student).items()}
    options = pv_options(models, steps=4, code_every=1000)  # no V step in the run
    results = pv.tune(student, teacher, ids, options, progress=False)
    assert results["code_updates"] == 0 and results["codes_changed_fraction"] == 0
    for name, module in pv.tuned_modules(student).items():
        assert torch.equal(module.codes, codes[name])
        assert not torch.equal(module.codebooks, books[name])
    assert results["kl_after"] < results["kl_before"]


# ---- whole runs ----------------------------------------------------------------------------------------


def test_pv_tune_lowers_the_kl_and_writes_the_stock_aqlm_format(models, tmp_path):
    summary = pv.pv_tune(models["aqlm"], str(tmp_path / "pv"), models["fp"], pv_options(models), progress=False)
    results = summary["pv_tune"]
    assert results["kl_after"] < 0.9 * results["kl_before"]
    assert results["code_updates"] == 6 and results["codes_changed_fraction"] > 0
    tuned, plain = Checkpoint(str(tmp_path / "pv")), Checkpoint(models["aqlm"])
    assert tuned.quantization_config == plain.quantization_config
    assert {n: tuned.entry(n).dtype for n in tuned.tensor_names()} == {n: plain.entry(n).dtype for n in plain.tensor_names()}
    assert tuned.manifest["parameters"]["pv_tune"]["method"] == "pv"
    assert tuned.manifest["results"]["pv_tune"]["kl_after"] == results["kl_after"]
    assert not os.path.exists(tmp_path / ".pv.lctool-train")
    # What was written is what was measured: the KL of the reloaded output is the recorded kl_after.
    from lctool.io.hf import load_causal_lm

    ids = pv.calibration_windows(tuned, pv_options(models))[: pv.KL_WINDOWS]
    reloaded = pv.mean_kl(load_aqlm_reference(str(tmp_path / "pv")), load_causal_lm(models["fp"]), ids, 4)
    assert reloaded == pytest.approx(results["kl_after"], rel=1e-3, abs=1e-6)


def test_pv_output_loads_in_stock_transformers_with_aqlm(models, tmp_path):
    pytest.importorskip("aqlm", reason="aqlm[cpu] is not installed: stock loading untested here")
    from transformers import AutoModelForCausalLM

    pv.pv_tune(models["aqlm"], str(tmp_path / "pv"), models["fp"], pv_options(models, steps=2), progress=False)
    stock = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pv"), dtype=torch.float32).eval()
    ours = load_aqlm_reference(str(tmp_path / "pv"))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(stock(ids).logits, ours(ids).logits, atol=1e-4)


def test_cli_quantize_with_ste_in_one_run(models, run_cli, tmp_path):
    code, out, err = run_cli("quantize", models["fp"], tmp_path / "ste", "--json", "--method", "aqlm", "--codebooks", "1",
                             "--codebook-bits", "4", "--beam-size", "1", "--aqlm-rounds", "1", "--finetune-steps", "0",
                             "--calib", models["calib"], "--calib-n", "8", "--calib-len", "32", "--batch-size", "4",
                             "--pv-tune", "ste", "--pv-steps", "4", "--pv-lr", "1e-3", "--pv-code-every", "2")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["quant_method"] == "aqlm" and summary["pv_tune"]["method"] == "ste"
    assert summary["pv_tune"]["code_updates"] == 2
    assert summary["pv_tune"]["kl_after"] < summary["pv_tune"]["kl_before"]
    manifest = Checkpoint(str(tmp_path / "ste")).manifest
    assert manifest["parameters"]["codebook_bits"] == 4 and manifest["parameters"]["pv_tune"]["method"] == "ste"
    assert [i["path"] for i in manifest["inputs"]] == [models["fp"]]
    assert not {".ste.lctool-aqlm", ".ste.lctool-train"} & set(os.listdir(tmp_path))  # side folders removed
    model = load_aqlm_reference(str(tmp_path / "ste"))
    assert torch.isfinite(model(torch.arange(12)[None]).logits).all()


def test_stop_and_resume_give_the_uninterrupted_result(models, tmp_path, monkeypatch):
    def run(folder, resume=False):
        student, teacher, ids = students_and_teacher(models)
        options = pv_options(models, steps=4, resume=resume)
        results = pv.tune(student, teacher, ids, options, checkpoint_dir=str(folder), progress=False)
        return student, results

    expected, _ = run(tmp_path / "a")
    original = pv.CodeUpdates.before_step

    def stop_at_step_2(self, step, model, batch):
        if step == 1:
            monkeypatch.setattr(pv.CodeUpdates, "before_step", original)
            os.kill(os.getpid(), signal.SIGINT)  # handled by the loop: the step finishes, a checkpoint is saved
        return original(self, step, model, batch)

    monkeypatch.setattr(pv.CodeUpdates, "before_step", stop_at_step_2)
    with pytest.raises(TrainingInterrupted):
        run(tmp_path / "b")
    resumed, results = run(tmp_path / "b", resume=True)
    assert results["start_step"] == 2 and results["code_updates"] == 4  # counters restored with the codes
    want, got = expected.state_dict(), resumed.state_dict()
    assert all(torch.equal(want[name], got[name]) for name in want)


# ---- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["{fp}", "--pv-tune", "pv", "--reference", "{fp}"], "is not an aqlm model (unquantized)"),
        (["{fp}", "--method", "rtn", "--bits", "2", "--pv-tune", "pv"], "--pv-tune tunes aqlm models"),
        (["{aqlm}", "--pv-tune", "pv"], "needs --reference"),
        (["{aqlm}", "--pv-tune", "pv", "--reference", "{other}"], "--reference"),
        (["{aqlm}", "--method", "aqlm", "--pv-tune", "ste", "--reference", "{fp}"], "drop --method"),
        (["{fp}", "--method", "aqlm", "--pv-tune", "sgd"], "method"),
        (["{aqlm}", "--pv-tune", "pv", "--reference", "{fp}", "--pv-subspace", "0"], "subspace"),
        (["{fp}", "--method", "aqlm", "--reference", "{fp}"], "--pv-tune runs only"),
        (["{fp}"], "missing option --method"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(models, run_cli, tmp_path, args, message):
    other = save_tiny(str(tmp_path / "other"), hidden_size=32, intermediate_size=64, head_dim=8)
    paths = {**models, "other": other}
    code, _, err = run_cli("quantize", *[a.format(**paths) for a in args[:1]], tmp_path / "out",
                           *[a.format(**paths) for a in args[1:]], "--calib", models["calib"])
    assert code == 2, err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not {"out", ".out.lctool-aqlm", ".out.lctool-train"} & set(os.listdir(tmp_path))
