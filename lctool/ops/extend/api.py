"""The one entry point: validate the input and the lengths, then run the chosen method."""

from __future__ import annotations

import os
from dataclasses import dataclass

from lctool.errors import LctoolError, check
from lctool.io import Checkpoint
from lctool.io.reader import read_json
from lctool.ops.extend.options import ExtendOptions
from lctool.ops.extend.scaling import Lengths, OriginalRope, original_rope, resolve_lengths

# Positional schemes of model types lctool does not map, to say why they cannot be extended.
NON_ROPE_MODEL_TYPES = {"gpt2": "learned absolute", "opt": "learned absolute", "bloom": "ALiBi", "mpt": "ALiBi",
                        "bert": "learned absolute", "falcon": "ALiBi or RoPE"}


@dataclass(frozen=True)
class ExtensionPlan:
    checkpoint: Checkpoint
    original: OriginalRope
    lengths: Lengths


def _refuse_non_rope(path: str) -> None:
    if not os.path.isdir(path):
        return  # Checkpoint says it
    config = read_json(os.path.join(os.path.abspath(path), "config.json"), "config.json")
    if not isinstance(config, dict):
        raise LctoolError("config.json is not a JSON object")
    model_type = config.get("model_type")
    if model_type in NON_ROPE_MODEL_TYPES:
        raise LctoolError(f"{model_type} uses {NON_ROPE_MODEL_TYPES[model_type]} positions, not RoPE: nothing to extend")
    embedding = config.get("position_embedding_type")
    if embedding not in (None, "rope", "rotary"):
        raise LctoolError(f"the model uses {embedding!r} position embeddings, not RoPE: nothing to extend")


def plan_extension(source: str, options: ExtendOptions, force: bool = False) -> ExtensionPlan:
    """Open and check the input and work out L0, L and F; raises LctoolError on bad input."""
    _refuse_non_rope(source)
    checkpoint = Checkpoint(source)
    check(not checkpoint.is_quantized, "extend needs an unquantized model (extend first, then quantize)")
    check("clex" not in checkpoint.config, f"{source} is a CLEX model: extend the model it was trained from instead")
    original = original_rope(checkpoint.config, checkpoint.arch, checkpoint.manifest)
    if original.was_scaled and not force:
        raise LctoolError(
            f"{source} already has RoPE scaling ({checkpoint.arch.rope.rope_type}); pass --force to replace it "
            f"(the new scaling starts again from L0={original.length})"
        )
    lengths = resolve_lengths(options, original.length)
    return ExtensionPlan(checkpoint, original, lengths)


def extend(source: str, target: str, options: ExtendOptions, force: bool = False, search=None) -> str:
    """Write `target`: `source` able to read `options`' target length. Returns the output path.

    `search` (a `SearchOptions`, training-free methods only) picks the factor and shape parameters
    by held-out perplexity at the target length before writing.
    """
    plan = plan_extension(source, options, force)
    if os.path.lexists(target) and not force:  # fail before a training run, not after
        raise LctoolError(f"{os.path.abspath(target)} already exists (pass --force to replace it)")
    check(search is None or not options.trained, "--search applies to the training-free methods only")
    if options.trained or search is not None:
        from lctool.io.hf import check_buildable

        check_buildable(plan.checkpoint.config)
    if options.method == "e2llm":
        from lctool.ops.extend.e2llm import train_e2llm

        return train_e2llm(plan, target, options, force)
    if options.method == "clex":
        from lctool.ops.clex.train import train_clex

        return train_clex(plan, target, options, force)
    from lctool.ops.extend.training_free import write_training_free

    searched = None
    lengths = plan.lengths
    if search is not None:
        from lctool.ops.extend.scaling import rotary_dim
        from lctool.ops.extend.search import search_scaling

        options, searched = search_scaling(plan.checkpoint, plan.original, lengths, options,
                                           rotary_dim(plan.checkpoint.arch), search)
        lengths = Lengths(lengths.original, lengths.target, float(options.factor))
    return write_training_free(plan.checkpoint, target, options, plan.original, lengths, force, searched)
