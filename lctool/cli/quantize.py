"""`lctool quantize MODEL OUT --method rtn|gptq|spqr|nf4|int8|aqlm`: a thin shell over lctool.quant."""

from __future__ import annotations

import typer

from lctool.cli.common import emit_json, progress, stdout


def _table(summary: dict):
    from rich.table import Table

    title = f"{summary['method']} → {summary['output']} ({summary['quant_method']})"
    table = Table(title=title, title_justify="left")
    for column in ("layer", "module", "rel. output error", "bits/param", "outliers", "time s"):
        table.add_column(column, justify="right" if column != "module" else "left")
    for layer in summary["layers"]:
        for role, record in layer["modules"].items():
            outliers = f"{record['outlier_rate']:.3%}" if "outlier_rate" in record else "-"
            table.add_row(str(layer["layer"]), role, f"{record['error']:.5f}", f"{record['bits']:.3f}", outliers,
                          f"{record.get('time_s', 0):.2f}")
    return table


def _totals(summary: dict) -> str:
    parts = [f"stored bits/param {summary['bits_per_param_stored']:.3f}"]
    if "bits_per_param_paper" in summary:
        parts.append(f"paper accounting {summary['bits_per_param_paper']:.3f}")
        parts.append(f"outlier rate {summary['outlier_rate']:.3%}")
    if "bits_per_param_true" in summary:
        parts.append(f"true bits/param (codes+codebooks+scales) {summary['bits_per_param_true']:.3f}")
    if "mean_error" in summary:
        parts.append(f"mean rel. output error {summary['mean_error']:.5f}")
    parts.append(f"{summary['wall_s']:.1f} s, peak RSS {summary['peak_rss_mb']:.0f} MB")
    return "; ".join(parts)


def quantize_command(
    model: str = typer.Argument(..., help="Input checkpoint folder (unquantized)."),
    out: str = typer.Argument(..., help="Output folder (must not exist unless --force)."),
    method: str = typer.Option(..., "--method", help="rtn, gptq, spqr, nf4, int8 or aqlm."),
    bits: int = typer.Option(None, "--bits", help="Weight bits 2..8 (rtn/gptq: 2, 3, 4, 8; default 4; spqr default 3)."),
    group_size: int = typer.Option(None, "--group-size", help="Columns per grid (rtn/gptq default 128, -1 per row; spqr beta1, default 16)."),
    sym: bool = typer.Option(None, "--sym/--asym", help="Symmetric grid (rtn/gptq default --sym; spqr is asymmetric)."),
    act_order: bool = typer.Option(False, "--act-order", help="Quantize columns by decreasing Hessian diagonal."),
    damp: float = typer.Option(0.01, "--damp", help="Hessian dampening, fraction of its mean diagonal."),
    calib: str = typer.Option("wiki", "--calib", help="Calibration text: corpus name, name:split, or a .txt file."),
    calib_n: int = typer.Option(128, "--calib-n", help="Calibration windows."),
    calib_len: int = typer.Option(2048, "--calib-len", help="Tokens per calibration window."),
    skip: str = typer.Option("", "--skip", help="Comma-separated linear roles to leave unquantized (lm_head always is)."),
    stat_bits: int = typer.Option(3, "--stat-bits", help="spqr: bits of the quantized scales and zero points."),
    stat_group_size: int = typer.Option(16, "--stat-group-size", help="spqr: beta2, rows per second-order grid."),
    outlier_threshold: float = typer.Option(1.0, "--outlier-threshold", help="spqr: tau (relative); inf = no outliers."),
    codebooks: int = typer.Option(1, "--codebooks", help="aqlm: M, codebooks summed per group."),
    codebook_bits: int = typer.Option(8, "--codebook-bits", help="aqlm: B, each codebook holds 2^B vectors (≤ 16)."),
    in_group_size: int = typer.Option(8, "--in-group-size", help="aqlm: consecutive inputs per vector."),
    out_group_size: int = typer.Option(1, "--out-group-size", help="aqlm: outputs per vector (only 1)."),
    beam_size: int = typer.Option(4, "--beam-size", help="aqlm: hypotheses per row in the code search."),
    aqlm_rounds: int = typer.Option(3, "--aqlm-rounds", help="aqlm: code search + codebook refit rounds."),
    finetune_steps: int = typer.Option(50, "--finetune-steps", help="aqlm: Adam steps of the per-block fine-tune (0: off)."),
    finetune_lr: float = typer.Option(1e-4, "--finetune-lr", help="aqlm: learning rate of the per-block fine-tune."),
    batch_size: int = typer.Option(8, "--batch-size", help="Calibration windows per forward."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration sample."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """Quantize a model: RTN/GPTQ (GPTQ format), SpQR (HF spqr or lctool_spqr), nf4/int8 (bitsandbytes), AQLM (aqlm format)."""
    from lctool.quant import QuantizeOptions, quantize

    options = QuantizeOptions(
        method=method, bits=bits, group_size=group_size, sym=sym, act_order=act_order, damp=damp, calib=calib,
        calib_n=calib_n, calib_len=calib_len, skip=[s.strip() for s in skip.split(",") if s.strip()],
        stat_bits=stat_bits, stat_group_size=stat_group_size, outlier_threshold=outlier_threshold,
        batch_size=batch_size, seed=seed, codebooks=codebooks, codebook_bits=codebook_bits,
        in_group_size=in_group_size, out_group_size=out_group_size, beam_size=beam_size, aqlm_rounds=aqlm_rounds,
        finetune_steps=finetune_steps, finetune_lr=finetune_lr,
    )
    with progress() as bar:
        task = bar.add_task("quantizing", total=None, info="")

        def on_layer(index: int, total: int, record: dict) -> None:
            errors = [m["error"] for m in record["modules"].values()]
            info = f"layer {index}: max rel. error {max(errors):.4f}" if errors else ""
            bar.update(task, total=total, completed=index + 1, info=info)

        summary = quantize(model, out, options, force=force, on_layer=on_layer)
    if as_json:
        emit_json(summary)
    else:
        if summary["layers"]:
            stdout.print(_table(summary))
        stdout.print(_totals(summary))


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize_command)
