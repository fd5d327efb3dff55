"""EvoPress end to end: validate, build or reuse the level database, search, write the checkpoint.

    lctool prune MODEL OUT --method evopress --space blocks|sparsity --target T
    lctool quantize MODEL OUT --search evopress --bits-choices 2,3,4 --target-bits 3

The search holds the model in memory (float32) for the fitness evaluations; the database is built
one decoder layer at a time and the output is streamed tensor by tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from fractions import Fraction

import torch

from lctool.arch import ATTN_ROLES, DROPPED_SUBLAYERS_KEY, LINEAR_ROLES, MLP_ROLES
from lctool.errors import LctoolError, check
from lctool.io import Checkpoint, CheckpointWriter
from lctool.io.cache import cache_dir
from lctool.io.manifest import peak_rss_mb
from lctool.prune.evopress import database as db
from lctool.prune.evopress import output
from lctool.prune.evopress.fitness import BlockApplier, KlFitness, WeightApplier, block_units
from lctool.prune.evopress.options import EvoPressPruneOptions, EvoPressQuantOptions, SearchOptions
from lctool.prune.evopress.search import Search, SearchPlan
from lctool.prune.evopress.space import SearchSpace, build_space, exact

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def check_input(checkpoint: Checkpoint) -> None:
    if checkpoint.is_quantized:
        method = checkpoint.quantization_config.get("quant_method", "unknown")
        raise LctoolError(f"{checkpoint.path} is quantized ({method}); EvoPress needs the unquantized model")
    if checkpoint.config.get("auto_map") or DROPPED_SUBLAYERS_KEY in checkpoint.config:
        raise LctoolError(f"{checkpoint.path} runs its own model code (auto_map); EvoPress searches stock architectures")


def calibration_windows(checkpoint: Checkpoint, options: SearchOptions) -> torch.Tensor:
    from lctool.data import calibration_batches
    from lctool.io.hf import load_tokenizer

    tokenizer = load_tokenizer(checkpoint.path)
    return calibration_batches(tokenizer, options.calib, options.calib_n, options.calib_len, seed=options.seed)


# ---- spaces -----------------------------------------------------------------------------------------


def blocks_count(target: float, num_layers: int) -> int:
    """Blocks to drop (per kind): a fraction of the layers, or a count when the target is >= 1."""
    value = exact(target)
    count = value if value >= 1 else value * num_layers
    check(count.denominator == 1, f"unreachable target {target:g}: {target:g} of {num_layers} layers is not a whole "
                                  "number of blocks (give a fraction that is, or a count)")
    check(1 <= count <= num_layers - 1, f"unreachable target {target:g}: drop between 1 and {num_layers - 1} blocks "
                                        f"of the {num_layers} layers")
    return int(count)


def blocks_space(checkpoint: Checkpoint, options: EvoPressPruneOptions) -> SearchSpace:
    arch = checkpoint.arch
    layers = arch.num_layers
    count = blocks_count(options.target, layers)

    def params(roles) -> int:
        return sum(checkpoint.entry(arch.weight(r, 0)).numel for r in roles)

    kinds = ["layer"] if options.block_unit == "layer" else ["attn", "mlp"]
    sizes = {"layer": params(LINEAR_ROLES), "attn": params(ATTN_ROLES), "mlp": params(MLP_ROLES)}
    units = [f"{kind}.{i}" for kind in kinds for i in range(layers)]
    groups = [list(range(k * layers, (k + 1) * layers)) for k in range(len(kinds))]
    return build_space(units, [sizes[u.split(".")[0]] for u in units], [Fraction(0), Fraction(1)],
                       Fraction(count, layers), groups)


def linear_space(checkpoint: Checkpoint, levels: list[Fraction], target: float) -> SearchSpace:
    arch = checkpoint.arch
    units = [arch.module(role, i) for i in range(arch.num_layers) for role in LINEAR_ROLES]
    sizes = [checkpoint.entry(unit + ".weight").numel for unit in units]
    return build_space(units, sizes, levels, exact(target))


# ---- the search ---------------------------------------------------------------------------------------


def _digest(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def search_fingerprint(options: SearchOptions, what: dict) -> dict:
    """Everything that decides the search's path except the number of generations (a rerun may extend it)."""
    keys = ("offspring", "selection_tokens", "survivors", "max_switches", "initial_candidates", "calib", "calib_n",
            "calib_len", "seed")
    return {**what, **{k: getattr(options, k) for k in keys}, **compute_key(options)}


