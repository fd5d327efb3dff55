"""Perplexity, bits-per-byte, perplexity versus context length, and KL divergence to a reference.

All three score the same way: the text becomes one token stream (no special tokens, as
`lctool.data` tokenizes), cut into windows by `lctool.eval.windows.plan_windows`, and only the
scored positions get logits, a bounded number of rows at a time, in float32.

perplexity = exp(total NLL / scored tokens)
bits-per-byte = total NLL (nats) / (ln 2 x UTF-8 bytes owned by the scored tokens)
KL = mean over scored positions of KL(P_reference || P_model) = sum_v p_ref(v) (log p_ref(v) - log p_model(v)),
     in nats per token: the expected extra code length, under the reference's own predictions, of
     coding with the model; 0 for identical models. EvoPress uses it as its compression fitness.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from lctool.errors import LctoolError, check
from lctool.eval.progress import SILENT, Tracker
from lctool.eval.runners import InMemoryRunner, LayerwiseRunner
from lctool.eval.tokens import TokenStream, tokenize_stream
from lctool.eval.windows import WindowBatch, WindowPlan, plan_windows

# Logit elements (rows x vocab) computed at once: bounds the scoring memory to ~8 MB of float32.
LOGIT_CHUNK_ELEMENTS = 1 << 21
DEFAULT_BATCH_SIZE = 4


def as_runner(model) -> InMemoryRunner | LayerwiseRunner:
    if isinstance(model, (InMemoryRunner, LayerwiseRunner)):
        return model
    return InMemoryRunner(model)


def check_ids_fit(stream: TokenStream, vocab_size: int, what: str = "model") -> None:
    largest = int(stream.ids.max())
    check(
        largest < vocab_size,
        f"the tokenizer produced token id {largest}, but the {what} has only vocab_size {vocab_size}: "
        "the tokenizer does not belong to this model",
    )


def _scored_logits(
    runner, hidden: torch.Tensor, batch: WindowBatch
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float32 logits [rows, vocab], target ids [rows]) of the batch's scored tokens, in chunks."""
    window, position = batch.scored_rows()
    rows = hidden[window.to(hidden.device), (position - 1).to(hidden.device)]
    targets = batch.input_ids[window, position].to(hidden.device)
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // max(runner.vocab_size, 1))
    for begin in range(0, rows.shape[0], chunk):
        yield runner.logits(rows[begin : begin + chunk]).float(), targets[begin : begin + chunk]


def _nll_sum(runner, batches: list[WindowBatch], tracker: Tracker) -> float:
    total = 0.0
    for batch, hidden in zip(batches, runner.hidden_batches(batches, tracker), strict=True):
        for logits, targets in _scored_logits(runner, hidden, batch):
            nll = torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[:, None]).squeeze(1)
            total += float(nll.double().sum())
    return total


def perplexity_of_stream(
    model,
    stream: TokenStream,
    ctx: int,
    stride: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    tracker: Tracker = SILENT,
) -> dict:
    runner = as_runner(model)
    check(batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}")
    check_ids_fit(stream, runner.vocab_size)
    plan = plan_windows(len(stream), ctx, stride)
    batches = list(plan.batches(stream.ids, batch_size))
    tracker.start(f"perplexity @ {ctx}", plan.input_tokens)
    began = time.perf_counter()
    nll_sum = _nll_sum(runner, batches, tracker)
    seconds = time.perf_counter() - began
    return _summary(plan, stream, nll_sum, seconds)


def _exp(value: float) -> float:
    """exp that says inf, not OverflowError, for a model whose loss is astronomically high."""
    return math.exp(value) if value < 709.0 else math.inf


