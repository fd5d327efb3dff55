"""`lctool prune --method llm-pruner` on tiny models of every family (GQA and MHA included).

The central check is independent of the implementation's own bookkeeping: the test gives every
head, kv head and MLP channel a known L2 norm, so the L2 ranking is known in advance; the pruned
model must then compute exactly what the original computes with the expected structures switched
off (their o / down columns zeroed).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from lctool.arch import LAYER_SIZES_KEY, ModelArch
from lctool.errors import LctoolError
from lctool.io import Checkpoint
from lctool.prune import LlmPrunerOptions, prune
from tests.tiny_models import byte_tokenizer, tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma"]


# ---- helpers ------------------------------------------------------------------------------------


def _unit_rows(weight: torch.Tensor, dim: int) -> torch.Tensor:
    return weight / weight.norm(dim=dim, keepdim=True)


def set_known_importance(model, seed: int = 1) -> dict:
    """Give each structure a distinct L2 norm (random order); returns the scales per layer."""
    arch = ModelArch(model.config.to_dict())
    modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(seed)
    scales = {}
    hd = arch.head_dim
    with torch.no_grad():
        for layer in range(arch.num_layers):
            head_s = 0.5 + torch.randperm(arch.num_heads, generator=generator).double() / arch.num_heads
            # kv norms vary less than head norms, so a whole group's rank never ties (MHA: head + its kv).
            kv_s = 0.3 + torch.randperm(arch.num_kv_heads, generator=generator).double() / (7 * arch.num_kv_heads)
            ch_s = 0.5 + torch.randperm(arch.intermediate_size, generator=generator).double() / arch.intermediate_size
            rows = {
                "q": head_s.repeat_interleave(hd), "k": kv_s.repeat_interleave(hd), "v": kv_s.repeat_interleave(hd),
                "gate": ch_s, "up": ch_s,
            }
            cols = {"o": head_s.repeat_interleave(hd), "down": ch_s}
            for role, s in rows.items():
                w = modules[arch.module(role, layer)].weight
                w.copy_(_unit_rows(w, 1) * s[:, None].float())
            for role, s in cols.items():
                w = modules[arch.module(role, layer)].weight
                w.copy_(_unit_rows(w, 0) * s[None, :].float())
            scales[layer] = (head_s, kv_s, ch_s)
    return scales


def expected_kept(arch: ModelArch, scales: dict, sizes: dict, gqa_unit: str) -> dict:
    """Which heads / channels an L2 ranking must keep, given the kept counts of each layer."""
    kept = {}
    hd, g = arch.head_dim, arch.gqa_group
    for layer, (head_s, kv_s, ch_s) in scales.items():
        heads_score = 2 * hd * head_s**2
        kv_score = 2 * hd * kv_s**2
        n_heads, n_kv, n_ch = sizes[layer]
        if gqa_unit == "kv-groups" or g == 1:
            group_score = [float(kv_score[j] + heads_score[j * g : (j + 1) * g].sum()) for j in range(arch.num_kv_heads)]
            groups = sorted(sorted(range(arch.num_kv_heads), key=lambda j: -group_score[j])[:n_kv])
            heads = [h for j in groups for h in range(j * g, (j + 1) * g)]
        else:
            per_group = n_heads // arch.num_kv_heads
            heads = []
            for j in range(arch.num_kv_heads):
                members = list(range(j * g, (j + 1) * g))
                heads += sorted(sorted(members, key=lambda h: -float(head_s[h]))[:per_group])
        channels = sorted(torch.argsort(ch_s, descending=True)[:n_ch].tolist())
        kept[layer] = (heads, channels)
    return kept


def switched_off(model, arch: ModelArch, kept: dict):
    """The original model with every structure outside `kept` contributing nothing."""
    modules = dict(model.named_modules())
    hd = arch.head_dim
    with torch.no_grad():
        for layer, (heads, channels) in kept.items():
            o = modules[arch.module("o", layer)].weight
            mask = torch.zeros(arch.num_heads, dtype=torch.bool)
            mask[heads] = True
            o[:, ~mask.repeat_interleave(hd)] = 0
            down = modules[arch.module("down", layer)].weight
            keep = torch.zeros(arch.intermediate_size, dtype=torch.bool)
            keep[channels] = True
            down[:, ~keep] = 0
    return model


def layer_sizes_of(config: dict, arch: ModelArch) -> dict:
    out = ModelArch(config)
    return {i: (out.heads_in(i), out.kv_heads_in(i), out.intermediate_in(i)) for i in range(arch.num_layers)}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def save_known(tmp_path, family: str, **overrides) -> tuple[str, object, dict]:
    model = tiny_model(family, **overrides)
    scales = set_known_importance(model)
    path = str(tmp_path / f"in-{family}")
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path, model, scales


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


# ---- shapes and equivalence for every family -----------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gqa_unit", ["query-heads", "kv-groups"])
def test_uniform_prune_is_stock_and_exact(tmp_path, family, gqa_unit):
    from transformers import AutoModelForCausalLM

    path, original, scales = save_known(tmp_path, family)
    arch = ModelArch(original.config.to_dict())
    out = str(tmp_path / "out")
    summary = prune(path, out, LlmPrunerOptions(ratio=0.25, importance="l2", gqa_unit=gqa_unit, uniform=True))
    config = json.load(open(os.path.join(out, "config.json")))
    assert summary["uniform"] and LAYER_SIZES_KEY not in config and "auto_map" not in config
    assert not os.path.exists(os.path.join(out, "modeling_lctool_pruned.py"))
    assert config["num_key_value_heads"] == (1 if gqa_unit == "kv-groups" else 2)
    assert config["num_attention_heads"] == 2 and config["intermediate_size"] < arch.intermediate_size
    Checkpoint(out)  # every tensor has the shape the config implies
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # stock, no remote code
    kept = expected_kept(arch, scales, layer_sizes_of(config, arch), gqa_unit)
    reference = switched_off(original, arch, kept)
    torch.testing.assert_close(logits(pruned, IDS), logits(reference, IDS), atol=2e-5, rtol=1e-4)
    removed = sum(p.numel() for p in original.parameters()) - sum(p.numel() for p in pruned.parameters())
    assert removed == summary["removed_params"]
    assert abs(summary["removed_fraction"] - 0.25) < 0.05


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_non_uniform_prune_loads_with_remote_code_and_is_exact(tmp_path, family):
    from transformers import AutoModelForCausalLM

    path, original, scales = save_known(tmp_path, family, num_hidden_layers=3)
    arch = ModelArch(original.config.to_dict())
    out = str(tmp_path / "out")
    summary = prune(path, out, LlmPrunerOptions(ratio=0.2, importance="l2", layers="1-2", ranking="global"))
    config = json.load(open(os.path.join(out, "config.json")))
    assert not summary["uniform"] and "trust_remote_code" in summary["note"]
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_lctool_pruned.PrunedForCausalLM"}
    sizes = layer_sizes_of(config, arch)
    assert sizes[0] == (arch.num_heads, arch.num_kv_heads, arch.intermediate_size)  # outside --layers
    Checkpoint(out)
    source = open(os.path.join(out, "modeling_lctool_pruned.py")).read()
    assert "trust_remote_code" not in source.split('"""')[-1]  # docs may mention it; code never sets it
    with pytest.raises(Exception):  # noqa: B017 - stock classes refuse the per-layer shapes
        AutoModelForCausalLM.from_pretrained(out)
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True).eval()
    kept = {layer: k for layer, k in expected_kept(arch, scales, sizes, "query-heads").items() if layer > 0}
    reference = switched_off(original, arch, kept)
    torch.testing.assert_close(logits(pruned, IDS), logits(reference, IDS), atol=2e-5, rtol=1e-4)
    generated = pruned.generate(IDS[:1, :4], max_new_tokens=5, do_sample=False)  # KV cache with per-layer sizes
    assert generated.shape == (1, 9)