def compute_key(options: SearchOptions) -> dict:
    """The compute dtype changes Hessians and KL values, so it keys databases and search states; float32,
    the default, adds nothing (keys made before --dtype existed stay valid). The device does not key them."""
    return {} if options.dtype == "float32" else {"dtype": options.dtype}


def _plan(options: SearchOptions, num_windows: int) -> SearchPlan:
    return SearchPlan(generations=options.generations, offspring=options.offspring,
                      stage_windows=options.stage_windows(), survivors=list(options.survivors),
                      max_switches=options.max_switches, initial_candidates=options.initial_candidates,
                      num_windows=num_windows, seed=options.seed)


def run_search(space: SearchSpace, model: torch.nn.Module, apply, windows: torch.Tensor, options: SearchOptions,
               state_path: str, fingerprint: dict, log: Log, on_generation=None) -> dict:
    """Search, then score the first parent and the result on every calibration window."""
    plan = _plan(options, windows.shape[0])
    for count in plan.stage_windows:
        check(count <= plan.num_windows, f"a selection step needs {count} calibration windows of {options.calib_len} "
                                         f"tokens but --calib-n is {plan.num_windows}: raise --calib-n or lower "
                                         "--selection-tokens")
    fitness = KlFitness(model, windows, apply, options.batch_size)
    state = Search(space, fitness, plan, state_path, fingerprint, log, on_generation).run()
    everything = list(range(windows.shape[0]))
    initial, final = tuple(state["initial"]), tuple(state["parent"])
    for config in (initial, final):
        assert space.meets_target(config), "a configuration off target escaped the search"
    kl_initial = fitness(initial, everything)
    kl_final = fitness(final, everything)
    return {**state, "kl_initial": kl_initial, "kl_final": kl_final}


def _state_path(options: SearchOptions, folder: str | None, fingerprint: dict) -> str:
    path = options.state or os.path.join(folder, f"search-{_digest(fingerprint)}.json")
    check(os.path.isdir(os.path.dirname(os.path.abspath(path))), f"--state: the folder of {path} does not exist")
    return os.path.abspath(path)


def per_layer(arch, space: SearchSpace, config) -> list[dict]:
    """The chosen level of each linear role, layer by layer (weight spaces)."""
    rows: list[dict] = [{"layer": i} for i in range(arch.num_layers)]
    for unit, index in zip(space.units, config, strict=True):
        found = arch.classify(unit + ".weight")
        rows[found.layer][found.role] = float(space.levels[index])
    return rows