def _summary(plan: WindowPlan, stream: TokenStream, nll_sum: float, seconds: float) -> dict:
    tokens = plan.scored_tokens
    scored_bytes = int(stream.owned_bytes[plan.scored_positions()].sum())
    check(scored_bytes > 0, "the scored tokens cover no bytes of text")
    return {
        "ppl": _exp(nll_sum / tokens),
        "bpb": nll_sum / (math.log(2) * scored_bytes),
        "nll_sum": nll_sum,
        "tokens": tokens,
        "bytes": scored_bytes,
        "bytes_exact": stream.exact_bytes,
        "windows": plan.num_windows,
        "ctx": plan.ctx,
        "stride": plan.stride,
        "text_tokens": len(stream),
        "text_bytes": stream.total_bytes,
        "seconds": seconds,
        "tokens_per_s": plan.input_tokens / seconds if seconds > 0 else None,
    }


def perplexity(
    model,
    tokenizer,
    text: str,
    ctx: int,
    stride: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_tokens: int | None = None,
    tracker: Tracker = SILENT,
) -> dict:
    """Perplexity and bits-per-byte of `text` over windows of `ctx` tokens (see lctool.eval.windows).

    `model` is a loaded causal LM or a `LayerwiseRunner`. Returns ppl, bpb, nll_sum (nats),
    tokens (scored), bytes (owned by the scored tokens), windows, and timing.
    """
    stream = tokenize_stream(tokenizer, text).truncated(max_tokens)
    return perplexity_of_stream(model, stream, ctx, stride, batch_size, tracker)


def ppl_vs_length(
    model,
    tokenizer,
    text: str,
    lengths: list[int],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_tokens: int | None = None,
    tracker: Tracker = SILENT,
) -> list[dict]:
    """Perplexity over back-to-back windows of each length in `lengths`, on the same token stream."""
    check(len(lengths) > 0, "--lengths needs at least one length")
    stream = tokenize_stream(tokenizer, text).truncated(max_tokens)
    return [
        {"length": length, **perplexity_of_stream(model, stream, length, None, batch_size, tracker)}
        for length in lengths
    ]


def kl_of_stream(
    model,
    reference_model,
    stream: TokenStream,
    ctx: int,
    stride: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    tracker: Tracker = SILENT,
) -> dict:
    runner, reference = as_runner(model), as_runner(reference_model)
    if runner.vocab_size != reference.vocab_size:
        raise LctoolError(
            f"the model has vocab_size {runner.vocab_size} but the reference {reference.vocab_size}: "
            "KL divergence needs the same tokenizer"
        )
    check(batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}")
    check_ids_fit(stream, runner.vocab_size)
    plan = plan_windows(len(stream), ctx, stride)
    batches = list(plan.batches(stream.ids, batch_size))
    tracker.start(f"KL @ {ctx}", 2 * plan.input_tokens)
    began = time.perf_counter()
    total = 0.0
    pairs = zip(
        batches,
        runner.hidden_batches(batches, tracker),
        reference.hidden_batches(batches, tracker),
        strict=True,
    )
    for batch, hidden, reference_hidden in pairs:
        chunks = zip(
            _scored_logits(runner, hidden, batch),
            _scored_logits(reference, reference_hidden, batch),
            strict=True,
        )
        for (logits, _), (reference_logits, _) in chunks:
            log_p_model = F.log_softmax(logits, dim=-1)
            log_p_reference = F.log_softmax(reference_logits.to(logits.device), dim=-1)
            kl = F.kl_div(log_p_model, log_p_reference, log_target=True, reduction="none").sum(-1)
            total += float(kl.double().sum())
    return {
        "kl": total / plan.scored_tokens,
        "direction": "KL(reference || model), nats per token",
        "tokens": plan.scored_tokens,
        "windows": plan.num_windows,
        "ctx": ctx,
        "seconds": time.perf_counter() - began,
    }


def kl_divergence(
    model,
    reference_model,
    tokenizer,
    text: str,
    ctx: int,
    stride: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_tokens: int | None = None,
    tracker: Tracker = SILENT,
) -> float:
    """Mean per-token KL(P_reference || P_model) in nats over the scored positions of `text`."""
    stream = tokenize_stream(tokenizer, text).truncated(max_tokens)
    return kl_of_stream(model, reference_model, stream, ctx, stride, batch_size, tracker)["kl"]