def test_multi_head_attention_prunes_heads_with_their_kv(tmp_path):
    from transformers import AutoModelForCausalLM

    path, original, scales = save_known(tmp_path, "mistral", num_key_value_heads=4)
    arch = ModelArch(original.config.to_dict())
    out = str(tmp_path / "out")
    prune(path, out, LlmPrunerOptions(ratio=0.2, importance="l2"))
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["num_attention_heads"] == config["num_key_value_heads"] < 4
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    kept = expected_kept(arch, scales, layer_sizes_of(config, arch), "query-heads")
    torch.testing.assert_close(logits(pruned, IDS), logits(switched_off(original, arch, kept), IDS),
                               atol=2e-5, rtol=1e-4)


def test_llama_head_count_stays_one_stock_config_accepts(tmp_path):
    """transformers' LlamaConfig refuses heads that do not divide hidden_size: 8 heads keep 4 or 8, not 6."""
    from transformers import AutoModelForCausalLM

    path, _, _ = save_known(tmp_path, "llama", num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    for ratio in (0.15, 0.2, 0.25, 0.3):
        out = str(tmp_path / f"r{ratio}")
        summary = prune(path, out, LlmPrunerOptions(ratio=ratio, importance="l2"))
        assert summary["stock_loadable"] and 64 % summary["layers"][0]["heads"] == 0
        AutoModelForCausalLM.from_pretrained(out)


def test_uniform_plan_with_a_head_count_stock_llama_refuses_gets_model_code():
    from lctool.prune.plan import LayerPlan, PrunePlan
    from lctool.prune.surgery import pruned_config

    config = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2, head_dim=8).config.to_dict()
    arch = ModelArch(config)
    plan = PrunePlan([LayerPlan(i, [0, 1, 2, 4, 5, 6], [0, 1], list(range(100)), True) for i in range(2)], 1, 0)
    out = pruned_config(config, arch, plan)
    assert out[LAYER_SIZES_KEY]["num_attention_heads"] == [6, 6] and "auto_map" in out
    assert out["num_attention_heads"] == 8  # what the stock class builds before the model code resizes
    mistral = tiny_model("mistral", num_attention_heads=8, num_key_value_heads=2, head_dim=8).config.to_dict()
    assert pruned_config(mistral, ModelArch(mistral), plan)["num_attention_heads"] == 6


