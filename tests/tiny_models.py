"""Tiny random models of every family in the architecture map, built in-process in milliseconds."""

from __future__ import annotations

import os

import torch

TINY_SHAPES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    max_position_embeddings=512,
)


def tiny_config(family: str = "llama", **overrides):
    from transformers import GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "gemma": GemmaConfig}
    return classes[family](**{**TINY_SHAPES, **overrides})


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    # Random init of norms is constant 1; perturb so tests see distinct values everywhere.
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def byte_tokenizer():
    """A 256-symbol byte-level tokenizer (ids = bytes), saved as a normal tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=sorted(alphabet)[0])


def save_tiny(path: str, family: str = "llama", seed: int = 0, with_tokenizer: bool = True, **overrides) -> str:
    """A tiny checkpoint folder saved by stock transformers (not by lctool)."""
    model = tiny_model(family, seed, **overrides)
    model.save_pretrained(path)
    if with_tokenizer:
        byte_tokenizer().save_pretrained(path)
    return os.fspath(path)
