"""What a checkpoint holds, from its config and headers alone (no tensor is read)."""

from __future__ import annotations

import os

from lctool.io.reader import Checkpoint, human_bytes


def _quantization_summary(qconfig: dict | None) -> dict | None:
    if not qconfig:
        return None
    keys = ("quant_method", "bits", "group_size", "sym", "desc_act", "beta1", "beta2", "num_codebooks",
            "nbits_per_codebook", "in_group_size", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type")
    return {k: qconfig[k] for k in keys if k in qconfig}


def describe(path: str) -> dict:
    checkpoint = Checkpoint(path)
    arch = checkpoint.arch
    rope = arch.rope
    shards = [
        {"file": f, "bytes": os.path.getsize(checkpoint.shard_path(f)), "tensors": len(checkpoint.headers[f].entries)}
        for f in checkpoint.shard_files
    ]
    manifest = checkpoint.manifest or {}
    return {
        "path": checkpoint.path,
        **arch.summary(),
        "parameters": checkpoint.num_parameters(),
        "dtypes": checkpoint.dtypes(),
        "total_bytes": checkpoint.total_bytes(),
        "shards": shards,
        "context_length": arch.max_positions,
        "rope": {"theta": rope.theta, "type": rope.rope_type, **rope.params},
        "quantization": _quantization_summary(checkpoint.quantization_config),
        "auto_map": checkpoint.config.get("auto_map"),
        "tokenizer_files": [f for f in checkpoint.carried_files() if f != "generation_config.json"],
        "lctool": {
            "operation": manifest.get("operation"),
            "version": manifest.get("lctool_version"),
            "created_utc": manifest.get("created_utc"),
            "wall_time_s": manifest.get("wall_time_s"),
            "peak_rss_mb": manifest.get("peak_rss_mb"),
            "results": manifest.get("results"),
            "lineage": checkpoint.lineage(),
        }
        if checkpoint.manifest
        else None,
        "size_human": human_bytes(checkpoint.total_bytes()),
    }
