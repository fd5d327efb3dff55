"""E²-LLM and CLEX: augmentation actually sampled, CLEX's zero-init equivalence, artifacts that load."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from lctool.ops.extend import ExtendOptions, TrainingOptions, extend
from tests.conftest import free_port
from tests.tiny_models import save_tiny

L0 = 32
DIM = 16


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    source = save_tiny(str(folder / "tiny"), max_position_embeddings=L0)
    from lctool.data import corpus_text

    corpus = folder / "train.txt"
    corpus.write_text(corpus_text("wiki", "train")[:40_000])
    return SimpleNamespace(folder=folder, source=source, corpus=str(corpus))


def _stock(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def _short_training(corpus, steps=4, **kwargs):
    return TrainingOptions(corpus=corpus, steps=steps, batch_size=2, lr=1e-3, warmup_steps=0, **kwargs)


# ---- E²-LLM ------------------------------------------------------------------------------------------
def test_e2llm_hook_samples_scales_and_offsets_and_sets_the_rotary(workdir):
    from lctool.ops.extend.e2llm import E2Augmentation
    from lctool.ops.extend.rotary import RotaryOverride

    model = _stock(workdir.source)
    with RotaryOverride(model) as rotary:
        base = rotary.base_inv_freq
        hook = E2Augmentation(rotary, L0, g_max=4, seed=3)
        seen_scales, seen_offsets = set(), set()
        for step in range(60):
            batch = hook(step, model, {"input_ids": torch.zeros(3, L0, dtype=torch.long)})
            _, scale, offsets = hook.history[-1]
            positions = batch["position_ids"]
            assert positions.shape == (3, L0)
            assert torch.equal(positions[:, 1:] - positions[:, :-1], torch.ones(3, L0 - 1, dtype=torch.long))
            assert all(0 <= o <= (scale - 1) * L0 for o in offsets)
            assert positions.max() < scale * L0
            torch.testing.assert_close(rotary.modules[0].inv_freq, base / scale)
            seen_scales.add(scale)
            seen_offsets.update(offsets)
        assert seen_scales == {1, 2, 3, 4}
        assert len(seen_offsets) > 30  # offsets really vary
    torch.testing.assert_close(rotary.modules[0].inv_freq, base)  # restored on exit


def test_e2llm_same_seed_same_draws_and_scale_shared_across_ranks(workdir):
    from lctool.ops.extend.e2llm import E2Augmentation

    def draws(rank, seed=0):
        hook = E2Augmentation(rotary=None, original_length=L0, g_max=8, seed=seed, rank=rank)
        return [hook.sample(step, 2) for step in range(20)]

    first, again, other_rank = draws(0), draws(0), draws(1)
    assert [s for s, _ in first] == [s for s, _ in again] == [s for s, _ in other_rank]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, again, strict=True))
    assert any(not torch.equal(a, b) for (_, a), (_, b) in zip(first, other_rank, strict=True))
    assert [s for s, _ in draws(0, seed=1)] != [s for s, _ in first]


def test_e2llm_trains_and_writes_stock_linear_scaling(workdir):
    out = extend(workdir.source, str(workdir.folder / "e2"), ExtendOptions(
        method="e2llm", target_length=100, training=_short_training(workdir.corpus, steps=6)))
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}  # ceil(100/32)
    assert config["max_position_embeddings"] == 128 and "auto_map" not in config
    model = _stock(out)  # stock, no remote code
    original = _stock(workdir.source)
    assert not torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)  # trained
    training = json.load(open(os.path.join(out, "lctool.json")))["results"]["training"]
    assert training["steps"] == 6 and training["g_max"] == 4 and sum(training["sampled_scales"].values()) == 6


def test_e2llm_with_lora_merges_into_a_stock_model(workdir):
    out = extend(workdir.source, str(workdir.folder / "e2-lora"), ExtendOptions(
        method="e2llm", factor=2, training=_short_training(workdir.corpus, steps=3, lora_rank=4)))
    model = _stock(out)
    assert not any("lora" in name for name in model.state_dict())
    assert json.load(open(os.path.join(out, "lctool.json")))["results"]["training"]["lora_rank"] == 4


# ---- CLEX ----------------------------------------------------------------------------------------------
def test_rk4_solves_a_known_ode():
    from lctool.ops.clex.modeling_clex import rk4_deviation

    def decay(t, y, base):  # y' = 1 − y, y(1) = 0  ->  y(t) = 1 − e^{-(t−1)}
        return 1 - y

    result = rk4_deviation(decay, torch.zeros(3), 5.0, 0.1)
    torch.testing.assert_close(result, torch.full((3,), 1 - math.exp(-4.0)), atol=1e-6, rtol=0)
    assert torch.equal(rk4_deviation(decay, torch.zeros(3), 1.0, 0.1), torch.zeros(3))


def _clex_settings(t_max=4):
    return {"original_length": L0, "rope_theta": 10000.0, "dim": DIM, "hidden_factor": 2, "step_size": 0.1,
            "t_max": t_max, "fixed_t": None}


def test_untrained_clex_equals_its_base_scaling_logits(workdir):
    """Zero-initialised output layer: t = 1 is the original model, t > 1 is NTK scaling by 2t − 1."""
    from lctool.ops.clex.train import build_clex_model
    from lctool.ops.extend.api import plan_extension

    plan = plan_extension(workdir.source, ExtendOptions(method="clex", factor=4))
    clex, rotaries = build_clex_model(plan.checkpoint, plan.original, _clex_settings())
    clex.eval()
    assert rotaries[0].dynamics.out.weight.abs().sum() == 0
    short = torch.randint(0, 256, (2, L0))
    with torch.no_grad():
        torch.testing.assert_close(clex(short).logits, _stock(workdir.source)(short).logits, atol=1e-5, rtol=1e-5)
    long = torch.randint(0, 256, (1, 4 * L0))  # t = ceil(128 / 32) = 4  ->  NTK factor 7
    ntk = extend(workdir.source, str(workdir.folder / "ntk7"), ExtendOptions(method="ntk", factor=7))
    with torch.no_grad():
        torch.testing.assert_close(clex(long).logits, _stock(ntk)(long).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["runs", "sampled"])
def test_clex_hook_samples_times_and_spreads_positions(workdir, mode):
    from lctool.ops.clex.modeling_clex import ClexRotaryEmbedding
    from lctool.ops.clex.train import ClexAugmentation

    rotary = ClexRotaryEmbedding(SimpleNamespace(clex=_clex_settings()))
    hook = ClexAugmentation([rotary], L0, t_max=4, seed=0, mode=mode, run_length=8)
    seen = set()
    for step in range(40):
        batch = hook(step, None, {"input_ids": torch.zeros(2, L0, dtype=torch.long)})
        t = hook.history[-1][1]
        assert rotary.time_override == t and 1 <= t <= 4
        positions = batch["position_ids"]
        assert torch.equal(batch["attention_mask"], torch.ones(2, L0, dtype=torch.long))
        assert positions.shape == (2, L0)
        assert (positions[:, 1:] > positions[:, :-1]).all()  # sorted, distinct
        assert (positions[:, 0] == 0).all() and (positions < t * L0).all()
        if mode == "sampled":
            assert (positions[:, -1] == t * L0 - 1).all()
        else:  # neighbours one apart inside each run of 8; the gaps only between runs
            steps = positions[:, 1:] - positions[:, :-1]
            inside = torch.ones(L0 - 1, dtype=torch.bool)
            inside[7::8] = False
            assert (steps[:, inside] == 1).all()
            if t > 1:
                assert (steps[:, ~inside] > 1).any()
        seen.add(t)
    assert seen == {1, 2, 3, 4}


def test_clex_long_text_reads_tokens_at_their_positions():
    """Rows of t_max·L0 tokens: the L0 tokens fed are the row's tokens at the positions (from one
    random start), and a token after a gap is not a label (it is not the next token of the text)."""
    from lctool.ops.clex.train import ClexAugmentation

    hook = ClexAugmentation([], L0, t_max=4, seed=0, mode="runs", run_length=8)
    rows = torch.arange(4 * L0).repeat(3, 1) + torch.tensor([[0], [1000], [2000]])
    for step in range(12):
        batch = hook(step, None, {"input_ids": rows})
        t = hook.history[-1][1]
        ids, positions, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
        assert ids.shape == positions.shape == labels.shape == (3, L0)
        start = ids[:, :1] - torch.tensor([[0], [1000], [2000]])
        assert torch.equal(ids - torch.tensor([[0], [1000], [2000]]), start + positions)  # the text follows
        assert (start >= 0).all() and (start + t * L0 <= 4 * L0).all()
        after_gap = torch.zeros_like(labels, dtype=torch.bool)
        after_gap[:, 1:] = positions[:, 1:] - positions[:, :-1] > 1
        assert (labels[after_gap] == -100).all() and torch.equal(labels[~after_gap], ids[~after_gap])
        assert after_gap.any() == (t > 1)


def test_spread_positions_keep_causal_attention(workdir):
    """Non-consecutive positions must not be read as packed sequences (each token its own document)."""
    from lctool.ops.clex.train import ClexAugmentation, build_clex_model
    from lctool.ops.extend.api import plan_extension

    plan = plan_extension(workdir.source, ExtendOptions(method="clex", factor=4))
    model, rotaries = build_clex_model(plan.checkpoint, plan.original, _clex_settings())
    model.eval()
    hook = ClexAugmentation(rotaries, L0, t_max=4, seed=0)
    ids = torch.randint(0, 256, (1, L0))
    step = next(s for s in range(50) if hook(s, None, {"input_ids": ids}) and hook.history[-1][1] == 4)
    batch = hook(step, None, {"input_ids": ids})  # same draw again would differ; re-sample any t
    with torch.no_grad():
        logits = model(**batch).logits
        changed_first = ids.clone()
        changed_first[0, 0] = (ids[0, 0] + 1) % 256
        changed_last = ids.clone()
        changed_last[0, -1] = (ids[0, -1] + 1) % 256
        first = model(**{**batch, "input_ids": changed_first}).logits
        last = model(**{**batch, "input_ids": changed_last}).logits
    assert not torch.allclose(first[0, -1], logits[0, -1])  # the last token sees the first
    torch.testing.assert_close(last[0, :-1], logits[0, :-1])  # nothing sees the future


def test_clex_ode_gets_gradients(workdir):
    from lctool.ops.clex.modeling_clex import ClexRotaryEmbedding

    rotary = ClexRotaryEmbedding(SimpleNamespace(clex=_clex_settings()))
    cos, sin = rotary(torch.zeros(1, 3 * L0, DIM), torch.arange(3 * L0)[None])
    (cos.sum() + sin.sum()).backward()
    assert rotary.dynamics.out.weight.grad is not None and rotary.dynamics.out.weight.grad.abs().sum() > 0


def test_clex_ode_trains_at_its_own_lower_learning_rate(workdir):
    """One AdamW step moves each weight by about its group's lr: the ODE's by lr × clex_ode_lr_scale."""
    from lctool.ops.clex.train import build_clex_model, ode_lr_scales
    from lctool.ops.extend.api import plan_extension
    from lctool.train import ShuffledWindows, TrainConfig, train

    plan = plan_extension(workdir.source, ExtendOptions(method="clex", factor=4))
    model, rotaries = build_clex_model(plan.checkpoint, plan.original, _clex_settings())
    scales = ode_lr_scales(model, rotaries, 0.01)
    assert scales == {"model.rotary_emb.dynamics.": 0.01}
    ode_before = rotaries[0].dynamics.out.weight.detach().clone()
    query_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()

    def at_time_three(step, model, batch):
        rotaries[0].time_override = 3  # t > 1: the ODE is in the graph
        return batch

    lr = 1e-2
    windows = ShuffledWindows({"input_ids": torch.randint(0, 256, (4, L0))}, batch_size=2)
    train(model, windows, TrainConfig(steps=1, lr=lr, batch_size=2, lr_scales=scales, progress=False),
          before_step=at_time_three)
    ode_step = (rotaries[0].dynamics.out.weight - ode_before).abs().max().item()
    query_step = (model.model.layers[0].self_attn.q_proj.weight - query_before).abs().max().item()
    assert 0.5 * lr * 0.01 < ode_step <= 1.01 * lr * 0.01
    assert 0.5 * lr < query_step <= 1.01 * lr


def test_clex_artifact_ships_its_code_and_needs_trust_remote_code(workdir, run_cli):
    out = workdir.folder / "clex"
    code, stdout, stderr = run_cli("extend", workdir.source, out, "--method", "clex", "--factor", "4", "--steps", "4",
                                   "--batch-size", "2", "--lr", "1e-3", "--corpus", workdir.corpus, "--json")
    assert code == 0, stderr
    info = json.loads(stdout)
    assert info["needs_trust_remote_code"] and info["method"] == "clex"
    config = json.load(open(out / "config.json"))
    assert config["model_type"] == "clex_llama"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_clex.ClexLlamaForCausalLM"
    assert (out / "modeling_clex.py").exists()
    with pytest.raises(ValueError, match="custom code"):
        _stock(str(out), trust_remote_code=False)
    model = _stock(str(out), trust_remote_code=True)
    rotary = model.model.rotary_emb
    assert type(rotary).__name__ == "ClexRotaryEmbedding"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys() if ".dynamics." in k}
    assert stored and all(torch.equal(rotary.get_parameter(k.split("rotary_emb.")[1]), v) for k, v in stored.items())
    assert rotary.dynamics.out.weight.abs().sum() > 0  # trained away from zero
    ids = torch.randint(0, 256, (1, 3 * L0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    code, stdout, _ = run_cli("inspect", out, "--json")
    assert code == 0 and json.loads(stdout)["family"] == "llama"
    code, _, stderr = run_cli("extend", out, workdir.folder / "again", "--method", "yarn", "--factor", "2", "--force")
    assert code == 2 and "CLEX model" in stderr


def test_trained_methods_refuse_bad_input_before_training(workdir, run_cli):
    target = workdir.folder / "never"
    code, _, err = run_cli("extend", workdir.source, target, "--method", "clex", "--factor", "4", "--steps", "0")
    assert code == 2 and "steps" in err
    code, _, err = run_cli("extend", workdir.source, target, "--method", "e2llm", "--target-length", "16")
    assert code == 2 and "not longer" in err
    code, _, err = run_cli("extend", workdir.source, workdir.source, "--method", "e2llm", "--factor", "2")
    assert code == 2 and "already exists" in err
    for flag, value in (("--clex-positions", "shuffled"), ("--clex-ode-lr-scale", "0"), ("--clex-run-length", "0")):
        code, _, err = run_cli("extend", workdir.source, target, "--method", "clex", "--factor", "4", flag, value)
        assert code == 2 and err.startswith("error:") and flag.strip("-").replace("-", "_") in err, err
    assert not target.exists()


def test_clex_time_follows_length_and_sticks_while_decoding():
    from lctool.ops.clex.modeling_clex import ClexRotaryEmbedding

    rotary = ClexRotaryEmbedding(SimpleNamespace(clex=_clex_settings()))
    assert rotary.time_for(torch.arange(L0)[None]) == 1
    assert rotary.time_for(torch.arange(L0 + 1)[None]) == 2
    assert rotary.time_for(torch.arange(4 * L0)[None]) == 4
    assert rotary.time_for(torch.tensor([[4 * L0]])) == 4  # the next decoded token keeps the prefill's t
    assert rotary.time_for(torch.arange(10)[None]) == 1  # a new sequence starts over


@pytest.mark.slow
@pytest.mark.parametrize("method", ["e2llm", "clex"])
def test_runs_under_accelerate_launch_with_two_processes(workdir, method):
    import subprocess
    import sys

    out = workdir.folder / f"ddp-{method}"
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # `launch --cpu` starts one process on accelerate 1.15; --multi_gpu starts two (CPU/gloo here).
    done = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", port, "-m", "lctool.cli.main", "-q", "extend",
         workdir.source, str(out), "--method", method, "--factor", "4", "--steps", "3", "--batch-size", "2",
         "--corpus", workdir.corpus, "--json"],
        capture_output=True, text=True, timeout=300, env=env, start_new_session=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout[done.stdout.index("{"):])  # printed once, by the main process
    assert info["training"]["num_processes"] == 2 and info["training"]["steps"] == 3
    assert (out / "model.safetensors").exists()


def test_clex_with_lora_trains_the_ode_and_merges(workdir):
    out = extend(workdir.source, str(workdir.folder / "clex-lora"), ExtendOptions(
        method="clex", factor=4, training=_short_training(workdir.corpus, steps=3, lora_rank=4)))
    model = _stock(out, trust_remote_code=True)
    state = model.state_dict()
    assert not any("lora" in name for name in state)
    assert model.model.rotary_emb.dynamics.out.weight.abs().sum() > 0
    training = json.load(open(os.path.join(out, "lctool.json")))["results"]["training"]
    assert training["lora_rank"] == 4 and training["trainable_parameters"] < 20_000


@pytest.mark.testbed
@pytest.mark.slow
def test_on_the_testbed_yarn_helps_at_4x_and_clex_loads_in_lctool_eval(testbed_dir, tmp_path, run_cli):
    from lctool.eval import EvalOptions, evaluate

    options = EvalOptions(corpus="wiki:eval", lengths=[256, 1024], max_tokens=4096, layer_by_layer="never")
    yarn = extend(testbed_dir, str(tmp_path / "yarn"), ExtendOptions(method="yarn", factor=4))
    before = {r["length"]: r["ppl"] for r in evaluate(testbed_dir, options)["ppl_vs_length"]}
    after = {r["length"]: r["ppl"] for r in evaluate(yarn, options)["ppl_vs_length"]}
    assert after[1024] < before[1024]
    clex = tmp_path / "clex"
    code, _, err = run_cli("extend", testbed_dir, clex, "--method", "clex", "--factor", "4", "--steps", "2",
                           "--batch-size", "1")
    assert code == 0, err
    code, out, err = run_cli("eval", clex, "--trust-remote-code", "--lengths", "256,1024", "--max-tokens", "2048",
                             "--json")
    assert code == 0, err
    rows = {r["length"]: r["ppl"] for r in json.loads(out)["ppl_vs_length"]}
    assert all(math.isfinite(v) for v in rows.values())
    code, _, err = run_cli("eval", clex, "--max-tokens", "1024")
    assert code == 2 and "--trust-remote-code" in err and err.count("\n") == 1
