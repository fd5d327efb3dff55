"""What `lctool prune --method evopress` and `lctool quantize --search evopress` print (not a command itself)."""

from __future__ import annotations

from lctool.cli.common import grid_table


def _what(summary: dict) -> str:
    if summary["space"] == "blocks":
        removed = summary["layers_removed"]
        partial = summary["sublayers_removed"]
        return (f"{summary['block_unit']} blocks: layers removed {removed or 'none'}, attention-only "
                f"{partial['attn'] or 'none'}, MLP-only {partial['mlp'] or 'none'} → {summary['num_layers']} layers")
    if summary["space"] == "sparsity":
        return (f"{summary['sparsity_method']} sparsity: average {summary['average_level']:.4f} (exact "
                f"{summary['average_level_exact']}), measured {summary['measured_sparsity']:.4f}")
    return (f"GPTQ bits: average {summary['average_level']:.4f} (exact {summary['average_level_exact']}), "
            f"base {summary['base_bits']} bits + {summary['modules_at_other_bits']} per-module overrides, "
            f"stored {summary['bits_per_param_stored']:.3f} bits/param")


def render(summary: dict) -> list:
    """A per-unit table (weight spaces: one row per layer, one column per module) and the totals."""
    shown = []
    if summary["space"] != "blocks":
        columns = [key for key in summary["per_layer"][0] if key != "layer"]
        rows = [(row["layer"], *(f"{row[c]:g}" for c in columns)) for row in summary["per_layer"]]
        shown.append(grid_table(f"evopress → {summary['output']}", ("layer", *columns), rows))
    shown.append(_what(summary))
    shown.append(f"KL to dense on the calibration windows: first parent {summary['kl_initial']:.5f} → found "
                 f"{summary['kl_final']:.5f}; {summary['generations']} generations, {summary['evaluated']} "
                 f"evaluations, search {summary['search_s']:.1f} s, total {summary['wall_s']:.1f} s")
    return shown


def typed_options(names: list[str]) -> set[str]:
    """Which of the current command's options the user gave (not left at the command's default)."""
    from typer._click.core import ParameterSource
    from typer._click.globals import get_current_context

    ctx = get_current_context(silent=True)
    if ctx is None:
        return set(names)
    return {n for n in names if ctx.get_parameter_source(n) not in (None, ParameterSource.DEFAULT)}


def quantize_search(search: str, model: str, out: str, method: str | None, values: dict, force: bool) -> None:
    """`lctool quantize --search evopress`: GPTQ at a searched bitwidth per linear layer.

    Options shared with the other methods (--calib-n, --calib-len, ...) reach the search only when
    given: the search has its own, smaller defaults.
    """
    from lctool.cli.common import emit, log
    from lctool.errors import LctoolError, check
    from lctool.prune.evopress import EvoPressQuantOptions, run_evopress_quantize

    check(search == "evopress", f"unknown --search {search!r} (searches: evopress)")
    if method not in (None, "gptq"):
        raise LctoolError(f"--search evopress chooses GPTQ bitwidths; it does not combine with --method {method}")
    given = typed_options(list(values))
    options = EvoPressQuantOptions(**{k: v for k, v in values.items() if v is not None and k in given})
    emit(run_evopress_quantize(model, out, options, force=force, log=log), render)
