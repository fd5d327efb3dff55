"""Passkey retrieval, in the prompt format of the LongLoRA and YaRN evaluations.

A prompt is: the task description, filler sentences, the pass key line, more filler, the question,
joined by newlines. Its length is counted in tokens of the model's tokenizer (no special tokens):
the largest number of filler sentences is used whose prompt still fits in `length` tokens, and the
key line goes after round(depth x that number) of them (depth 0 = right after the description,
1 = right before the question). The model decodes greedily; the answer is right when the first
run of digits in what it writes is the key. Keys are 5-digit numbers drawn from `seed`, so a run is
reproducible and every (length, depth) cell sees the same keys.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from lctool.errors import LctoolError, check
from lctool.eval.progress import SILENT, Tracker
from lctool.eval.runners import model_device

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
QUESTION = "What is the pass key? The pass key is"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def key_line(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def filler_text(sentences: int) -> str:
    return " ".join(FILLER[i % len(FILLER)] for i in range(sentences))


def build_prompt(key: str, filler_sentences: int, depth: float) -> str:
    before = round(depth * filler_sentences)
    lines = [TASK, filler_text(before), key_line(key), filler_text(filler_sentences - before), QUESTION]
    return "\n".join(lines)


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str
    key: str
    tokens: int
    filler_sentences: int


def fit_prompt(tokenizer, key: str, length: int, depth: float) -> PasskeyPrompt:
    """The prompt with the most filler that is at most `length` tokens long."""
    check(0.0 <= depth <= 1.0, f"passkey depths must be between 0 and 1, got {depth}")
    bare = count_tokens(tokenizer, build_prompt(key, 0, depth))
    if bare > length:
        raise LctoolError(
            f"passkey length {length} is shorter than the prompt without filler ({bare} tokens)"
        )
    low, high = 0, max(1, length)  # a filler sentence is at least one token, so `length` is an upper bound
    while low < high:
        middle = (low + high + 1) // 2
        if count_tokens(tokenizer, build_prompt(key, middle, depth)) <= length:
            low = middle
        else:
            high = middle - 1
    text = build_prompt(key, low, depth)
    return PasskeyPrompt(text, key, count_tokens(tokenizer, text), low)


def draw_keys(seed: int, trials: int) -> list[str]:
    rng = random.Random(seed)
    return [str(rng.randint(10000, 99999)) for _ in range(trials)]


def first_number(answer: str) -> str | None:
    found = re.search(r"\d+", answer)
    return found.group(0) if found else None


def greedy_continuation(model, input_ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy decoding with the model's KV cache; no generation config or sampling involved."""
    device = model_device(model)
    ids = input_ids.to(device)[None]
    produced: list[int] = []
    past = None
    with torch.inference_mode():
        for _ in range(new_tokens):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            next_id = int(out.logits[0, -1].argmax())
            produced.append(next_id)
            ids = torch.tensor([[next_id]], device=device)
    return produced


def answer_tokens(tokenizer, key: str) -> int:
    """New tokens to decode: the key with a leading space, plus room for a stray token or two."""
    return count_tokens(tokenizer, f" {key}.") + 2


def passkey_trial(model, tokenizer, prompt: PasskeyPrompt) -> dict:
    ids = torch.tensor(
        tokenizer(prompt.text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long
    )
    produced = greedy_continuation(model, ids, answer_tokens(tokenizer, prompt.key))
    answer = tokenizer.decode(produced, skip_special_tokens=True)
    return {
        "key": prompt.key,
        "answer": answer,
        "correct": first_number(answer) == prompt.key,
        "prompt_tokens": prompt.tokens,
    }


def check_passkey_lengths(tokenizer, lengths: list[int], depths: list[float], trials: int, seed: int) -> None:
    """Fail early, before any model work, when a length cannot hold the prompt without filler."""
    for key in draw_keys(seed, trials):
        for depth in depths:
            fit_prompt(tokenizer, key, min(lengths), depth)


def passkey_accuracy(
    model,
    tokenizer,
    lengths: list[int],
    depths: list[float] = DEFAULT_DEPTHS,
    trials: int = 3,
    seed: int = 0,
    tracker: Tracker = SILENT,
) -> dict:
    """Accuracy over the grid lengths x depths, `trials` keys per cell; also per cell and per length."""
    check(len(lengths) > 0 and all(length >= 1 for length in lengths), "passkey lengths must be positive")
    check(len(depths) > 0, "passkey depths must not be empty")
    check(trials >= 1, f"--passkey-trials must be at least 1, got {trials}")
    keys = draw_keys(seed, trials)
    prompts = {
        (length, depth): [fit_prompt(tokenizer, key, length, depth) for key in keys]
        for length in lengths
        for depth in depths
    }
    tracker.start("passkey", sum(p.tokens for cell in prompts.values() for p in cell))
    cells = []
    for (length, depth), cell_prompts in prompts.items():
        results = []
        for prompt in cell_prompts:
            results.append(passkey_trial(model, tokenizer, prompt))
            tracker.advance(prompt.tokens)
        correct = sum(r["correct"] for r in results)
        cells.append({
            "length": length,
            "depth": depth,
            "correct": correct,
            "trials": trials,
            "accuracy": correct / trials,
            "prompt_tokens": max(r["prompt_tokens"] for r in results),
            "answers": [r["answer"] for r in results],
        })  # fmt: skip
    by_length = [
        {
            "length": length,
            "accuracy": sum(c["correct"] for c in cells if c["length"] == length) / (trials * len(depths)),
        }
        for length in lengths
    ]
    return {
        "accuracy": sum(c["correct"] for c in cells) / (trials * len(cells)),
        "by_length": by_length,
        "cells": cells,
        "keys": keys,
        "seed": seed,
    }
