"""`vocab expand`: new BPE tokens continuing the model's own merges, with initialised embedding rows."""

from __future__ import annotations

import json
import os
from typing import Literal

import torch
from pydantic import ConfigDict, Field, model_validator

from lctool.devices import DTYPES, ComputeOptions
from lctool.errors import LctoolError
from lctool.ops.vocab.bpe import ByteLevelBpe, Merge, byte_level_text
from lctool.ops.vocab.checkpoint import open_for_vocab, padded_rows, write_vocab_checkpoint
from lctool.ops.vocab.init import new_rows
from lctool.ops.vocab.learn import byte_level_words, merges_from_corpus, plan_token_merges

MAX_TOKEN_FILE_BYTES = 16 * 1024 * 1024
REPORTED_EXAMPLES = 12
FERTILITY_SAMPLE_CHARS = 1_000_000  # of the learning text, for the tokens-per-character report


class ExpandOptions(ComputeOptions):
    """`device`/`dtype`: where and in what precision the new rows are computed (the padding rows' mean
    too); the matrices keep their dtype and old rows are copied exactly. align's auxiliary embedding (a
    sparse SVD of corpus co-occurrences) is computed on the CPU in float32."""

    ALLOWED_DTYPES = (*DTYPES, "float64")
    model_config = ConfigDict(extra="forbid")
    corpus: str | None = Field(None, description="text to learn merges from: corpus name, name:split, or a .txt file")
    split: str = Field("train", description="split of a named corpus")
    num_new: int | None = Field(None, gt=0, le=1_000_000, description="new merges (tokens) to learn")
    tokens_file: str | None = Field(None, description="file of tokens to add (one per line, or a JSON list)")
    init: Literal["mean", "merge", "random", "align"] = "mean"
    min_frequency: int = Field(2, ge=1, description="least count of a pair in the corpus to become a merge")
    pad_to_multiple: int = Field(1, ge=1, le=65536, description="round vocab_size up to a multiple of this")
    seed: int = 0
    max_shard_size: str = "5GB"

    @model_validator(mode="after")
    def _one_source(self) -> ExpandOptions:
        if self.tokens_file is None and (self.corpus is None or self.num_new is None):
            raise ValueError("give --corpus with --num-new, or --tokens")
        if self.tokens_file is not None and self.num_new is not None:
            raise ValueError("--num-new learns merges from --corpus; with --tokens the file says what to add")
        if self.init == "align" and self.corpus is None:
            raise ValueError("--init align needs --corpus (the text its auxiliary embedding is trained on)")
        return self


def read_token_file(path: str) -> list[str]:
    """Tokens from a JSON list of strings, or one per line (leading spaces kept; blank lines skipped)."""
    if not os.path.isfile(path):
        raise LctoolError(f"token file {path} not found")
    if os.path.getsize(path) > MAX_TOKEN_FILE_BYTES:
        raise LctoolError(f"token file {path} is over {MAX_TOKEN_FILE_BYTES} bytes")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise LctoolError(f"token file {path} is not UTF-8") from None
    if path.endswith(".json"):
        try:
            tokens = json.loads(text)
        except json.JSONDecodeError:
            raise LctoolError(f"token file {path} is not valid JSON") from None
        if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
            raise LctoolError(f"token file {path} must hold a JSON list of non-empty strings")
    else:
        tokens = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not tokens:
        raise LctoolError(f"token file {path} lists no tokens")
    return tokens


def new_merges(bpe: ByteLevelBpe, options: ExpandOptions, text: str | None) -> tuple[list[Merge], list[str]]:
    """(merges to append, intermediate tokens added only to reach requested ones)."""
    if options.tokens_file is not None:
        words = byte_level_words(bpe, read_token_file(options.tokens_file))
        plan = plan_token_merges(bpe, words)
        return plan.merges, plan.intermediates
    return merges_from_corpus(bpe, text, options.num_new, options.min_frequency), []


def expanded_tokenizer(bpe: ByteLevelBpe, merges: list[Merge]) -> tuple[ByteLevelBpe, list[int]]:
    """The tokenizer with `merges` appended and their tokens given the next free ids."""
    first = bpe.size
    ids = list(range(first, first + len(merges)))
    vocab = {**bpe.vocab, **{a + b: i for (a, b), i in zip(merges, ids, strict=True)}}
    return bpe.replaced(vocab=vocab, merges=bpe.merges + merges), ids


