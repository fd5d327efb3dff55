"""The FSDP write path: after sharded training the main process rebuilds the model and loads the gathered
weights into it (`lctool.train.trained_model`), and must write what an unsharded run writes.

accelerate only shards on GPUs (on CPU `--use_fsdp` starts unconnected single processes), so here the
loop is told it is sharded: `accelerator.get_state_dict` of one process is then the whole state dict, as
the main process of a real FSDP run receives it. The gather itself is accelerate's.
"""

from __future__ import annotations

import pytest

import lctool.train.loop as loop
from lctool.errors import LctoolError
from tests.reliability.common import Workspace, tree_digest

NAMES = ("finetune", "finetune-merged", "extend-e2llm", "extend-e2llm-lora", "extend-clex")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return Workspace(str(tmp_path_factory.mktemp("fsdp")))


def _run(run_cli, workspace, name, out):
    """The reliability suite's command for `name`; the -lora and -clex variants are E²-LLM's with LoRA or CLEX."""
    args = workspace.command(name.removesuffix("-lora").replace("clex", "e2llm"), str(out))
    if name.endswith("-lora"):
        args += ["--lora-rank", "4"]
    if name.endswith("clex"):
        args[args.index("e2llm")] = "clex"
    code, _, stderr = run_cli("-q", *args)
    assert code == 0, stderr


@pytest.mark.parametrize("name", NAMES)
def test_sharded_runs_write_what_unsharded_runs_write(run_cli, workspace, tmp_path, monkeypatch, name):
    _run(run_cli, workspace, name, tmp_path / "plain")
    gathered = []
    real_trained_model = loop.trained_model

    def spying_trained_model(model, result, rebuild):
        gathered.append(result.full_state_dict)
        return real_trained_model(model, result, rebuild)

    monkeypatch.setattr(loop, "is_sharded", lambda accelerator: True)
    for module in ("lctool.ops.finetune", "lctool.ops.extend.finetune", "lctool.train"):
        monkeypatch.setattr(f"{module}.trained_model", spying_trained_model, raising=False)
    _run(run_cli, workspace, name, tmp_path / "sharded")
    assert gathered and gathered[0], "the write did not go through the gathered state dict"
    assert tree_digest(str(tmp_path / "sharded")) == tree_digest(str(tmp_path / "plain"))


def test_trainers_that_cannot_gather_refuse_fsdp(monkeypatch):
    import torch

    from lctool.train import ShuffledWindows, TrainConfig, train

    monkeypatch.setattr(loop, "is_sharded", lambda accelerator: True)
    model = torch.nn.Linear(4, 4)
    data = ShuffledWindows({"input_ids": torch.zeros(4, 8, dtype=torch.long)}, batch_size=2, seed=0)
    with pytest.raises(LctoolError, match="does not run under FSDP"):
        train(model, data, TrainConfig(steps=1, lr=1e-3, progress=False, description="recovering"))
    with pytest.raises(LctoolError, match="resumable checkpoints"):
        train(model, data, TrainConfig(steps=2, lr=1e-3, checkpoint_dir="x", checkpoint_every=1, progress=False),
              sharded_ok=True)
