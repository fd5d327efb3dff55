"""Re-shard or re-type a checkpoint: the plainest streamed read -> write, tensor by tensor."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from lctool.errors import LctoolError
from lctool.io import Checkpoint, CheckpointWriter

DTYPE_NAMES = ("float32", "float16", "bfloat16")


class ConvertOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dtype: str | None = Field(None, description="cast floating tensors to this dtype")
    max_shard_size: str = "5GB"
    check_finite: bool = False


def convert(source: str, target: str, options: ConvertOptions | None = None, force: bool = False) -> str:
    import torch

    options = options or ConvertOptions()
    if options.dtype is not None and options.dtype not in DTYPE_NAMES:
        raise LctoolError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {options.dtype!r}")
    checkpoint = Checkpoint(source)
    if options.check_finite:
        checkpoint.check_finite()
    cast = getattr(torch, options.dtype) if options.dtype else None
    config = dict(checkpoint.config)
    if cast is not None:
        config["dtype"] = options.dtype
    with CheckpointWriter(
        target,
        operation="convert",
        parameters=options.model_dump(),
        inputs=[checkpoint],
        force=force,
        max_shard_size=options.max_shard_size,
    ) as writer:
        writer.write_config(config)
        for name, tensor in checkpoint.iter_tensors():
            if cast is not None and tensor.is_floating_point():
                tensor = tensor.to(cast)
            writer.add_tensor(name, tensor)
        writer.carry_files(checkpoint)
    return target
