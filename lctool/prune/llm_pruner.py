"""`--method llm-pruner`: score coupled structures, cut them out, optionally recover with LoRA, write.

Memory: magnitude and random importance without recovery stream the checkpoint one layer at a time
(scores) and one tensor at a time (surgery). Taylor/second-order importance and recovery hold the
model in float32 (the gradients need a full forward/backward); only the pruned weights take grads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

from lctool.arch import ATTN_ROLES, LAYER_SIZES_KEY, LINEAR_ROLES, MLP_ROLES, ModelArch
from lctool.errors import LctoolError
from lctool.io import Checkpoint, CheckpointWriter
from lctool.io.hf import model_state_tensors
from lctool.prune.importance import Gradients, collect_gradients, layer_scores, prunable_weight_names
from lctool.prune.options import LlmPrunerOptions, selected_layers
from lctool.prune.plan import PrunePlan, make_plan
from lctool.prune.surgery import (
    MODELING_FILE,
    build_pruned_model,
    modeling_source,
    pruned_config,
    pruned_tensors,
)

Log = Callable[[str], None]
TRUST_NOTE = ("its layers differ in size (or its head count is one the stock config refuses): load it with "
              "trust_remote_code=True (lctool eval --trust-remote-code)")


def check_input(checkpoint: Checkpoint) -> None:
    if checkpoint.is_quantized:
        method = checkpoint.quantization_config.get("quant_method", "unknown")
        raise LctoolError(f"{checkpoint.path} is quantized ({method}); prune the unquantized model")
    auto_map = checkpoint.config.get("auto_map")
    if auto_map and LAYER_SIZES_KEY not in checkpoint.config:
        raise LctoolError(f"{checkpoint.path} runs its own model code (auto_map); only stock architectures "
                          "or lctool-pruned models can be pruned")


def scope_roles(scope: str) -> list[str]:
    return {"all": list(LINEAR_ROLES), "attn": list(ATTN_ROLES), "mlp": list(MLP_ROLES)}[scope]


def load_float_model(checkpoint: Checkpoint) -> torch.nn.Module:
    """The input in float32 on CPU, built from lctool's own reading (no remote code needed)."""
    model = build_pruned_model(checkpoint.config, checkpoint.arch)
    state = {name: checkpoint.get(name, dtype=torch.float32) for name in checkpoint.tensor_names()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    lm_head = checkpoint.arch.weight("lm_head")
    missing = [m for m in missing if not (checkpoint.arch.tied and m == lm_head)]
    if missing or unexpected:
        raise LctoolError(f"{checkpoint.path}: weights do not match the model ({(missing + unexpected)[:3]})")
    model.tie_weights()
    return model.eval()


def calibration_gradients(model, tokenizer, arch: ModelArch, options: LlmPrunerOptions, layers: list[int]) -> Gradients:
    from lctool.data import calibration_batches

    windows = calibration_batches(tokenizer, options.calib, options.calib_n, options.calib_len, options.seed)
    names = prunable_weight_names(arch, layers, scope_roles(options.scope))
    model.to(options.device)  # a frozen model for one gradient pass, not a training run: no accelerate
    try:
        return collect_gradients(model, names, windows, fisher=options.importance == "second-order",
                                 dtype=options.dtype)
    finally:
        model.to("cpu")


def score_layers(checkpoint: Checkpoint, options: LlmPrunerOptions, layers: list[int], model, gradients) -> dict:
    arch = checkpoint.arch
    generator = torch.Generator().manual_seed(options.seed)
    parameters = dict(model.named_parameters()) if model is not None else {}
    scores = {}
    for layer in layers:
        weights = {}
        for role in LINEAR_ROLES:
            name = arch.weight(role, layer)
            weights[role] = parameters[name].detach() if name in parameters else checkpoint.get(name, torch.float32)
        scores[layer] = layer_scores(arch, layer, options.importance, weights, gradients, generator)
    return scores


def _layer_table(plan: PrunePlan) -> list[dict]:
    return [{"layer": p.layer, "pruned": p.pruned, **p.sizes()} for p in plan.layers]


def _open_writer(target: str, checkpoint: Checkpoint, options: LlmPrunerOptions, force: bool) -> CheckpointWriter:
    return CheckpointWriter(target, operation="prune", parameters={"method": "llm-pruner", **options.model_dump()},
                            inputs=[checkpoint], seed=options.seed, force=force)


def _write(writer: CheckpointWriter, checkpoint: Checkpoint, config: dict, arch_out: ModelArch, tensors) -> None:
    writer.write_config(config)
    for name, tensor in tensors:
        dtype = checkpoint.entry(name).torch_dtype if name in checkpoint else tensor.dtype
        writer.add_tensor(name, tensor.to(dtype))
    writer.carry_files(checkpoint)
    if LAYER_SIZES_KEY in config:
        with open(writer.path(MODELING_FILE), "w", encoding="utf-8") as f:
            f.write(modeling_source(arch_out))


def check_feasible(arch: ModelArch, options: LlmPrunerOptions, layers: list[int]) -> None:
    """Raise the one-line error a plan would raise, before spending time on gradients."""
    from lctool.prune.groups import LayerScores

    neutral = {
        layer: LayerScores(torch.zeros(arch.heads_in(layer)), torch.zeros(arch.kv_heads_in(layer)),
                           torch.zeros(arch.intermediate_in(layer)))
        for layer in layers
    }
    make_plan(arch, options, layers, neutral)


def run_llm_pruner(source: str, target: str, options: LlmPrunerOptions, *, force: bool = False,
                   log: Log | None = None) -> dict:
    """Prune `source` into `target`; returns a summary (also recorded in the output's lctool.json)."""
    log = log or (lambda message: None)
    started = time.time()
    checkpoint = Checkpoint(source)
    check_input(checkpoint)
    arch = checkpoint.arch
    layers = selected_layers(options, arch.num_layers)
    check_feasible(arch, options, layers)
    log(f"pruning layers {layers[0]}-{layers[-1]} of 0-{arch.num_layers - 1}")
    recovering = options.recovery.steps > 0
    tokenizer = None
    if recovering or options.needs_gradients:
        from lctool.io.hf import load_tokenizer

        tokenizer = load_tokenizer(checkpoint.path)
    with _open_writer(target, checkpoint, options, force) as writer:
        summary = _prune_into(writer, checkpoint, options, layers, tokenizer, log)
    summary["output"] = os.path.abspath(target)
    summary["wall_s"] = round(time.time() - started, 2)
    return summary


def _prune_into(writer: CheckpointWriter, checkpoint: Checkpoint, options: LlmPrunerOptions, layers: list[int],
                tokenizer, log: Log) -> dict:
    arch = checkpoint.arch
    recovering = options.recovery.steps > 0
    model = load_float_model(checkpoint) if options.needs_gradients or recovering else None
    gradients = None
    if options.needs_gradients:
        log(f"gradients on {options.calib_n} calibration windows of {options.calib_len} tokens ({options.calib})")
        gradients = calibration_gradients(model, tokenizer, checkpoint.arch, options, layers)
    scores = score_layers(checkpoint, options, layers, model, gradients)
    del gradients
    plan = make_plan(arch, options, layers, scores)
    config = pruned_config(checkpoint.config, arch, plan)
    arch_out = ModelArch(config)
    log(f"removing {plan.removed_params:,} of {plan.total_params:,} parameters ({plan.removed_fraction:.1%})")
    results = {
        "removed_params": plan.removed_params,
        "params_before": plan.total_params,
        "params_after": plan.total_params - plan.removed_params,
        "removed_fraction": round(plan.removed_fraction, 5),
        "uniform": plan.uniform,
        "stock_loadable": plan.stock_loadable(arch),
        "layers": _layer_table(plan),
    }
    if recovering:
        pruned = build_pruned_model(config, arch_out)
        state = model.state_dict()
        pruned.load_state_dict(dict(pruned_tensors(arch, plan, list(state), state.__getitem__)))
        del model, state
        log(f"recovering: {options.recovery.steps} LoRA steps (rank {options.recovery.rank})")
        from lctool.prune.recover import recover

        pruned, results["recovery"] = recover(pruned, arch_out, tokenizer, options.recovery, device=options.device,
                                              dtype=options.dtype)
        tensors = model_state_tensors(pruned, config)
    else:
        del model  # the cut is taken from the checkpoint's own tensors, one at a time, in their dtype
        tensors = pruned_tensors(arch, plan, checkpoint.tensor_names(), checkpoint.get)
    _write(writer, checkpoint, config, arch_out, tensors)
    writer.results.update(results)
    summary = {"method": "llm-pruner", "importance": options.importance, "ratio": options.ratio, **results}
    if not plan.stock_loadable(arch):
        summary["note"] = TRUST_NOTE
    return summary