def check_requested_tokens(expanded: ByteLevelBpe, words: list[str]) -> None:
    """Each requested token, written alone, must now come out as that single token."""
    model = expanded.backend().model
    for word in words:
        pieces = [t.value for t in model.tokenize(word)]
        if pieces != [word]:
            raise LctoolError(f"token {byte_level_text(word)!r} is not reachable: it segments as {pieces}")


def tokens_per_char(backend, text: str) -> float:
    from lctool.ops.vocab.bpe import text_chunks

    encodings = backend.encode_batch(list(text_chunks(text)), add_special_tokens=False)
    return sum(len(e.ids) for e in encodings) / max(len(text), 1)


def row_builder(bpe: ByteLevelBpe, merges: list[Merge], ids: list[int], num_rows: int, options: ExpandOptions,
                align: list[dict[int, float] | None] | None):
    """The function that turns an old embedding/lm_head matrix into the expanded one."""
    parts = {a + b: (a, b) for a, b in merges}
    new_tokens = [a + b for a, b in merges]

    def build(role: str, old: torch.Tensor) -> torch.Tensor:
        real_rows = old[: bpe.size].to(options.device, options.torch_dtype)
        out = torch.empty(num_rows, old.shape[1], dtype=old.dtype)
        out[: old.shape[0]] = old
        out[old.shape[0]:] = real_rows.mean(dim=0).to("cpu", old.dtype)
        if new_tokens:
            rows = new_rows(options.init, real_rows, new_tokens, parts, bpe.vocab, options.seed, align)
            out[torch.tensor(ids)] = rows.to("cpu", old.dtype)
        return out

    return build


def align_mixes(bpe: ByteLevelBpe, expanded: ByteLevelBpe, ids: list[int], text: str, seed: int):
    from lctool.ops.vocab.align import align_weights

    old_candidates = sorted(i for t, i in bpe.vocab.items() if t not in bpe.added)
    return align_weights(expanded.backend(), text, expanded.size, ids, old_candidates, seed)


def expand(source: str, target: str, options: ExpandOptions, force: bool = False) -> dict:
    """Add BPE tokens to the checkpoint at `source`, writing `target`; returns the results recorded."""
    checkpoint, bpe = open_for_vocab(source, target, force)
    text = None
    if options.corpus is not None:
        from lctool.data import load_text_source

        text = load_text_source(options.corpus, options.split)
    merges, intermediates = new_merges(bpe, options, text)
    expanded, ids = expanded_tokenizer(bpe, merges)
    if options.tokens_file is not None:
        requested = [a + b for a, b in merges if a + b not in set(intermediates)]
        check_requested_tokens(expanded, requested)
    num_rows = padded_rows(max(checkpoint.arch.vocab_size, expanded.size), options.pad_to_multiple)
    align = align_mixes(bpe, expanded, ids, text, options.seed) if options.init == "align" else None
    build = row_builder(bpe, merges, ids, num_rows, options, align)
    results = {
        "new_tokens": len(merges),
        "intermediate_tokens": len(intermediates),
        "tokenizer_size_before": bpe.size,
        "tokenizer_size_after": expanded.size,
        "vocab_size_before": checkpoint.arch.vocab_size,
        "vocab_size_after": num_rows,
        "tied": checkpoint.arch.tied,
        "init": options.init,
        "first_new_tokens": [byte_level_text(a + b) for a, b in merges[:REPORTED_EXAMPLES]],
    }
    if align is not None:
        results["aligned_tokens"] = sum(mix is not None for mix in align)
    if text is not None:
        sample = text[:FERTILITY_SAMPLE_CHARS]
        results["tokens_per_char_before"] = round(tokens_per_char(bpe.backend(), sample), 5)
        results["tokens_per_char_after"] = round(tokens_per_char(expanded.backend(), sample), 5)
        results["tokens_per_char_measured_on_chars"] = len(sample)
    path = write_vocab_checkpoint(
        checkpoint,
        target,
        operation="vocab-expand",
        parameters=options.model_dump(),
        bpe=expanded,
        num_rows=num_rows,
        build_rows=build,
        results=results,
        seed=options.seed,
        force=force,
        max_shard_size=options.max_shard_size,
    )
    return {"output": path, **results}