def _summary(space: SearchSpace, state: dict, options: SearchOptions, started: float, extra: dict) -> dict:
    final = tuple(state["parent"])
    average = space.average(final)
    return {
        "method": "evopress",
        **extra,
        "average_level": float(average),
        "average_level_exact": str(average),
        "levels": {unit: float(space.levels[i]) for unit, i in zip(space.units, final, strict=True)},
        "generations": state["generation"],
        "evaluated": state["evaluated"],
        "search_s": state["search_s"],
        "kl_initial": round(state["kl_initial"], 6),
        "kl_final": round(state["kl_final"], 6),
        "history": state["history"],
        "wall_s": round(time.time() - started, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def _load_model(checkpoint: Checkpoint, options: SearchOptions) -> torch.nn.Module:
    from lctool.io.hf import load_causal_lm

    return load_causal_lm(checkpoint.path, dtype=options.torch_dtype).to(options.device)


# ---- prune --method evopress --------------------------------------------------------------------------


def run_evopress_prune(source: str, target: str, options: EvoPressPruneOptions, *, force: bool = False,
                       log: Log | None = None, on_generation=None) -> dict:
    log = log or _quiet
    started = time.time()
    checkpoint = Checkpoint(source)
    check_input(checkpoint)
    levels = [exact(v) for v in options.level_strings()]
    space = blocks_space(checkpoint, options) if options.space == "blocks" else linear_space(checkpoint, levels,
                                                                                            options.target)
    with CheckpointWriter(target, operation="prune", parameters={"method": "evopress", **options.model_dump()},
                          inputs=[checkpoint], seed=options.seed, force=force) as writer:
        windows = calibration_windows(checkpoint, options)
        if options.space == "blocks":
            what = {"space": "blocks", "block_unit": options.block_unit, "target": str(exact(options.target)),
                    "model": db.model_identity(checkpoint)}
            fingerprint = search_fingerprint(options, what)
            state_path = _state_path(options, None if options.state else cache_dir("evopress"), fingerprint)
            model = _load_model(checkpoint, options)
            applier = BlockApplier(model, checkpoint.arch, space)
            state = run_search(space, model, applier.apply, windows, options, state_path, fingerprint, log, on_generation)
            dropped = {"attn": [], "mlp": []}
            for unit, level in zip(space.units, state["parent"], strict=True):
                if level:
                    for kind, index in block_units(checkpoint.arch, unit):
                        dropped[kind].append(index)
            details = output.write_blocks(checkpoint, writer, dropped)
            database_path = None
        else:
            settings = {} if options.sparsity_method == "magnitude" else {
                "calib": options.calib, "calib_n": options.calib_n, "calib_len": options.calib_len,
                "seed": options.seed, "damp": options.damp, **compute_key(options)}
            description = db.describe("sparsity", options.sparsity_method, levels, settings, checkpoint)
            database, state_path, state = _search_over_database(
                "sparsity", options.target, description, checkpoint, levels, space, windows, options, log, on_generation)
            database_path = database.path
            chosen = {unit: space.levels[i] for unit, i in zip(space.units, state["parent"], strict=True)}
            details = output.write_sparse(checkpoint, writer, database, chosen)
        extra = {"space": options.space, "target": options.target, "database": database_path, "state": state_path,
                 "output": writer.target, **details}
        if options.space == "blocks":
            extra["block_unit"] = options.block_unit
        else:
            extra["sparsity_method"] = options.sparsity_method
            extra["per_layer"] = per_layer(checkpoint.arch, space, state["parent"])
        summary = _summary(space, state, options, started, extra)
        writer.results.update(summary)
    if options.space == "blocks" and not summary["stock_loadable"]:
        summary["note"] = ("some layers lost only their attention or only their MLP: load it with trust_remote_code=True "
                           "(lctool eval --trust-remote-code)")
    return summary


# ---- quantize --search evopress -----------------------------------------------------------------------


def validate_bits(checkpoint: Checkpoint, options: EvoPressQuantOptions) -> list[Fraction]:
    from lctool.quant import QuantizeOptions
    from lctool.quant.api import validate

    levels = [exact(v) for v in options.level_strings()]
    for bits in levels:
        validate(checkpoint, QuantizeOptions(method="gptq", bits=int(bits), group_size=options.group_size,
                                             sym=options.sym, act_order=options.act_order, damp=options.damp))
    return levels


def _search_over_database(kind: str, target, description: dict, checkpoint: Checkpoint, levels, space, windows,
                          options, log: Log, on_generation):
    """Per-layer levels drawn from a level database (sparsity or bits): prepare (or reuse) the database,
    then search; returns (database, state path, final search state)."""
    database = db.prepare(options.database, description, checkpoint, levels, lambda: windows, log,
                          options.batch_size, device=options.device)
    fingerprint = search_fingerprint(options, {"space": kind, "target": str(exact(target)),
                                               "levels": [str(v) for v in levels], "database": description})
    state_path = _state_path(options, database.path, fingerprint)
    model = _load_model(checkpoint, options)
    applier = WeightApplier(model, database, space)
    state = run_search(space, model, applier.apply, windows, options, state_path, fingerprint, log, on_generation)
    return database, state_path, state


def run_evopress_quantize(source: str, target: str, options: EvoPressQuantOptions, *, force: bool = False,
                          log: Log | None = None, on_generation=None) -> dict:
    log = log or _quiet
    started = time.time()
    checkpoint = Checkpoint(source)
    check_input(checkpoint)
    levels = validate_bits(checkpoint, options)
    space = linear_space(checkpoint, levels, options.target_bits)
    with CheckpointWriter(target, operation="quantize", parameters={"search": "evopress", **options.model_dump()},
                          inputs=[checkpoint], seed=options.seed, force=force) as writer:
        windows = calibration_windows(checkpoint, options)
        settings = {"calib": options.calib, "calib_n": options.calib_n, "calib_len": options.calib_len,
                    "seed": options.seed, "damp": options.damp, "group_size": options.group_size, "sym": options.sym,
                    "act_order": options.act_order, **compute_key(options)}
        description = db.describe("bits", "gptq", levels, settings, checkpoint)
        database, state_path, state = _search_over_database(
            "bits", options.target_bits, description, checkpoint, levels, space, windows, options, log, on_generation)
        bits = {unit: int(space.levels[i]) for unit, i in zip(space.units, state["parent"], strict=True)}
        details = output.write_mixed_gptq(checkpoint, writer, database, bits, settings)
        extra = {"space": "bits", "target": options.target_bits, "quant_method": "gptq", "database": database.path,
                 "state": state_path, "output": writer.target, **details,
                 "per_layer": per_layer(checkpoint.arch, space, state["parent"])}
        summary = _summary(space, state, options, started, extra)
        writer.results.update(summary)
    return summary
