"""Helpers of the merge tests (no tests here): fine-tunes of a tiny base, mergekit as a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess

import torch
import yaml
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MERGEKIT_VENV = os.environ.get("LCTOOL_MERGEKIT_VENV", os.path.join(ROOT, ".venv-mergekit"))
MERGEKIT_YAML = os.path.join(MERGEKIT_VENV, "bin", "mergekit-yaml")
MERGEKIT_MISSING = (
    f"mergekit is not installed in {MERGEKIT_VENV} (run bench/setup_mergekit.sh, or `make test` does it)"
)


def mergekit_available() -> bool:
    return os.access(MERGEKIT_YAML, os.X_OK)


def save_finetunes(folder: str, count: int = 2, family: str = "llama", scale: float = 0.02, seed: int = 0, **overrides):
    """A tiny base and `count` fine-tunes (base + Gaussian deltas of `scale` × each tensor's std).

    Deltas are continuous fp32 values, so no two magnitudes tie at a TIES cut.
    """
    from tests.tiny_models import byte_tokenizer, tiny_model

    base = tiny_model(family, seed=seed, **overrides)
    tokenizer = byte_tokenizer()
    paths = [os.path.join(folder, "base")]
    base.save_pretrained(paths[0])
    tokenizer.save_pretrained(paths[0])
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for index in range(count):
        generator = torch.Generator().manual_seed(1000 + index + 17 * seed)
        with torch.no_grad():
            for name, parameter in base.named_parameters():
                spread = state[name].std().item() if state[name].numel() > 1 else 1.0
                noise = torch.randn(parameter.shape, generator=generator) * scale * max(spread, 1e-3)
                parameter.copy_(state[name] + noise)
        path = os.path.join(folder, f"ft{index + 1}")
        base.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    with torch.no_grad():
        for name, parameter in base.named_parameters():
            parameter.copy_(state[name])
    return paths


def write_yaml(path: str, config: dict) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def run_mergekit(config_path: str, out: str, seed: int | None = None, threads: int = 1) -> None:
    """mergekit-yaml from the side environment, offline, on the CPU."""
    command = [MERGEKIT_YAML, config_path, out, "--no-write-model-card", "--copy-tokenizer", "--allow-crimes", "--quiet"]
    if seed is not None:
        command += ["--random-seed", str(seed)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(threads),
               CUDA_VISIBLE_DEVICES="")
    if os.path.exists(out):
        shutil.rmtree(out)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"mergekit failed ({result.returncode}):\n{result.stderr[-3000:]}")


def load_tensors(folder: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(os.listdir(folder)):
        if file.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, file)))
    return tensors


def max_abs_diff(a: dict, b: dict) -> tuple[float, str]:
    assert sorted(a) == sorted(b), f"tensor names differ: {sorted(set(a) ^ set(b))[:5]}"
    worst, where = 0.0, ""
    for name in a:
        assert a[name].shape == b[name].shape, name
        diff = (a[name].double() - b[name].double()).abs().max().item()
        if diff > worst:
            worst, where = diff, name
    return worst, where


def save_extended_vocab(source: str, target: str, tokens: list[str], seed: int = 5) -> str:
    """A copy of `source` with extra tokens: tokenizer entries and new embedding/lm_head rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.add_tokens(tokens)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for embedding in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            rows = embedding.weight[-len(tokens):]
            rows.copy_(torch.randn(rows.shape, generator=generator) * 0.02)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


# One Python process in the side environment runs every mergekit merge of a test session: its imports
# cost 6-20 s, the merges of tiny models a fraction of a second.
MERGEKIT_BATCH = r"""
import json, sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for config_path, out, seed in json.loads(sys.argv[1]):
    with open(config_path) as f:
        config = MergeConfiguration.model_validate(yaml.safe_load(f))
    run_merge(config, out, MergeOptions(random_seed=seed, copy_tokenizer=True, allow_crimes=True, quiet=True,
                                         write_model_card=False))
"""


def run_mergekit_batch(jobs: list[tuple[str, str, int | None]], threads: int = 1) -> None:
    """Run (config, out, seed) merges through mergekit in one process."""
    import json

    python = os.path.join(MERGEKIT_VENV, "bin", "python")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(threads),
               CUDA_VISIBLE_DEVICES="", PYTHONPATH="")
    for _, out, _ in jobs:
        if os.path.exists(out):
            shutil.rmtree(out)
    result = subprocess.run([python, "-c", MERGEKIT_BATCH, json.dumps(jobs)], env=env, capture_output=True,
                            text=True, timeout=1200)
    if result.returncode != 0:
        raise AssertionError(f"mergekit failed ({result.returncode}):\n{result.stderr[-3000:]}")


def save_checkpoint_finetunes(source: str, folder: str, scales=(0.02, 0.03), seed: int = 0) -> list[str]:
    """A copy of any checkpoint folder (`base`) and fine-tunes of it: Gaussian deltas of `scale` × each
    tensor's std added. Configs get `architectures`, which mergekit requires, when the source lacks it."""
    import json

    from safetensors.torch import save_file

    from lctool.io import Checkpoint

    checkpoint = Checkpoint(source)
    config = dict(checkpoint.config)
    config.setdefault("architectures", [checkpoint.arch.family.causal_lm_class])
    paths = []
    for index, scale in enumerate((0.0, *scales)):
        path = os.path.join(folder, f"ft{index}" if index else "base")
        os.makedirs(path)
        generator = torch.Generator().manual_seed(seed * 100 + index)
        tensors = {}
        for name, tensor in checkpoint.iter_tensors():
            value = tensor.float()
            spread = max(value.std().item() if value.numel() > 1 else 1.0, 1e-3)
            noise = torch.randn(value.shape, generator=generator) * scale * spread if scale else 0.0
            tensors[name] = (value + noise).to(tensor.dtype)
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        for file in checkpoint.carried_files():
            shutil.copyfile(os.path.join(source, file), os.path.join(path, file))
        paths.append(path)
    return paths