def test_bias_rows_follow_their_heads(tmp_path):
    """Qwen2 carries q/k/v biases: each kept head keeps its own bias entries."""
    path, original, _ = save_known(tmp_path, "qwen2")
    with torch.no_grad():
        for name, p in original.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.arange(p.numel(), dtype=p.dtype))
    original.save_pretrained(path)
    out = str(tmp_path / "out")
    prune(path, out, LlmPrunerOptions(ratio=0.25, importance="l2", gqa_unit="kv-groups"))
    arch = ModelArch(original.config.to_dict())
    pruned = Checkpoint(out)
    k_bias = pruned.get(arch.module("k", 0) + ".bias")
    kept_kv = int(k_bias[0]) // arch.head_dim
    assert torch.equal(k_bias, torch.arange(kept_kv * arch.head_dim, (kept_kv + 1) * arch.head_dim).float())


# ---- importance ---------------------------------------------------------------------------------


def test_importance_formulas_on_a_known_matrix():
    from lctool.prune.importance import vector_scores

    w = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    g = torch.tensor([[2.0, 1.0], [-1.0, 0.5]])
    f = torch.tensor([[4.0, 1.0], [1.0, 2.0]])
    gen = torch.Generator().manual_seed(0)
    rows = lambda kind: vector_scores(kind, w, g, f, True, gen).tolist()  # noqa: E731
    assert rows("taylor-vector") == [0.0, 1.0]  # |1*2 - 2*1|, |-3 + 2|
    assert rows("taylor-element") == [4.0, 5.0]
    assert rows("second-order") == [abs(2 - 0.5 * 4) + abs(-2 - 0.5 * 4), abs(-3 - 0.5 * 9) + abs(2 - 0.5 * 32)]
    assert rows("l1") == [3.0, 7.0] and rows("l2") == [5.0, 25.0]
    assert vector_scores("l1", w, None, None, False, gen).tolist() == [4.0, 6.0]


