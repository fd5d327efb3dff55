"""The shared training loop: hooks, logs, exact resume after a stop or a kill, and 2-process DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from pydantic import ValidationError

from lctool.errors import LctoolError
from lctool.train import ShuffledWindows, TrainConfig, TrainingInterrupted, train
from tests.conftest import free_port
from tests.tiny_models import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def windows(n=48, seq_len=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # A learnable stream: repeated short patterns with noise, so the loss falls within a few steps.
    pattern = torch.randint(0, 256, (8,), generator=generator)
    ids = pattern.repeat(n * seq_len // 8 + 1)[: n * seq_len].view(n, seq_len).clone()
    noise = torch.rand(ids.shape, generator=generator) < 0.1
    ids[noise] = torch.randint(0, 256, (int(noise.sum()),), generator=generator)
    return ids


def config(tmp_path, **overrides):
    base = dict(steps=20, lr=3e-3, warmup_steps=3, batch_size=4, grad_accum=2, seed=1, progress=False,
                checkpoint_dir=str(tmp_path / "ckpt"), log_path=str(tmp_path / "log.jsonl"))
    return TrainConfig(**{**base, **overrides})


def model_with_dropout():
    return tiny_model("llama", attention_dropout=0.2)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_full_training_lowers_loss_and_logs_every_step(tmp_path):
    model = tiny_model()
    result = train(model, ShuffledWindows({"input_ids": windows()}, 4, seed=0), config(tmp_path, grad_accum=1))
    assert result.steps == 20 and len(result.losses) == 20
    assert result.losses[-1] < result.losses[0] - 1.0
    assert result.tokens == 20 * 4 * 32 and result.tokens_per_s > 0 and result.peak_rss_mb > 0
    lines = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [line["step"] for line in lines] == list(range(1, 21))
    assert {"loss", "lr", "tokens_per_s", "grad_norm"} <= set(lines[0])
    assert lines[1]["lr"] > lines[0]["lr"]  # warmup
    assert not model.training
    assert model.config.use_cache  # switched off for training only


def test_single_examples_are_stacked_into_micro_batches_and_a_generator_may_run_out(tmp_path):
    seen = []

    def before_step(step, model, batch):
        seen.append((step, tuple(batch["input_ids"].shape)))
        return batch

    examples = ({"input_ids": row} for row in windows(n=20))  # one-shot: 5 micro-batches of 4
    result = train(tiny_model(), examples, config(tmp_path, checkpoint_dir=None, grad_accum=1, warmup_steps=0),
                   before_step=before_step)
    assert result.steps == 5
    assert seen == [(s, (4, 32)) for s in range(5)]


def test_custom_loss_and_eval_hooks(tmp_path):
    calls = {"loss": 0, "eval": []}

    def completion_only(model, batch):
        calls["loss"] += 1
        labels = batch["input_ids"].clone()
        labels[:, :16] = -100
        return model(input_ids=batch["input_ids"], labels=labels).loss

    def evaluate(model):
        assert not model.training and not torch.is_grad_enabled()
        calls["eval"].append(1)
        return {"ppl": 1.0}

    result = train(tiny_model(), [{"input_ids": windows(n=4)}], config(tmp_path, steps=6, eval_every=3, grad_accum=1),
                   loss_fn=completion_only, eval_fn=evaluate)
    assert calls["loss"] == 6 and len(calls["eval"]) == 2
    assert [e["step"] for e in result.evals] == [3, 6]
    logged = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert sum("eval" in line for line in logged) == 2


def test_only_parameters_that_require_grad_change(tmp_path):
    model = tiny_model()
    for name, parameter in model.named_parameters():
        parameter.requires_grad = "mlp" in name
    before = weights(model)
    train(model, [{"input_ids": windows(n=4)}], config(tmp_path, steps=3, checkpoint_dir=None))
    after = weights(model)
    for name in before:
        assert torch.equal(before[name], after[name]) != ("mlp" in name), name


def test_options_are_validated():
    with pytest.raises(ValidationError):
        TrainConfig(steps=10, lr=1e-3, unknown_option=1)
    with pytest.raises(ValidationError):
        TrainConfig(steps=0, lr=1e-3)
    with pytest.raises(ValidationError):
        TrainConfig(steps=5, lr=1e-3, warmup_steps=6)
    with pytest.raises(ValidationError):
        TrainConfig(steps=5, lr=1e-3, resume=True)
    model = tiny_model()
    for parameter in model.parameters():
        parameter.requires_grad = False
    with pytest.raises(LctoolError, match="nothing to train"):
        train(model, [{"input_ids": windows(n=4)}], TrainConfig(steps=1, lr=1e-3, progress=False))


def _stop_at(step_to_stop):
    sent = []

    def before_step(step, model, batch):
        if step == step_to_stop and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)  # handled: the step finishes, a checkpoint is saved
        return batch

    return before_step


def test_stop_and_resume_matches_an_uninterrupted_run_exactly(tmp_path):
    data = ShuffledWindows({"input_ids": windows()}, 4, seed=3)
    reference_model = model_with_dropout()
    reference = train(reference_model, data, config(tmp_path / "a"))

    model = model_with_dropout()
    with pytest.raises(TrainingInterrupted) as stopped:
        train(model, data, config(tmp_path / "b"), before_step=_stop_at(9))
    assert stopped.value.result.steps == 10
    assert os.path.isdir(tmp_path / "b" / "ckpt" / "step-00000010")

    resumed_model = model_with_dropout()  # a fresh process would start from the base weights again
    resumed = train(resumed_model, data, config(tmp_path / "b", resume=True))
    assert resumed.start_step == 10
    assert resumed.losses[10:] == reference.losses[10:]
    assert resumed.losses[:10] == reference.losses[:10]  # history restored from the checkpoint
    final, expected = weights(resumed_model), weights(reference_model)
    assert all(torch.equal(final[n], expected[n]) for n in expected)
    log_steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "log.jsonl")]
    assert log_steps == list(range(1, 21))


def test_resume_refuses_changed_options_or_a_different_run(tmp_path):
    data = [{"input_ids": windows(n=8)}]
    with pytest.raises(TrainingInterrupted):
        train(tiny_model(), data, config(tmp_path), before_step=_stop_at(1), tag={"base": "A"})
    with pytest.raises(LctoolError, match="lr was"):
        train(tiny_model(), data, config(tmp_path, resume=True, lr=1e-2), tag={"base": "A"})
    with pytest.raises(LctoolError, match="different run"):
        train(tiny_model(), data, config(tmp_path, resume=True), tag={"base": "B"})


KILLED_RUN = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {repo!r})
    torch.set_num_threads(1)
    from lctool.train import ShuffledWindows, TrainConfig, train
    from tests.test_train import config_for_subprocess, model_with_dropout, windows

    def hang_after_checkpoint(step, model, batch):
        if step == 12:
            print("waiting to be killed", flush=True)
            time.sleep(600)
        return batch

    train(model_with_dropout(), ShuffledWindows({{"input_ids": windows()}}, 4, seed=3),
          config_for_subprocess(sys.argv[1]), before_step=hang_after_checkpoint)
""")


