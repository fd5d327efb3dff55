"""`lctool merge CONFIG.yml OUT` or `lctool merge --method M --base BASE MODEL... OUT`."""

from __future__ import annotations

import typer

from lctool.cli.common import DTYPES, device_option, dtype_option, emit, kv_table, log, progress
from lctool.errors import LctoolError


def _floats(values: list[str] | None, option: str) -> list[float] | None:
    if not values:
        return None
    numbers = []
    for value in values:
        for part in value.split(","):
            try:
                numbers.append(float(part))
            except ValueError:
                raise LctoolError(f"{option}: {part!r} is not a number") from None
    return numbers


def merge_command(
    arguments: list[str] = typer.Argument(..., help="CONFIG.yml OUT, or (with --method) MODEL... OUT."),
    method: str = typer.Option(None, "--method", help="Quick merge without a file: linear, ties, dare_ties, ..."),
    base: str = typer.Option(None, "--base", help="Base model of a quick merge."),
    weight: list[str] = typer.Option(None, "--weight", help="Weight per model (repeat, or comma-separated)."),
    density: list[str] = typer.Option(None, "--density", help="Density per model (repeat, or comma-separated)."),
    param: list[str] = typer.Option(None, "--param", help="Global parameter KEY=VALUE, e.g. t=0.5, lambda=1.2."),
    dtype: str = dtype_option(None, "Working dtype of a quick merge", (*DTYPES, "float64")),
    out_dtype: str = dtype_option(None, "Output dtype of a quick merge", (*DTYPES, "float64"), "--out-dtype"),
    tokenizer_source: str = typer.Option(None, "--tokenizer-source", help="Quick merge: base, union or a model."),
    seed: int = typer.Option(0, "--seed", help="Seed of DARE/DELLA masks (same seed, same bytes)."),
    seed_mode: str = typer.Option("tensor", "--seed-mode", help="tensor (per-tensor seeds) or mergekit (its draw order)."),
    rescale: str = typer.Option("l1", "--rescale", help="DARE/DELLA rescaling: l1 (mergekit) or inverse_density (paper)."),
    tie_break: str = typer.Option("argsort", "--tie-break", help="TIES cut ties: argsort (as mergekit) or index (lowest index first)."),
    device: str = device_option("cpu", "Device of the arithmetic: cpu, cuda or cuda:N."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output shard."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
) -> None:
    """Merge fine-tunes of one base: mergekit YAML configs unchanged, or a quick merge from options."""
    from lctool.merge import MergeOptions, merge, quick_config

    if len(arguments) < 2:
        raise LctoolError("give CONFIG.yml OUT, or --method with MODEL... OUT")
    *inputs, target = arguments
    if method is None:
        if len(inputs) != 1:
            raise LctoolError("without --method, give exactly CONFIG.yml OUT")
        quick_only = {"--base": base, "--weight": weight, "--density": density, "--param": param, "--dtype": dtype,
                      "--out-dtype": out_dtype, "--tokenizer-source": tokenizer_source}
        given = [name for name, value in quick_only.items() if value]
        if given:
            raise LctoolError(f"{given[0]} only applies to quick merges (--method); put it in the config file")
        config = inputs[0]
    else:
        config = quick_config(
            method,
            inputs,
            base=base,
            weights=_floats(weight, "--weight"),
            densities=_floats(density, "--density"),
            params=param,
            dtype=dtype,
            out_dtype=out_dtype,
            tokenizer_source=tokenizer_source,
        )
    options = MergeOptions(
        seed=seed, seed_mode=seed_mode, rescale_rule=rescale, tie_break=tie_break, device=device,
        max_shard_size=max_shard_size,
    )
    with progress() as bar:
        task = bar.add_task("merging", total=None, info="")

        def on_tensor(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, info=name)

        results = merge(config, target, options, force=force, on_tensor=on_tensor)
    if results["ignored_tensors"]:
        log(f"ignored {len(results['ignored_tensors'])} tensor(s) the architecture map does not know")
    emit(results, _table)


def _table(results: dict):
    keys = ("method", "models", "tensors", "merge_seconds", "peak_rss_mb")
    return kv_table(f"merged into {results['output']}", [(key, results[key]) for key in keys])


def register(app: typer.Typer) -> None:
    app.command("merge")(merge_command)
