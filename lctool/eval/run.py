"""`lctool eval` as one function: checkpoint path + validated options -> a results dict."""

from __future__ import annotations

import hashlib
import os
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lctool.errors import LctoolError, check
from lctool.eval.loaders import check_tokenizer_fits, load_for_eval, same_tokenizer
from lctool.eval.passkey import DEFAULT_DEPTHS, check_passkey_lengths, passkey_accuracy
from lctool.eval.progress import SILENT, Tracker
from lctool.eval.runners import LayerwiseRunner, fits_in_memory
from lctool.eval.scoring import DEFAULT_BATCH_SIZE, kl_of_stream, perplexity_of_stream
from lctool.eval.tokens import tokenize_stream

DEFAULT_CORPUS = "wiki:eval"
MAX_DEFAULT_CTX = 2048
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EvalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="a UTF-8 text file to evaluate on")
    corpus: str | None = Field(None, description="corpus name or name:split (default wiki:eval)")
    ctx: int | None = Field(
        None, ge=2, description="window length; default: the model's max_position_embeddings, at most 2048"
    )
    stride: int | None = Field(None, ge=1, description="window step; default ctx (non-overlapping)")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1)
    lengths: list[int] | None = Field(None, description="window lengths for perplexity versus context length")
    plot: str | None = Field(None, description="PNG path for the perplexity-versus-length figure")
    passkey: bool = False
    passkey_lengths: list[int] | None = None
    passkey_depths: list[float] | None = None
    passkey_trials: int = Field(3, ge=1, le=1000)
    reference: str | None = Field(None, description="reference checkpoint for KL(reference || model)")
    max_tokens: int | None = Field(None, ge=2, description="evaluate only the first N tokens of the text")
    seed: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    layer_by_layer: Literal["auto", "always", "never"] = "auto"
    trust_remote_code: bool = False

    @field_validator("lengths", "passkey_lengths")
    @classmethod
    def _lengths(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("give at least one length")
        if any(length < 2 for length in value):
            raise ValueError(f"lengths must be at least 2 tokens, got {min(value)}")
        if len(set(value)) != len(value):
            raise ValueError("lengths must not repeat")
        return sorted(value)

    @field_validator("passkey_depths")
    @classmethod
    def _depths(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return None
        if not value or any(not 0.0 <= d <= 1.0 for d in value):
            raise ValueError("depths must be between 0 and 1")
        return sorted(set(value))

    @model_validator(mode="after")
    def _consistent(self) -> EvalOptions:
        if self.text is not None and self.corpus is not None:
            raise ValueError("give --text or --corpus, not both")
        if self.plot is not None and self.lengths is None:
            raise ValueError("--plot draws perplexity versus --lengths; give --lengths too")
        if self.plot is not None and not self.plot.lower().endswith(".png"):
            raise ValueError("--plot must name a .png file")
        passkey_extras = self.passkey_lengths is not None or self.passkey_depths is not None
        if passkey_extras and not self.passkey:
            raise ValueError("--passkey-lengths/--passkey-depths need --passkey")
        if self.stride is not None and self.ctx is not None and self.stride > self.ctx:
            raise ValueError(f"--stride ({self.stride}) must not exceed --ctx ({self.ctx})")
        return self


def resolve_text(options: EvalOptions) -> tuple[str, str]:
    """(source label, text) for --text or --corpus."""
    from lctool.data import CORPORA, load_text_source, split_names

    if options.text is not None:
        check(os.path.isfile(options.text), f"--text: no file at {options.text}")
        return options.text, load_text_source(options.text)
    spec = options.corpus or DEFAULT_CORPUS
    name, _, split = spec.partition(":")
    split = split or "eval"
    check(name in CORPORA, f"unknown corpus {name!r}; the corpora are: {', '.join(CORPORA)}")
    check(
        split in split_names(),
        f"unknown split {split!r} of corpus {name!r}; the splits are: {', '.join(split_names())}",
    )
    return f"{name}:{split}", load_text_source(f"{name}:{split}")


def use_layer_by_layer(path: str, options: EvalOptions) -> bool:
    if options.layer_by_layer != "auto":
        return options.layer_by_layer == "always"
    return not fits_in_memory(path, DTYPES[options.dtype])


def load_evaluated(path: str, options: EvalOptions, layer_by_layer: bool):
    """(model or LayerwiseRunner, tokenizer, config dict) of one checkpoint."""
    from lctool.io import Checkpoint
    from lctool.io.hf import load_tokenizer

    dtype = DTYPES[options.dtype]
    if layer_by_layer:
        from lctool.io.hf import check_buildable

        tokenizer = load_tokenizer(path)
        check_buildable(Checkpoint(path, check_shapes=False).config)
        runner = LayerwiseRunner(path, dtype=dtype, device=options.device)
        check_tokenizer_fits(tokenizer, runner.vocab_size)
        return runner, tokenizer, runner.checkpoint.config
    model, tokenizer = load_for_eval(
        path, dtype=dtype, trust_remote_code=options.trust_remote_code, device=options.device
    )
    return model, tokenizer, Checkpoint(path, check_shapes=False).config


def default_ctx(config: dict) -> int:
    return min(int(config.get("max_position_embeddings") or MAX_DEFAULT_CTX), MAX_DEFAULT_CTX)


def evaluate(path: str, options: EvalOptions | None = None, tracker: Tracker = SILENT) -> dict:
    """Every measurement the options ask for, on one checkpoint; see `lctool eval --help`."""
    options = options or EvalOptions()
    source, text = resolve_text(options)
    layer_by_layer = use_layer_by_layer(path, options)
    if layer_by_layer and options.passkey:
        raise LctoolError(
            "--passkey decodes token by token and needs the model in memory; do not evaluate layer by layer"
        )
    model, tokenizer, config = load_evaluated(path, options, layer_by_layer)
    stream = tokenize_stream(tokenizer, text).truncated(options.max_tokens)
    ctx = options.ctx or default_ctx(config)
    check(
        options.stride is None or options.stride <= ctx,
        f"--stride ({options.stride}) must not exceed --ctx ({ctx})",
    )
    for length in options.lengths or []:
        check(length <= len(stream), f"--lengths: {length} is longer than the text's {len(stream)} tokens")

    passkey_lengths = options.passkey_lengths or options.lengths or [ctx]
    passkey_depths = options.passkey_depths or list(DEFAULT_DEPTHS)
    if options.passkey:
        check_passkey_lengths(
            tokenizer, passkey_lengths, passkey_depths, options.passkey_trials, options.seed
        )

    results: dict = {
        "model": os.path.abspath(path),
        "source": source,
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "max_tokens": options.max_tokens,
        "dtype": options.dtype,
        "mode": "layer-by-layer" if layer_by_layer else "in-memory",
        "max_position_embeddings": config.get("max_position_embeddings"),
    }
    results["perplexity"] = perplexity_of_stream(
        model, stream, ctx, options.stride, options.batch_size, tracker
    )
    if options.lengths:
        results["ppl_vs_length"] = [
            {
                "length": length,
                **perplexity_of_stream(model, stream, length, None, options.batch_size, tracker),
            }
            for length in options.lengths
        ]
        if options.plot:
            from lctool.eval.plot import plot_ppl_vs_length

            title = f"{os.path.basename(os.path.abspath(path))} on {source}"
            results["plot"] = plot_ppl_vs_length(
                results["ppl_vs_length"], options.plot, title, results["max_position_embeddings"]
            )
    if options.reference:
        results["kl"] = _kl_to_reference(model, tokenizer, stream, ctx, options, tracker)
    if options.passkey:
        results["passkey"] = passkey_accuracy(
            model,
            tokenizer,
            passkey_lengths,
            passkey_depths,
            options.passkey_trials,
            options.seed,
            tracker,
        )
    return results


def _kl_to_reference(model, tokenizer, stream, ctx: int, options: EvalOptions, tracker: Tracker) -> dict:
    reference_path = options.reference
    reference, reference_tokenizer, _ = load_evaluated(
        reference_path, options, use_layer_by_layer(reference_path, options)
    )
    if not same_tokenizer(tokenizer, reference_tokenizer):
        raise LctoolError(
            f"the reference {reference_path} has a different tokenizer: KL divergence needs the same one"
        )
    result = kl_of_stream(model, reference, stream, ctx, options.stride, options.batch_size, tracker)
    return {"reference": os.path.abspath(reference_path), **result}
