"""`lctool prune MODEL OUT --method llm-pruner --ratio 0.2`: a thin shell over lctool.prune.

Options default to None here so that only what the user typed reaches the method, whose options
model fills in its own defaults and refuses options that belong to another method.
"""

from __future__ import annotations

import typer

from lctool.cli.common import device_option, dtype_option, emit, grid_table, log, stderr

DEVICE_HELP = ("Where the model computes: llm-pruner's gradient passes and --recover-* training; evopress's "
               "level database and every fitness forward (magnitude/random importance: no model is run): cpu, "
               "cuda, cuda:N or mps.")
DTYPE_HELP = ("Compute dtype: llm-pruner autocasts its gradient passes (weights and gradients stay float32) and "
              "trains the recovery in mixed precision; evopress runs its forwards in it (Hessians stay float32). "
              "The output keeps the input's dtypes")


def _given(**options) -> dict:
    return {k: v for k, v in options.items() if v is not None}


def _table(summary: dict):
    title = (f"llm-pruner ({summary['importance']}) → {summary['output']}: removed {summary['removed_params']:,} of "
             f"{summary['params_before']:,} parameters ({summary['removed_fraction']:.1%})")
    rows = [(row["layer"], "yes" if row["pruned"] else "no", row["heads"], row["kv_heads"], row["intermediate_size"])
            for row in summary["layers"]]
    return grid_table(title, ("layer", "pruned", "heads", "kv heads", "intermediate"), rows)


def _render(summary: dict) -> list:
    if summary.get("method") == "evopress":
        from lctool.cli.evopress import render

        return render(summary)
    shown = [_table(summary)]
    if "recovery" in summary:
        run = summary["recovery"]
        shown.append(f"recovery: {run['steps']} LoRA steps, loss {run['first_loss']} → {run['final_loss']}, "
                     f"{run['wall_s']} s")
    return shown