def test_gradients_and_fisher_match_autograd():
    from lctool.prune.importance import collect_gradients

    model = tiny_model("llama")
    arch = ModelArch(model.config.to_dict())
    name = arch.weight("gate", 1)
    windows = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(0))
    got = collect_gradients(model, [name], windows, fisher=True)
    per_sample = []
    for row in windows:
        model.zero_grad()
        weight = dict(model.named_parameters())[name]
        weight.requires_grad_(True)
        model(input_ids=row[None], labels=row[None]).loss.backward()
        per_sample.append(weight.grad.clone())
    mean = torch.stack(per_sample).mean(0)
    torch.testing.assert_close(got.grad[name], mean, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(got.fisher[name], torch.stack(per_sample).pow(2).mean(0), atol=1e-8, rtol=1e-4)
    batched = collect_gradients(model, [name], windows, fisher=False, micro_batch=2)
    torch.testing.assert_close(batched.grad[name], mean, atol=1e-6, rtol=1e-4)
    assert not any(p.requires_grad for p in model.parameters())


def _removed_elements(arch: ModelArch, layer: int, role: str, removed: dict) -> torch.Tensor:
    """Mask of the elements of `role`'s weight in `layer` that the surgery deletes when the structures in
    `removed` (heads / kv / channels index lists) go: found by cutting a tensor of element numbers."""
    from lctool.prune.plan import LayerPlan, PrunePlan
    from lctool.prune.surgery import cut_tensor

    def kept(count: int, gone: list[int]) -> list[int]:
        return [i for i in range(count) if i not in gone]

    plans = [LayerPlan(i, list(range(arch.num_heads)), list(range(arch.num_kv_heads)),
                       list(range(arch.intermediate_size))) for i in range(arch.num_layers)]
    plans[layer] = LayerPlan(layer, kept(arch.num_heads, removed.get("heads", [])),
                             kept(arch.num_kv_heads, removed.get("kv", [])),
                             kept(arch.intermediate_size, removed.get("channels", [])), pruned=True)
    shape = arch.linear_shape(role, layer)
    numbers = torch.arange(shape[0] * shape[1]).reshape(shape)
    survivors = cut_tensor(arch, PrunePlan(plans, 1, 0), arch.weight(role, layer), numbers)
    mask = torch.ones(numbers.numel(), dtype=torch.bool)
    mask[survivors.reshape(-1)] = False
    return mask.reshape(shape)


def _brute_force_taylor(arch: ModelArch, layer: int, salience: dict, removed: dict, vector: bool) -> float:
    """First-order Taylor importance of removing `removed`, from per-element salience w * dL/dw: the sum of
    |salience| over every deleted element, or (vector) of |sum of salience| over every deleted row/column."""
    total = 0.0
    for role, s in salience.items():
        mask = _removed_elements(arch, layer, role, removed)
        if not vector:
            total += float(s[mask].abs().sum())
            continue
        whole_rows = mask.all(dim=1)  # cut rows (q/k/v/gate/up) go whole; cut columns (o/down) likewise
        whole_cols = mask.all(dim=0)
        if whole_rows.any():
            total += float(s[whole_rows].sum(dim=1).abs().sum())
        elif whole_cols.any():
            total += float(s[:, whole_cols].sum(dim=0).abs().sum())
    return total


@pytest.mark.parametrize("kind", ["taylor-element", "taylor-vector"])
def test_coupled_group_importance_is_the_brute_force_taylor_of_its_elements(kind):
    """Every structure's score (query head, kv head, whole GQA group, MLP channel) equals the first-order
    Taylor term of exactly the weights the surgery deletes with it, computed here from one plain autograd
    pass over all windows at once (lctool accumulates micro-batches)."""
    from lctool.arch import LINEAR_ROLES
    from lctool.prune.groups import attention_units, layer_shape
    from lctool.prune.importance import collect_gradients, layer_scores, prunable_weight_names

    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
    arch = ModelArch(model.config.to_dict())
    layer, g = 1, arch.gqa_group
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    names = prunable_weight_names(arch, [layer], list(LINEAR_ROLES))
    gradients = collect_gradients(model, names, windows, fisher=False, micro_batch=2)

    parameters = dict(model.named_parameters())
    for name in names:
        parameters[name].requires_grad_(True)
    model(input_ids=windows, labels=windows).loss.backward()
    salience = {role: (parameters[arch.weight(role, layer)] * parameters[arch.weight(role, layer)].grad).detach()
                for role in LINEAR_ROLES}
    weights = {role: parameters[arch.weight(role, layer)].detach() for role in LINEAR_ROLES}
    scores = layer_scores(arch, layer, kind, weights, gradients, torch.Generator())

    vector = kind == "taylor-vector"
    check_close = lambda got, structures: pytest.approx(  # noqa: E731
        _brute_force_taylor(arch, layer, salience, structures, vector), rel=1e-4, abs=1e-9) == float(got)
    for head in range(arch.num_heads):
        assert check_close(scores.heads[head], {"heads": [head]}), head
    for kv in range(arch.num_kv_heads):
        assert check_close(scores.kv_heads[kv], {"kv": [kv]}), kv
    for channel in (0, 5, arch.intermediate_size - 1):
        assert check_close(scores.channels[channel], {"channels": [channel]}), channel
    # A whole GQA group (--gqa-unit kv-groups): its k/v rows with the q rows and o columns of all its heads.
    units = attention_units(layer_shape(arch, layer), scores, "kv-groups")
    for unit_score, (kv,) in zip(units.scores, units.kv_heads, strict=True):
        group = {"kv": [kv], "heads": list(range(kv * g, (kv + 1) * g))}
        assert check_close(unit_score, group), kv
    assert min(float(scores.heads.min()), float(scores.channels.min())) > 0  # real gradients, not zeros


def test_default_layers_keep_the_first_and_last_dense(tmp_path, run_cli):
    path, original, _ = save_known(tmp_path, "llama", num_hidden_layers=4)
    arch = ModelArch(original.config.to_dict())
    out = str(tmp_path / "out")
    summary = prune(path, out, LlmPrunerOptions(ratio=0.15, importance="l2"))
    assert [row["pruned"] for row in summary["layers"]] == [False, True, True, False]
    dense = (arch.num_heads, arch.num_kv_heads, arch.intermediate_size)
    pruned = Checkpoint(out)
    for layer in (0, 3):
        assert tuple(summary["layers"][layer][k] for k in ("heads", "kv_heads", "intermediate_size")) == dense
        assert torch.equal(pruned.get(arch.weight("down", layer)), Checkpoint(path).get(arch.weight("down", layer)))
    summary = prune(path, out, LlmPrunerOptions(ratio=0.15, importance="l2", layers="all"), force=True)
    assert all(row["pruned"] for row in summary["layers"])
    summary = prune(path, out, LlmPrunerOptions(ratio=0.15, importance="l2", uniform=True), force=True)
    assert summary["uniform"] and all(row["pruned"] for row in summary["layers"])
    code, _, stderr = run_cli("prune", path, str(tmp_path / "too-much"), "--ratio", "0.5")
    assert code == 2 and "can remove fewer than" in stderr and "--layers all" in stderr, stderr


def test_two_layer_models_prune_every_layer_by_default(tmp_path):
    path, _, _ = save_known(tmp_path, "llama")
    summary = prune(path, str(tmp_path / "out"), LlmPrunerOptions(ratio=0.2, importance="l2"))
    assert all(row["pruned"] for row in summary["layers"])


@pytest.mark.parametrize("importance", ["taylor-vector", "taylor-element", "second-order", "random"])
def test_every_importance_runs_end_to_end(tmp_path, importance):
    path, _, _ = save_known(tmp_path, "llama")
    out = str(tmp_path / "out")
    summary = prune(path, out, LlmPrunerOptions(ratio=0.2, importance=importance, calib_n=4, calib_len=32))
    assert summary["uniform"]
    Checkpoint(out)
    manifest = json.load(open(os.path.join(out, "lctool.json")))
    assert manifest["operation"] == "prune" and manifest["parameters"]["importance"] == importance


def test_taylor_removes_what_the_loss_does_not_need(tmp_path):
    """A channel whose output is disconnected (zero down column) has zero Taylor importance: it goes first."""
    model = tiny_model("llama")
    arch = ModelArch(model.config.to_dict())
    dead = [5, 17, 33]
    with torch.no_grad():
        for layer in range(arch.num_layers):
            dict(model.named_modules())[arch.module("down", layer)].weight[:, dead] = 0
    path = str(tmp_path / "in")
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    out = str(tmp_path / "out")
    prune(path, out, LlmPrunerOptions(ratio=0.05, importance="taylor-element", scope="mlp", calib_n=4, calib_len=32))
    pruned = Checkpoint(out)
    down = pruned.get(arch.weight("down", 0))
    assert down.shape[1] < arch.intermediate_size
    original_cols = dict(model.named_modules())[arch.module("down", 0)].weight
    kept_cols = {tuple(col.tolist()) for col in down.T}
    for channel in dead:
        assert tuple(original_cols[:, channel].tolist()) not in kept_cols


# ---- ranking, budgets and multiples --------------------------------------------------------------


def test_ratio_and_multiples(tmp_path):
    path, _, _ = save_known(tmp_path, "llama", num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    for ratio in (0.1, 0.2, 0.3):
        out = str(tmp_path / f"r{ratio}")
        summary = prune(path, out, LlmPrunerOptions(ratio=ratio, importance="l2", scope="mlp"))
        assert abs(summary["removed_fraction"] - ratio) < 0.01  # MLP channels are fine-grained
    out = str(tmp_path / "multiples")
    summary = prune(path, out, LlmPrunerOptions(ratio=0.3, importance="l2", keep_heads_multiple=4, channel_multiple=16))
    for row in summary["layers"]:
        assert row["heads"] % 4 == 0 and row["intermediate_size"] % 16 == 0
        assert row["heads"] % row["kv_heads"] == 0


def test_global_ranking_keeps_every_layer_alive(tmp_path):
    path, _, _ = save_known(tmp_path, "llama", num_hidden_layers=3)
    out = str(tmp_path / "out")
    summary = prune(path, out, LlmPrunerOptions(ratio=0.5, importance="l2", ranking="global", layers="all"))
    assert all(row["heads"] >= 2 and row["intermediate_size"] >= 1 for row in summary["layers"])
    assert summary["removed_fraction"] >= 0.5
    Checkpoint(out)


def test_recovery_trains_lora_and_merges_it(tmp_path):
    from transformers import AutoModelForCausalLM

    path, _, _ = save_known(tmp_path, "llama", num_hidden_layers=3)
    text = tmp_path / "train.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    plain, recovered = str(tmp_path / "plain"), str(tmp_path / "recovered")
    prune(path, plain, LlmPrunerOptions(ratio=0.2, importance="l2", layers="1-2"))
    options = LlmPrunerOptions(ratio=0.2, importance="l2", layers="1-2",
                               recovery={"steps": 4, "lr": 1e-2, "seq_len": 32, "batch_size": 2, "data": str(text)})
    summary = prune(path, recovered, options)
    run = summary["recovery"]
    assert run["steps"] == 4 and run["final_loss"] < run["first_loss"]
    before, after = Checkpoint(plain), Checkpoint(recovered)
    assert sorted(before.tensor_names()) == sorted(after.tensor_names())  # merged: no adapter tensors
    name = ModelArch(before.config).weight("q", 1)
    assert not torch.equal(before.get(name), after.get(name))
    model = AutoModelForCausalLM.from_pretrained(recovered, trust_remote_code=True)
    assert torch.isfinite(logits(model, IDS)).all()


# ---- bad inputs: one line, exit 2, nothing written -----------------------------------------------


def _nothing_written(tmp_path, out: str) -> None:
    assert not os.path.exists(out)
    assert not [e for e in os.listdir(tmp_path) if ".lctool-tmp-" in e]


@pytest.mark.parametrize("args, message", [
    (["--ratio", "1"], "ratio: Input should be less than 1"),
    (["--ratio", "1.5"], "ratio"),
    (["--ratio", "0"], "ratio"),
    (["--ratio", "0.2", "--layers", "1-4"], "--layers 1-4: the model has layers 0-1"),
    (["--ratio", "0.2", "--layers", "x"], "--layers 'x'"),
    (["--ratio", "0.3", "--layers", "1-1"], "would prune all 4 attention heads of layer 1"),
    (["--ratio", "0.9"], "can remove fewer than"),
    (["--ratio", "0.2", "--importance", "bogus"], "importance"),
    (["--ratio", "0.2", "--uniform", "--layers", "0-1"], "--uniform"),
    (["--ratio", "0.2", "--keep-heads-multiple", "3"], "--keep-heads-multiple 3"),
    (["--ratio", "0.2", "--method", "nope"], "unknown pruning method 'nope'"),
    ([], "ratio: Field required"),
])  # fmt: skip
def test_bad_options_are_one_line_errors(tmp_path, run_cli, args, message):
    path, _, _ = save_known(tmp_path, "llama")
    out = str(tmp_path / "out")
    code, stdout, stderr = run_cli("prune", path, out, *args)
    assert code == 2, stderr
    assert stderr.strip().count("\n") == 0 and stderr.startswith("error: ") and message in stderr, stderr
    _nothing_written(tmp_path, out)


def test_quantized_input_is_refused(tmp_path, run_cli):
    path, _, _ = save_known(tmp_path, "llama")
    config_path = os.path.join(path, "config.json")
    config = json.load(open(config_path))
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    json.dump(config, open(config_path, "w"))
    out = str(tmp_path / "out")
    code, _, stderr = run_cli("prune", path, out, "--ratio", "0.2")
    assert code == 2 and stderr.startswith("error: ") and "quantized (gptq)" in stderr
    _nothing_written(tmp_path, out)


def test_existing_output_needs_force(tmp_path, run_cli):
    path, _, _ = save_known(tmp_path, "llama")
    out = str(tmp_path / "out")
    assert run_cli("prune", path, out, "--ratio", "0.2", "--importance", "l2")[0] == 0
    code, _, stderr = run_cli("prune", path, out, "--ratio", "0.2", "--importance", "l2")
    assert code == 2 and "--force" in stderr
    assert run_cli("prune", path, out, "--ratio", "0.3", "--importance", "l2", "--force")[0] == 0


def test_cli_states_trust_remote_code_for_non_uniform(tmp_path, run_cli):
    path, _, _ = save_known(tmp_path, "llama", num_hidden_layers=3)
    out = str(tmp_path / "out")
    code, stdout, stderr = run_cli("--quiet", "prune", path, out, "--ratio", "0.1", "--importance", "l2",
                                   "--layers", "1-2", "--json")
    assert code == 0, stderr
    assert "trust_remote_code=True" in stderr
    summary = json.loads(stdout)
    assert summary["uniform"] is False and summary["output"] == out


def test_option_of_another_method_is_refused():
    from lctool.prune import PruneMethod, options_for

    method = PruneMethod("other", LlmPrunerOptions, lambda *a, **k: {}, "")
    with pytest.raises(LctoolError, match="--population does not apply to --method other"):
        options_for(method, {"ratio": 0.2, "population": 8})


def test_per_layer_sizes_in_the_architecture_map():
    config = tiny_model("llama").config.to_dict()
    sized = {**config, LAYER_SIZES_KEY: {"num_attention_heads": [4, 2], "num_key_value_heads": [2, 2],
                                         "intermediate_size": [128, 40]}}
    arch = ModelArch(sized)
    assert arch.linear_shape("o", 1) == (64, 32) and arch.linear_shape("down", 1) == (64, 40)
    assert arch.linear_shape("q", 0) == (64, 64) and arch.intermediate_in(1) == 40
    bad = {**sized, LAYER_SIZES_KEY: {**sized[LAYER_SIZES_KEY], "num_attention_heads": [4, 3]}}
    with pytest.raises(LctoolError, match="layer 1 has 3 heads"):
        ModelArch(bad)
    with pytest.raises(LctoolError, match="must list 2 positive integers"):
        ModelArch({**sized, LAYER_SIZES_KEY: {**sized[LAYER_SIZES_KEY], "intermediate_size": [128]}})


def test_a_non_uniform_pruned_model_can_be_pruned_again(tmp_path):
    from transformers import AutoModelForCausalLM

    path, _, _ = save_known(tmp_path, "qwen3", num_hidden_layers=3)
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    prune(path, first, LlmPrunerOptions(ratio=0.15, importance="l2", layers="2-2", scope="mlp"))
    summary = prune(first, second, LlmPrunerOptions(ratio=0.1, importance="taylor-vector", layers="0-1",
                                                   calib_n=2, calib_len=32, ranking="global"))
    sizes = [row["intermediate_size"] for row in summary["layers"]]
    assert sizes[2] == json.load(open(os.path.join(first, "config.json")))[LAYER_SIZES_KEY]["intermediate_size"][2]
    model = AutoModelForCausalLM.from_pretrained(second, trust_remote_code=True)
    assert torch.isfinite(logits(model, IDS)).all()
