"""Token streams cut into fixed-length windows: every window of an eval text, or a seeded sample for calibration."""

from __future__ import annotations

import math
import random

import tokenizers
import torch

from lctool.data.corpora import load_text_source
from lctool.errors import LctoolError, check

# Calibration windows may overlap when the text is short, but each token may be covered by at
# most this many windows on average; past that the batch repeats itself rather than samples.
MAX_TOKEN_REUSE = 4


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The text's token ids as a 1-D LongTensor, without any special tokens added.

    `tokenizer` is a Hugging Face tokenizer (PreTrainedTokenizerBase) or a `tokenizers.Tokenizer`.
    """
    if isinstance(tokenizer, tokenizers.Tokenizer):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
    else:
        from transformers import PreTrainedTokenizerBase

        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(
                f"expected a transformers or tokenizers tokenizer, got {type(tokenizer).__name__}"
            )
        # verbose=False: the text is meant to be longer than the model's context; it is cut later.
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_windows(token_ids: torch.Tensor, seq_len: int, stride: int | None = None) -> torch.Tensor:
    """Windows [num_windows, seq_len] starting at 0, stride, 2*stride, ...; a short tail is dropped.

    `stride` defaults to `seq_len` (back-to-back windows); a smaller stride makes them overlap.
    """
    check(token_ids.dim() == 1, f"token ids must be one sequence (1-D), got shape {tuple(token_ids.shape)}")
    check(seq_len >= 1, f"window length must be at least 1, got {seq_len}")
    stride = seq_len if stride is None else stride
    check(stride >= 1, f"window stride must be at least 1, got {stride}")
    check(
        token_ids.numel() >= seq_len,
        f"the text has {token_ids.numel()} tokens, fewer than one window of {seq_len}",
    )
    return token_ids.long().unfold(0, seq_len, stride).clone()


def calibration_batches(
    tokenizer, source: str | list[str], n: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """`n` windows of `seq_len` tokens [n, seq_len] sampled from a text, the same ones for the same seed.

    `source` is a text source (`load_text_source`: a corpus name, whose calib split is used,
    `name:split`, or a text file) or a list of documents, joined by blank lines.
    The text is tokenized as one stream without special tokens. When it holds `n * seq_len` tokens
    the windows are disjoint (n of its back-to-back windows, behind a random offset); otherwise
    they are `n` distinct random windows that overlap, and the text must hold at least
    `n * seq_len / MAX_TOKEN_REUSE` tokens.
    """
    check(n >= 1, f"the number of calibration windows must be at least 1, got {n}")
    check(seq_len >= 1, f"the calibration window length must be at least 1, got {seq_len}")
    text = _source_text(source)
    token_ids = tokenize_text(tokenizer, text)
    needed = min_calibration_tokens(n, seq_len)
    check(
        token_ids.numel() >= needed,
        f"the calibration text has {token_ids.numel()} tokens, but {n} windows of {seq_len} tokens need at "
        f"least {needed}; ask for fewer or shorter windows, or give a longer text",
    )
    starts = torch.tensor(_window_starts(token_ids.numel(), n, seq_len, seed))
    return token_ids[starts[:, None] + torch.arange(seq_len)]


def min_calibration_tokens(n: int, seq_len: int) -> int:
    """Fewest tokens from which `calibration_batches` will draw `n` windows of `seq_len`."""
    distinct_starts = seq_len + n - 1
    return max(seq_len + 1, distinct_starts, math.ceil(n * seq_len / MAX_TOKEN_REUSE))


def _window_starts(num_tokens: int, n: int, seq_len: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    if n * seq_len <= num_tokens:
        offset = rng.randrange(min(seq_len, num_tokens - n * seq_len + 1))
        slots = (num_tokens - offset) // seq_len
        return [offset + slot * seq_len for slot in rng.sample(range(slots), n)]
    return rng.sample(range(num_tokens - seq_len + 1), n)


def _source_text(source: str | list[str]) -> str:
    if isinstance(source, str):
        return load_text_source(source, split="calib")
    if not source or not all(isinstance(doc, str) for doc in source):
        raise LctoolError("calibration text must be a text source name or a non-empty list of strings")
    return "\n\n".join(source)