def prune_command(
    model: str = typer.Argument(..., help="Input checkpoint folder (unquantized)."),
    out: str = typer.Argument(..., help="Output folder (must not exist unless --force)."),
    method: str = typer.Option("llm-pruner", "--method", help="Pruning method: llm-pruner or evopress."),
    ratio: float = typer.Option(None, "--ratio", help="Fraction of the model's parameters to remove, 0 < r < 1."),
    importance: str = typer.Option(
        None, "--importance",
        help="taylor-element (default: best of the estimators in bench/results/prune.md), taylor-vector, second-order, l1, l2 or random."),
    ranking: str = typer.Option(None, "--ranking", help="per-layer (default: each layer loses the same share) or global."),
    scope: str = typer.Option(None, "--scope", help="What to prune: all (heads and channels, default), attn or mlp."),
    layers: str = typer.Option(None, "--layers", help="Inclusive layer range to prune, e.g. 4-30, or all (default: all but the first and last layer)."),
    uniform: bool = typer.Option(None, "--uniform", help="Require every layer alike (stock-loadable output)."),
    gqa_unit: str = typer.Option(
        None, "--gqa-unit", help="query-heads (default: heads within KV groups, group count kept) or kv-groups."),
    keep_heads_multiple: int = typer.Option(None, "--keep-heads-multiple", help="Kept heads per layer: a multiple of N."),
    channel_multiple: int = typer.Option(None, "--channel-multiple", help="Kept MLP channels per layer: a multiple of N."),
    calib: str = typer.Option(None, "--calib", help="Calibration text: corpus name, name:split, or .txt (default wiki)."),
    calib_n: int = typer.Option(None, "--calib-n", help="Calibration windows for the gradients (default 10)."),
    calib_len: int = typer.Option(None, "--calib-len", help="Tokens per calibration window (default 128)."),
    seed: int = typer.Option(None, "--seed", help="Seed of the calibration sample and random importance."),
    recover_steps: int = typer.Option(None, "--recover-steps", help="LoRA recovery steps after pruning (default 0)."),
    recover_lr: float = typer.Option(None, "--recover-lr", help="Recovery learning rate (default 3e-4)."),
    recover_rank: int = typer.Option(None, "--recover-rank", help="Recovery LoRA rank (default 8)."),
    recover_data: str = typer.Option(None, "--recover-data", help="Recovery text source, train split (default wiki)."),
    recover_len: int = typer.Option(None, "--recover-len", help="Tokens per recovery window (default 256)."),
    recover_batch_size: int = typer.Option(None, "--recover-batch-size", help="Windows per recovery step (default 8)."),
    space: str = typer.Option(None, "--space", help="evopress: blocks (drop attention/MLP blocks) or sparsity."),
    target: float = typer.Option(
        None, "--target", help="evopress: blocks: fraction of layers (or a count) dropped; sparsity: average, e.g. 0.5."),
    block_unit: str = typer.Option(None, "--block-unit", help="evopress blocks: sublayer (default) or layer."),
    sparsity_method: str = typer.Option(None, "--sparsity-method", help="evopress: sparsegpt (default) or magnitude."),
    levels: str = typer.Option(None, "--levels", help="evopress: sparsity levels, evenly spaced (default 0,0.1,...,0.9)."),
    database: str = typer.Option(None, "--database", help="evopress: level database folder (built when absent)."),
    state: str = typer.Option(None, "--state", help="evopress: JSON state file to resume from (default: automatic)."),
    generations: int = typer.Option(None, "--generations", help="evopress: generations (default 50)."),
    offspring: int = typer.Option(None, "--offspring", help="evopress: offspring per generation (default 16)."),
    selection_tokens: str = typer.Option(
        None, "--selection-tokens", help="evopress: tokens of each selection step (default 1024,4096,16384)."),
    survivors: str = typer.Option(None, "--survivors", help="evopress: survivors of each step (default 4,2,1)."),
    max_switches: int = typer.Option(None, "--max-switches", help="evopress: most level switches per mutation (3)."),
    initial_candidates: int = typer.Option(None, "--initial-candidates", help="evopress: random starts (default 8)."),
    batch_size: int = typer.Option(None, "--batch-size", help="evopress: windows per forward (default 8)."),
    damp: float = typer.Option(None, "--damp", help="evopress sparsegpt: Hessian dampening (default 0.01)."),
    device: str = device_option("auto", DEVICE_HELP),
    dtype: str = dtype_option("float32", DTYPE_HELP),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
) -> None:
    """Remove whole attention heads and MLP channels (LLM-Pruner), or search per-layer compression (EvoPress).

    Uniform LLM-Pruner results (every layer the same size) load in stock transformers; others carry
    per-layer sizes and a modeling file, and need the caller to enable trust_remote_code to load.
    EvoPress drops blocks (whole layers: stock; attention- or MLP-only: a modeling file) or sets
    unstructured sparsity per linear layer (stock dense weights with zeros).
    """
    from lctool.prune import prune

    given = _given(
        ratio=ratio, importance=importance, ranking=ranking, scope=scope, layers=layers, uniform=uniform,
        gqa_unit=gqa_unit, keep_heads_multiple=keep_heads_multiple, channel_multiple=channel_multiple, calib=calib,
        calib_n=calib_n, calib_len=calib_len, seed=seed, space=space, target=target, block_unit=block_unit,
        sparsity_method=sparsity_method, levels=levels, database=database, state=state, generations=generations,
        offspring=offspring, selection_tokens=selection_tokens, survivors=survivors, max_switches=max_switches,
        initial_candidates=initial_candidates, batch_size=batch_size, damp=damp, device=device, dtype=dtype,
    )
    recovery = _given(steps=recover_steps, lr=recover_lr, rank=recover_rank, data=recover_data, seq_len=recover_len,
                      batch_size=recover_batch_size)
    if recovery:
        given["recovery"] = recovery
    summary = prune(model, out, given, method=method, force=force, log=log)
    if "note" in summary:  # said even with --quiet: the output does not load without it
        stderr.print(f"note: {summary['output']}: {summary['note']}", highlight=False)
    emit(summary, _render)


def register(app: typer.Typer) -> None:
    app.command("prune")(prune_command)
