"""The shared plumbing: check everything, then stream tensor by tensor from the inputs to the writer.

Memory holds one output tensor's inputs at a time (the base, one delta per model, one accumulator),
so peak RSS is about (number of models + 1) × the largest tensor, whatever the model size.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from lctool.errors import LctoolError
from lctool.io import Checkpoint, CheckpointWriter
from lctool.io.manifest import peak_rss_mb
from lctool.merge.config import MergeConfig, load_config
from lctool.merge.methods import KernelContext, MergeMethod, get_method
from lctool.merge.plan import (
    Planner,
    TensorJob,
    check_parameter_names,
    check_same_family,
    open_models,
    resolve_model_path,
)
from lctool.merge.vocab import VocabAlignment, build_alignment, check_shared_vocabulary


class MergeOptions(BaseModel):
    """How to run a merge (what to merge is the MergeConfig)."""

    model_config = ConfigDict(extra="forbid")
    seed: int = Field(0, ge=0, lt=2**63, description="seed of the random methods (DARE, DELLA)")
    seed_mode: Literal["tensor", "mergekit"] = Field(
        "tensor",
        description="tensor: each tensor's masks from (seed, tensor name), independent of order and layout; "
        "mergekit: one generator in mergekit's order (sorted names, models in config order), for equality",
    )
    rescale_rule: Literal["l1", "inverse_density"] = Field(
        "l1", description="DARE/DELLA survivors: l1 (mergekit: keep the L1 norm) or inverse_density (the papers: ÷p)"
    )
    tie_break: Literal["argsort", "index"] = Field(
        "argsort",
        description="equal magnitudes at the TIES/breadcrumbs cut: argsort (mergekit's exact choice, its sort "
        "replayed in linear time on CPU) or index (lowest index first)",
    )
    device: str = Field("cpu", description="cpu or cuda[:n] for the arithmetic")
    max_shard_size: str = "5GB"


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class MaskRandomness:
    """Generators for the random methods' masks in one of the two seeding modes."""

    def __init__(self, seed: int, mode: str):
        self.seed = seed
        self.mode = mode
        self._stream = torch.Generator().manual_seed(seed) if mode == "mergekit" else None

    def for_tensor(self, name: str) -> torch.Generator:
        if self._stream is not None:
            return self._stream
        return torch.Generator().manual_seed(tensor_seed(self.seed, name))


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LctoolError(f"--device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LctoolError("--device cuda: no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise LctoolError(f"--device must be cpu or cuda, got {name!r}")
    return device


def check_shapes(jobs: list[TensorJob], checkpoints: dict[str, Checkpoint], aligned: bool) -> None:
    """Every input of a tensor has the same shape (vocab rows may differ when a tokenizer aligns them)."""
    for job in jobs:
        shapes = [checkpoints[m].entry(n).shape for m, n in zip(job.models, job.in_names, strict=True)]
        for model, shape in zip(job.models[1:], shapes[1:], strict=True):
            first = shapes[0]
            if job.vocab and aligned:
                first, shape = first[1:], shape[1:]
            if shape != first:
                raise LctoolError(
                    f"tensor {job.out_name}: shape {list(shapes[job.models.index(model)])} in {model} "
                    f"but {list(shapes[0])} in {job.models[0]}"
                )


def output_config(planner: Planner, checkpoints, config: MergeConfig, alignment: VocabAlignment | None) -> dict:
    reference = checkpoints[planner.reference_model]
    out = dict(reference.config)
    out["num_hidden_layers"] = planner.out_layers
    # mergekit (and other tools) need `architectures`, which transformers writes but some configs lack.
    out.setdefault("architectures", [reference.arch.family.causal_lm_class])
    if alignment is not None:
        out["vocab_size"] = alignment.rows
    dtype = config.out_dtype or config.dtype
    if dtype:
        out["dtype"] = dtype
        out.pop("torch_dtype", None)
    return out


def _load_inputs(job: TensorJob, checkpoints, dtype, device, alignment) -> list[torch.Tensor]:
    tensors = []
    for model, name in zip(job.models, job.in_names, strict=True):
        tensor = checkpoints[model].get(name)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors.append(tensor)
    if job.vocab and alignment is not None:
        tensors = alignment.align(job.models, tensors, job.base)
    promoted = tensors[0].dtype
    for tensor in tensors[1:]:
        promoted = torch.promote_types(promoted, tensor.dtype)
    return [t.to(device=device, dtype=promoted) if t.is_floating_point() else t.to(device) for t in tensors]


def merge_tensor(job: TensorJob, method: MergeMethod, tensors: list[torch.Tensor], context: KernelContext):
    if not tensors[0].is_floating_point():
        # Integer buffers are not merged: they must agree, and are copied.
        if any(not torch.equal(tensors[0], t) for t in tensors[1:]):
            raise LctoolError(f"non-floating tensor {job.out_name} differs between the inputs")
        return tensors[0]
    params = [job.per_input[m] for m in job.models]
    if method.needs_base:
        at = job.models.index(job.base)
        base = tensors[at]
        others = [t for i, t in enumerate(tensors) if i != at]
        per_input = [p for i, p in enumerate(params) if i != at]
        return method.kernel(base, others, job.shared, per_input, context)
    return method.kernel(None, tensors, job.shared, params, context)


def plan_merge(config: MergeConfig, config_dir: str | None = None):
    """Open and check everything a merge needs; nothing is read beyond headers and tokenizers."""
    method = get_method(config.merge_method)
    check_parameter_names(config, method)
    checkpoints = open_models(config, config_dir)
    reference = config.base_model or config.referenced_models()[0]
    check_same_family(checkpoints, reference)
    planner = Planner(config, method, checkpoints)
    jobs = planner.jobs()
    choice = config.tokenizer_choice
    if choice is None:
        check_shared_vocabulary(checkpoints, reference)
    check_shapes(jobs, checkpoints, aligned=choice is not None)
    alignment = None
    if choice is not None:
        alignment = build_alignment(
            checkpoints, reference, choice, config.pad_vocab_to, lambda ref: resolve_model_path(ref, config_dir)
        )
    return method, checkpoints, planner, jobs, alignment


def _carry_tokenizer(writer: CheckpointWriter, config: MergeConfig, checkpoints, reference: str, alignment, config_dir):
    choice = config.tokenizer_choice
    if alignment is not None and choice == "union":
        alignment.tokenizer.save_pretrained(writer.tmp)
    elif alignment is not None and choice not in ("base", None):
        source = Checkpoint(resolve_model_path(choice, config_dir), check_shapes=False)
        writer.carry_files(source, skip=("generation_config.json",))
    writer.carry_files(checkpoints[reference])


def merge(
    config: MergeConfig | str,
    target: str,
    options: MergeOptions | None = None,
    *,
    force: bool = False,
    config_dir: str | None = None,
    on_tensor: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Merge the models a mergekit-style config names into a new checkpoint at `target`.

    Returns the results recorded in the output's lctool.json (tensors, seconds, peak RSS, ...).
    """
    options = options or MergeOptions()
    if isinstance(config, str):
        config_dir = config_dir or os.path.dirname(os.path.abspath(config))
        config = load_config(config)
    device = _device(options.device)
    started = time.time()
    method, checkpoints, planner, jobs, alignment = plan_merge(config, config_dir)
    reference = planner.reference_model
    dtype = DTYPES[config.dtype] if config.dtype else None
    out_dtype = DTYPES[config.out_dtype] if config.out_dtype else None
    randomness = MaskRandomness(options.seed, options.seed_mode) if method.random else None
    parameters = {"config": config.model_dump(exclude_none=True), **options.model_dump()}
    with CheckpointWriter(
        target,
        operation="merge",
        parameters=parameters,
        inputs=list(checkpoints.values()),
        seed=options.seed if method.random else None,
        force=force,
        max_shard_size=options.max_shard_size,
    ) as writer:
        writer.write_config(output_config(planner, checkpoints, config, alignment))
        for number, job in enumerate(jobs, start=1):
            context = KernelContext(
                job.out_name,
                generator=randomness.for_tensor(job.out_name) if randomness else None,
                mergekit_stream=options.seed_mode == "mergekit",
                rescale_rule=options.rescale_rule,
                tie_break=options.tie_break,
                workers=torch.get_num_threads(),
            )
            tensors = _load_inputs(job, checkpoints, dtype, device, alignment)
            merged = merge_tensor(job, method, tensors, context)
            del tensors
            if out_dtype is not None and merged.is_floating_point():
                merged = merged.to(out_dtype)
            writer.add_tensor(job.out_name, merged)
            del merged
            if on_tensor:
                on_tensor(number, len(jobs), job.out_name)
        _carry_tokenizer(writer, config, checkpoints, reference, alignment, config_dir)
        writer.results.update(
            {
                "method": method.name,
                "models": len(checkpoints),
                "tensors": len(jobs),
                "ignored_tensors": planner.ignored_tensors(jobs),
                "merge_seconds": round(time.time() - started, 3),
                "peak_rss_mb": round(peak_rss_mb(), 1),
            }
        )
        results = dict(writer.results)
    results["output"] = os.path.abspath(target)
    return results