def config_for_subprocess(folder, **overrides):
    from pathlib import Path

    return config(Path(folder), checkpoint_every=10, **overrides)


@pytest.mark.slow
def test_kill_then_resume_matches_an_uninterrupted_run(tmp_path):
    data = ShuffledWindows({"input_ids": windows()}, 4, seed=3)
    reference_model = model_with_dropout()
    reference = train(reference_model, data, config_for_subprocess(tmp_path / "a"))

    script = tmp_path / "killed.py"
    script.write_text(KILLED_RUN.format(repo=REPO))
    process = subprocess.Popen([sys.executable, str(script), str(tmp_path / "b")], stdout=subprocess.PIPE, text=True)
    try:
        assert "waiting to be killed" in process.stdout.readline()
    finally:
        process.kill()  # SIGKILL: no chance to save; the step-10 checkpoint must do
        process.wait()
    assert json.load(open(tmp_path / "b" / "ckpt" / "latest.json"))["step"] == 10

    resumed_model = model_with_dropout()
    resumed = train(resumed_model, data, config_for_subprocess(tmp_path / "b", resume=True))
    assert resumed.losses[10:] == reference.losses[10:]
    final, expected = weights(resumed_model), weights(reference_model)
    assert all(torch.equal(final[n], expected[n]) for n in expected)


DDP_RUN = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {repo!r})
    torch.set_num_threads(1)
    from accelerate import PartialState
    from safetensors.torch import save_file
    from lctool.train import TrainConfig, train
    from tests.test_train import tiny_model, windows

    model = tiny_model()
    data = [{{"input_ids": w}} for w in windows(n=16).split(2)]  # 8 micro-batches of 2
    result = train(model, data, TrainConfig(steps=4, lr=3e-3, batch_size=2, seed=1, progress=False))
    rank = PartialState().process_index
    save_file({{n: p.detach().contiguous() for n, p in model.named_parameters()}}, f"{{sys.argv[1]}}/rank{{rank}}.safetensors")
    print("losses", rank, result.losses, result.num_processes, flush=True)
""")


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_agree(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "ddp.py"
    script.write_text(DDP_RUN.format(repo=REPO))
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    started = time.time()
    # accelerate 1.15's `launch --cpu` starts ONE process unless mpirun is set up; `--multi_gpu` starts
    # two through torchrun, and on a machine without CUDA the loop makes them CPU processes with gloo.
    done = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", env["MASTER_PORT"], str(script), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, start_new_session=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)
    assert "2" in [line.split()[-1] for line in done.stdout.splitlines() if line.startswith("losses")]

    # Two processes of one micro-batch each = one process accumulating the same two micro-batches.
    single = tiny_model()
    data = [{"input_ids": w} for w in windows(n=16).split(2)]
    train(single, data, TrainConfig(steps=4, lr=3e-3, batch_size=2, grad_accum=2, seed=1, progress=False))
    for name, parameter in single.named_parameters():
        torch.testing.assert_close(rank0[name], parameter.detach(), rtol=1e-5, atol=1e-6)
    assert time.time() - started < 300
