"""Training-free RoPE scaling: a new config.json beside the input's weights, hard-linked, never loaded."""

from __future__ import annotations

from lctool.io import Checkpoint, CheckpointWriter
from lctool.ops.extend.options import ExtendOptions
from lctool.ops.extend.scaling import Lengths, OriginalRope, rotary_dim, scaled_rope


def extended_config(config: dict, method: str, original: OriginalRope, dim: int, lengths: Lengths,
                    options: ExtendOptions) -> dict:
    """The input config with the new scaling in v5 `rope_parameters` (v4 keys removed)."""
    from lctool.arch import write_rope

    rope, max_positions = scaled_rope(method, original.rope, dim, lengths, options)
    out = write_rope(config, rope)
    out.pop("partial_rotary_factor", None)  # moved inside rope_parameters by write_rope when not 1.0
    out["max_position_embeddings"] = max_positions
    return out


def extension_record(original: OriginalRope, lengths: Lengths, method: str) -> dict:
    """What the manifest keeps so a later extend (with --force) can start from the unscaled model."""
    return {
        "method": method,
        "original_theta": original.rope.theta,
        "original_length": lengths.original,
        "target_length": lengths.target,
        "factor": lengths.factor,
    }


def write_training_free(checkpoint: Checkpoint, target: str, options: ExtendOptions, original: OriginalRope,
                        lengths: Lengths, force: bool, searched: list[dict] | None = None) -> str:
    config = extended_config(checkpoint.config, options.method, original, rotary_dim(checkpoint.arch), lengths, options)
    config.pop("auto_map", None)
    config.pop("clex", None)
    with CheckpointWriter(
        target,
        operation="extend",
        parameters=options.model_dump(exclude={"training"}, exclude_none=True),
        inputs=[checkpoint],
        force=force,
    ) as writer:
        writer.write_config(config)
        writer.link_weights(checkpoint)
        writer.carry_files(checkpoint)
        writer.results.update(extension_record(original, lengths, options.method))
        if searched is not None:
            writer.results["search"] = searched
    return writer.target
