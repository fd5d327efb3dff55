"""nf4 / int8 through bitsandbytes: transformers quantizes on load and serializes in bitsandbytes' own
format, which stock `from_pretrained` reads back.

nf4 always uses double quantization: on CPUs with AVX512-BF16, bitsandbytes 0.50 saves `absmax` in
a wrong layout after a forward pass without it (the model reloads silently wrong); we also save
before any forward. Not layer-streamed: bitsandbytes quantizes the whole model in memory.
"""

from __future__ import annotations

import time

import torch

from lctool.errors import LctoolError
from lctool.io import Checkpoint, CheckpointWriter
from lctool.io.manifest import peak_rss_mb
from lctool.quant.options import QuantizeOptions


def bnb_config(method: str, skip_modules: list[str], compute_dtype: torch.dtype = torch.float32):
    from transformers import BitsAndBytesConfig

    if method == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)


def skip_module_names(checkpoint: Checkpoint, options: QuantizeOptions) -> list[str]:
    arch = checkpoint.arch
    roles = [s for s in options.skip if s != "lm_head"]
    leaves = arch.module_names_for_roles(arch.linear_roles(roles)) if roles else []
    return [arch.module("lm_head"), *leaves]


NF4_BLOCKSIZE = 64


def check_nf4_runs_on_cpu(checkpoint: Checkpoint, options: QuantizeOptions) -> None:
    """bitsandbytes' CPU nf4 path reshapes absmax per row, so each quantized input width must be a
    multiple of its blocksize; otherwise the artifact saves fine and then fails at its first forward."""
    arch = checkpoint.arch
    skipped = set(options.skip)
    for role in arch.linear_roles():
        if role in skipped:
            continue
        for layer in range(arch.num_layers):
            width = arch.linear_shape(role, layer)[1]
            if width % NF4_BLOCKSIZE:
                raise LctoolError(
                    f"nf4: {role} of layer {layer} has {width} inputs, not a multiple of bitsandbytes' blocksize "
                    f"{NF4_BLOCKSIZE} (its CPU kernels cannot run it); keep it in full precision with --skip {role}")


def quantize_bnb(checkpoint: Checkpoint, target: str, options: QuantizeOptions, *, force: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    if options.method == "nf4":
        check_nf4_runs_on_cpu(checkpoint, options)
    started = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint.path,
        quantization_config=bnb_config(options.method, skip_module_names(checkpoint, options), options.torch_dtype),
        device_map={"": options.device},  # bitsandbytes quantizes where the weights are loaded
        dtype=torch.float32,
    )
    with CheckpointWriter(target, operation="quantize", parameters=options.model_dump(), inputs=[checkpoint],
                          seed=options.seed, force=force) as writer:
        model.save_pretrained(writer.tmp)
        writer.carry_files(checkpoint)
        summary = {
            "method": options.method,
            "quant_method": "bitsandbytes",
            "bits": 4 if options.method == "nf4" else 8,
            "bits_per_param_stored": round(_linear_bits(writer.tmp, checkpoint), 4),
            "output": writer.target,
            "wall_s": round(time.time() - started, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "layers": [],
        }
        writer.results.update(summary)
    return summary


def _linear_bits(folder: str, source: Checkpoint) -> float:
    """Stored bits per parameter of the decoder-layer linears (weights plus their quantization state)."""
    quantized = Checkpoint(folder, check_shapes=False)
    arch = source.arch
    linear_modules = {arch.module(r, i) for i in range(arch.num_layers) for r in arch.linear_roles("all")}
    params = sum(source.entry(m + ".weight").numel for m in linear_modules)
    stored = sum(quantized.entry(n).nbytes * 8 for n in quantized.tensor_names()
                 if any(n.startswith(m + ".weight") for m in linear_modules))
    return stored / max(params, 1)
