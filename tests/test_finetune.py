"""`lctool finetune`: stock-loadable adapters, exact merges, QLoRA on CPU, resume, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lctool.arch import ModelArch
from lctool.errors import LctoolError
from tests.tiny_models import save_tiny

TEXT = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 60)
COMMON = ["--seq-len", "32", "--batch", "4", "--lr", "3e-3", "--lora-r", "4", "--lora-alpha", "8", "--seed", "3", "-q"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ft")
    save_tiny(str(folder / "base"), tie_word_embeddings=True)
    (folder / "data.txt").write_text(TEXT)
    return folder


def finetune(run_cli, base, out, *extra):
    code, stdout, stderr = run_cli("-q", "finetune", base / "base", out, "--data", base / "data.txt", *COMMON[:-1], *extra)
    assert code == 0, stderr
    return stdout


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_loads_in_stock_peft_and_changes_the_model(run_cli, base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    summary = json.loads(finetune(run_cli, base, out, "--steps", "8", "--json"))
    assert summary["kind"] == "adapter" and summary["steps"] == 8
    assert summary["final_loss"] < summary["first_loss"]
    assert {"adapter_config.json", "adapter_model.safetensors", "lctool.json", "tokenizer.json", "train_log.jsonl"} <= set(os.listdir(out))
    assert len(open(out / "train_log.jsonl").read().splitlines()) == 8
    assert not os.path.exists(tmp_path / ".adapter.lctool-train")  # training checkpoints are gone

    arch = ModelArch(json.load(open(base / "base" / "config.json")))
    config = json.load(open(out / "adapter_config.json"))
    assert sorted(config["target_modules"]) == arch.module_names_for_roles(arch.linear_roles("all"))

    stock_base = AutoModelForCausalLM.from_pretrained(base / "base")
    ids = torch.arange(20).view(1, -1)
    before = logits(stock_base, ids)
    adapted = PeftModel.from_pretrained(stock_base, out).eval()
    assert not torch.allclose(logits(adapted, ids), before, atol=1e-4)
    manifest = json.load(open(out / "lctool.json"))
    assert manifest["operation"] == "finetune" and manifest["parameters"]["lora_r"] == 4


def test_merge_equals_peft_merge_and_unload(run_cli, base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    finetune(run_cli, base, tmp_path / "adapter", "--steps", "4", "--target", "q,v,down")
    finetune(run_cli, base, tmp_path / "merged", "--steps", "4", "--target", "q,v,down", "--merge")
    assert json.load(open(tmp_path / "adapter" / "adapter_config.json"))["target_modules"] is not None

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base / "base"), tmp_path / "adapter")
    expected = reference.merge_and_unload().state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    actual = merged.state_dict()
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=0)
    assert json.load(open(tmp_path / "merged" / "config.json"))["use_cache"] is True
    assert json.load(open(tmp_path / "merged" / "lctool.json"))["operation"] == "finetune"


def test_trainable_embeddings_and_norms_are_saved_the_peft_way(run_cli, base, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    finetune(run_cli, base, out, "--steps", "4", "--trainable", "embed,norm", "--target", "attn")
    config = json.load(open(out / "adapter_config.json"))
    arch = ModelArch(json.load(open(base / "base" / "config.json")))
    leaf = {arch.module(role, 0).rsplit(".", 1)[-1] for role in ("input_norm", "post_attn_norm")}
    assert leaf | {arch.module("embed").rsplit(".", 1)[-1]} <= set(config["modules_to_save"])
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert any(arch.module("embed") in n for n in names)
    assert any(arch.module("final_norm") + "." in n for n in names)

    stock_base = AutoModelForCausalLM.from_pretrained(base / "base")
    embed_before = stock_base.get_input_embeddings().weight.detach().clone()
    adapted = PeftModel.from_pretrained(stock_base, out).merge_and_unload()
    assert not torch.equal(adapted.get_input_embeddings().weight, embed_before)
    # Tied embeddings stay tied after training the embedding matrix.
    assert torch.equal(adapted.get_output_embeddings().weight, adapted.get_input_embeddings().weight)


def test_qlora_trains_on_cpu_and_its_adapter_loads_on_the_full_base(run_cli, base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "qlora"
    summary = json.loads(finetune(run_cli, base, out, "--steps", "6", "--qlora", "--json"))
    assert summary["final_loss"] < summary["first_loss"]
    assert json.load(open(out / "lctool.json"))["parameters"]["qlora"] is True
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base / "base"), out)
    ids = torch.arange(20).view(1, -1)
    assert torch.isfinite(logits(adapted, ids)).all()

    merged = tmp_path / "qlora-merged"
    finetune(run_cli, base, merged, "--steps", "6", "--qlora", "--merge")
    config = json.load(open(merged / "config.json"))
    assert "quantization_config" not in config  # merged into the full-precision base
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base / "base"), out).merge_and_unload()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(merged), ids), logits(expected, ids),
                               atol=1e-4, rtol=0)


def test_completion_only_jsonl(run_cli, base, tmp_path):
    from lctool.io.hf import load_tokenizer
    from lctool.ops.finetune import jsonl_examples

    rows = [{"prompt": f"Q{i}: what is {i}+{i}? ", "completion": f"A: {2 * i}"} for i in range(24)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tokenizer = load_tokenizer(str(base / "base"))
    examples = jsonl_examples(tokenizer, str(path), 32)
    first_prompt = len(tokenizer(rows[0]["prompt"], add_special_tokens=False)["input_ids"])
    assert (examples["labels"][0, :first_prompt] == -100).all()
    assert (examples["labels"][0, first_prompt:first_prompt + 4] == examples["input_ids"][0, first_prompt:first_prompt + 4]).all()
    assert (examples["attention_mask"].sum(1) < 32).all()

    code, _, stderr = run_cli("-q", "finetune", base / "base", tmp_path / "out", "--data", path, "--steps", "3",
                              "--seq-len", "32", "--batch", "4")
    assert code == 0, stderr
    text_rows = tmp_path / "text.jsonl"
    text_rows.write_text("\n".join(json.dumps({"text": TEXT[:400]}) for _ in range(8)))
    code, _, stderr = run_cli("-q", "finetune", base / "base", tmp_path / "out2", "--data", text_rows, "--steps", "2",
                              "--seq-len", "32", "--batch", "4")
    assert code == 0, stderr


@pytest.mark.parametrize(
    "extra, data, message",
    [
        ([], "", "is empty"),
        (["--seq-len", "4096"], TEXT, "beyond the model's context of 512"),
        (["--target", "q,qq"], TEXT, "unknown role 'qq'"),
        (["--trainable", "everything"], TEXT, "unknown group"),
        (["--lora-dropout", "1.5"], TEXT, "lora_dropout"),
        (["--steps", "2", "--epochs", "1"], TEXT, "not both"),
        (["--steps", "2", "--warmup", "5"], TEXT, "warmup"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(run_cli, base, tmp_path, extra, data, message):
    source = tmp_path / "data.txt"
    source.write_text(data)
    code, stdout, stderr = run_cli("finetune", base / "base", tmp_path / "out", "--data", source, "--seq-len", "32",
                                   *extra)
    assert code == 2, stderr
    assert message in stderr and stderr.startswith("error:") and len(stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == ["data.txt"]


def test_bad_jsonl_and_existing_output(run_cli, base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"question": "no"}\n')
    code, _, stderr = run_cli("finetune", base / "base", tmp_path / "out", "--data", bad, "--steps", "1")
    assert code == 2 and "bad.jsonl:2" in stderr
    (tmp_path / "exists").mkdir()
    code, _, stderr = run_cli("finetune", base / "base", tmp_path / "exists", "--data", base / "data.txt", "--steps", "1")
    assert code == 2 and "already exists" in stderr


def test_adapter_for_a_different_base_is_refused(run_cli, base, tmp_path):
    from lctool.ops.finetune import load_adapter

    finetune(run_cli, base, tmp_path / "adapter", "--steps", "2")
    other_weights = save_tiny(str(tmp_path / "other"), seed=7, tie_word_embeddings=True)
    with pytest.raises(LctoolError, match="different base"):
        load_adapter(str(tmp_path / "adapter"), other_weights)
    wider = save_tiny(str(tmp_path / "wider"), hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                      tie_word_embeddings=True)
    os.remove(tmp_path / "adapter" / "lctool.json")  # a plain peft adapter: only shapes to go by
    with pytest.raises(LctoolError, match="different base"):
        load_adapter(str(tmp_path / "adapter"), wider)
    model = load_adapter(str(tmp_path / "adapter"))  # its own base, from adapter_config.json
    assert torch.isfinite(logits(model, torch.arange(8).view(1, -1))).all()


def test_resume_refuses_a_different_base(run_cli, base, tmp_path, monkeypatch):
    import shutil

    import lctool.ops.finetune as ops

    monkeypatch.setattr(ops, "discard_training_folder", lambda folder: None)  # keep step 1's checkpoint
    args = ["--data", base / "data.txt", *COMMON[:-1], "--steps", "2", "--checkpoint-every", "1"]
    assert run_cli("-q", "finetune", base / "base", tmp_path / "out", *args)[0] == 0
    shutil.rmtree(tmp_path / "out")
    assert os.path.isdir(tmp_path / ".out.lctool-train" / "step-00000001")

    other = save_tiny(str(tmp_path / "other"), seed=7, tie_word_embeddings=True)
    code, _, stderr = run_cli("finetune", other, tmp_path / "out", *args, "--resume")
    assert code == 2 and "cannot resume" in stderr and "base" in stderr
    code, _, stderr = run_cli("finetune", other, tmp_path / "out", *args)
    assert code == 2 and "--resume" in stderr and not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_sigterm_saves_and_resume_gives_the_same_adapter(run_cli, base, tmp_path):
    from safetensors.torch import load_file

    args = ["finetune", base / "base", None, "--data", base / "data.txt", *COMMON[:-1], "--steps", "150",
            "--checkpoint-every", "50"]
    reference = tmp_path / "reference"
    lctool = os.path.join(os.path.dirname(sys.executable), "lctool")
    command = [lctool, "-q", *[str(reference if a is None else a) for a in args]]

    interrupted = tmp_path / "interrupted"
    command_b = [lctool, "-q", *[str(interrupted if a is None else a) for a in args]]
    # One thread: on a shared 2-core box two OpenMP threads spin and run tiny models ~30x slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command_b, stderr=subprocess.PIPE, text=True, env=env)
    log = tmp_path / ".interrupted.lctool-train" / "train_log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 5):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted at step" in stderr and "resume" in stderr
    assert not interrupted.exists()
    assert (tmp_path / ".interrupted.lctool-train" / "latest.json").exists()

    code, _, stderr = run_cli("-q", *[str(interrupted if a is None else a) for a in args], "--resume")
    assert code == 0, stderr
    assert subprocess.run(command, capture_output=True, env=env).returncode == 0
    got, expected = load_file(interrupted / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert [json.loads(x)["step"] for x in open(interrupted / "train_log.jsonl")] == list(range(1, 151))


@pytest.mark.testbed
@pytest.mark.slow
def test_lora_on_the_testbed_lowers_shakespeare_perplexity(testbed_dir, tmp_path):
    from lctool.data import load_text_source
    from lctool.eval import perplexity
    from lctool.io.hf import load_causal_lm, load_tokenizer
    from lctool.ops.finetune import FinetuneOptions, finetune, load_adapter

    options = FinetuneOptions(data="shakespeare", seq_len=128, batch=4, steps=15, lr=1e-3, warmup=2, seed=0)
    summary = finetune(testbed_dir, str(tmp_path / "adapter"), options, progress=False)
    assert summary["final_loss"] < summary["first_loss"]
    tokenizer = load_tokenizer(testbed_dir)
    text = load_text_source("shakespeare", "eval")
    before = perplexity(load_causal_lm(testbed_dir), tokenizer, text, ctx=256, max_tokens=4096)["ppl"]
    after = perplexity(load_adapter(str(tmp_path / "adapter")), tokenizer, text, ctx=256, max_tokens=4096)["ppl"]
    assert after < 0.95 * before


@pytest.mark.parametrize("merge", [False, True], ids=["adapter", "merged"])
def test_runs_under_accelerate_launch_with_two_processes(base, tmp_path, merge):
    """Both processes train; only the main one writes (another writer would be refused mid-run)."""
    from tests.conftest import free_port

    port = str(free_port())
    out = tmp_path / "ddp"
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # `launch --cpu` starts one process on accelerate 1.15; --multi_gpu starts two (CPU/gloo here).
    done = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", port, "-m", "lctool.cli.main", "-q", "finetune",
         str(base / "base"), str(out), "--data", str(base / "data.txt"), *COMMON[:-1], "--steps", "3", "--json",
         *(["--merge"] if merge else [])],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.JSONDecoder().raw_decode(done.stdout[done.stdout.index("{"):])[0]
    assert summary["steps"] == 3 and summary["num_processes"] == 2
    assert (out / ("model.safetensors" if merge else "adapter_model.safetensors")).exists()
    assert not [p for p in os.listdir(tmp_path) if p != "ddp" and "lock" not in p]  # no temp or training folder left
