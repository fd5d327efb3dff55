"""`lctool quantize MODEL OUT --method rtn|gptq|spqr|nf4|int8|aqlm`: a thin shell over lctool.quant."""

from __future__ import annotations

import typer

from lctool.cli.common import device_option, dtype_option, emit, grid_table, progress

DEVICE_HELP = ("Where the per-layer math runs (calibration forward, Hessians, GPTQ/SpQR/AQLM solves; nf4/int8: "
               "where bitsandbytes quantizes; --pv-tune: cpu only): cpu, cuda, cuda:N or mps.")
DTYPE_HELP = ("Compute dtype of the calibration forward (Hessians stay float32, solves float32/float64, rtn has no "
              "forward; nf4: bitsandbytes' compute dtype; --pv-tune: mixed precision). The output's dtypes are "
              "its format's, whatever this is")


def _table(summary: dict):
    title = f"{summary['method']} → {summary['output']} ({summary['quant_method']})"
    rows = [(layer["layer"], role, f"{record['error']:.5f}", f"{record['bits']:.3f}",
             f"{record['outlier_rate']:.3%}" if "outlier_rate" in record else "-", f"{record.get('time_s', 0):.2f}")
            for layer in summary["layers"] for role, record in layer["modules"].items()]
    columns = ("layer", "module", "rel. output error", "bits/param", "outliers", "time s")
    return grid_table(title, columns, rows, left=("module",))


def _render(summary: dict) -> list:
    return [_table(summary), _totals(summary)] if summary["layers"] else [_totals(summary)]


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
    model: str = typer.Argument(..., help="Input checkpoint folder (unquantized; or an aqlm model to --pv-tune)."),
    out: str = typer.Argument(..., help="Output folder (must not exist unless --force)."),
    method: str = typer.Option(None, "--method", help="rtn, gptq, spqr, nf4, int8 or aqlm (omit to --pv-tune an aqlm model)."),
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
    pv_tune: str = typer.Option(None, "--pv-tune", help="aqlm: then fine-tune the whole model to the fp one: pv (PV-Tuning) or ste."),
    reference: str = typer.Option(None, "--reference", help="--pv-tune of an aqlm model: the fp model it was made from."),
    pv_steps: int = typer.Option(100, "--pv-steps", help="--pv-tune: optimizer steps (--batch-size windows each)."),
    pv_lr: float = typer.Option(1e-4, "--pv-lr", help="--pv-tune: Adam lr of codebooks, scales, norms, embeddings (ste: and shadows)."),
    pv_v_lr: float = typer.Option(0.1, "--pv-v-lr", help="pv: V step size, relative to each row's scale."),
    pv_subspace: float = typer.Option(0.01, "--pv-subspace", help="pv: fraction of code groups one V step may re-encode."),
    pv_code_every: int = typer.Option(1, "--pv-code-every", help="pv: V step every K steps; ste: re-quantize every K steps."),
    pv_checkpoint_every: int = typer.Option(0, "--pv-checkpoint-every", help="--pv-tune: resumable checkpoint every N steps."),
    resume: bool = typer.Option(False, "--resume", help="--pv-tune: continue an interrupted run."),
    search: str = typer.Option(None, "--search", help="evopress: search the GPTQ bitwidth of each linear layer."),
    bits_choices: str = typer.Option(None, "--bits-choices", help="--search: bitwidths to choose from (default 2,3,4)."),
    target_bits: float = typer.Option(None, "--target-bits", help="--search: average bits per weight, met exactly."),
    database: str = typer.Option(None, "--database", help="--search: level database folder (built when absent)."),
    state: str = typer.Option(None, "--state", help="--search: JSON state file to resume from (default: automatic)."),
    generations: int = typer.Option(None, "--generations", help="--search: generations (default 50)."),
    offspring: int = typer.Option(None, "--offspring", help="--search: offspring per generation (default 16)."),
    selection_tokens: str = typer.Option(None, "--selection-tokens", help="--search: tokens per selection step."),
    survivors: str = typer.Option(None, "--survivors", help="--search: survivors per selection step (default 4,2,1)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Calibration windows per forward."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration sample."),
    device: str = device_option("auto", DEVICE_HELP),
    dtype: str = dtype_option("float32", DTYPE_HELP),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
) -> None:
    """Quantize a model: RTN/GPTQ (GPTQ format), SpQR (HF spqr or lctool_spqr), nf4/int8 (bitsandbytes), AQLM (aqlm format)."""
    from lctool.quant import QuantizeOptions, quantize

    if search is not None:
        from lctool.cli.evopress import quantize_search

        return quantize_search(search, model, out, method, dict(
            bits_choices=bits_choices, target_bits=target_bits, database=database, state=state, generations=generations,
            offspring=offspring, selection_tokens=selection_tokens, survivors=survivors, group_size=group_size, sym=sym,
            act_order=act_order, damp=damp, calib=calib, calib_n=calib_n, calib_len=calib_len, batch_size=batch_size,
            seed=seed, device=device, dtype=dtype), force)
    if method is None and pv_tune is None:
        from lctool.errors import LctoolError

        raise LctoolError("missing option --method (rtn, gptq, spqr, nf4, int8 or aqlm)")
    options = QuantizeOptions(
        method=method or "aqlm", bits=bits, group_size=group_size, sym=sym, act_order=act_order, damp=damp, calib=calib,
        calib_n=calib_n, calib_len=calib_len, skip=[s.strip() for s in skip.split(",") if s.strip()],
        stat_bits=stat_bits, stat_group_size=stat_group_size, outlier_threshold=outlier_threshold,
        batch_size=batch_size, seed=seed, codebooks=codebooks, codebook_bits=codebook_bits,
        in_group_size=in_group_size, out_group_size=out_group_size, beam_size=beam_size, aqlm_rounds=aqlm_rounds,
        finetune_steps=finetune_steps, finetune_lr=finetune_lr, device=device, dtype=dtype,
    )
    if pv_tune is not None or reference is not None or resume:
        _pv_command(model, out, options if method else None, reference, force, dict(
            method=pv_tune, steps=pv_steps, lr=pv_lr, v_lr=pv_v_lr, subspace=pv_subspace, code_every=pv_code_every,
            checkpoint_every=pv_checkpoint_every, resume=resume, beam_size=beam_size, batch=batch_size, calib=calib,
            calib_n=calib_n, calib_len=calib_len, seed=seed, device=device, dtype=dtype))
        return
    with progress() as bar:
        task = bar.add_task("quantizing", total=None, info="")

        def on_layer(index: int, total: int, record: dict) -> None:
            errors = [m["error"] for m in record["modules"].values()]
            info = f"layer {index}: max rel. error {max(errors):.4f}" if errors else ""
            bar.update(task, total=total, completed=index + 1, info=info)

        summary = quantize(model, out, options, force=force, on_layer=on_layer)
    emit(summary, _render)


def _pv_command(model: str, out: str, options, reference: str | None, force: bool, pv: dict) -> None:
    from lctool.cli.common import stderr
    from lctool.errors import check
    from lctool.quant.pv import PvOptions, describe, pv_quantize
    from lctool.train import TrainingInterrupted

    check(pv["method"] is not None, "--reference and --resume apply to --pv-tune runs only")
    try:
        summary = pv_quantize(model, out, options, PvOptions(**pv), reference, force=force)
    except TrainingInterrupted as stopped:
        stderr.print(str(stopped))
        raise typer.Abort() from stopped  # the CLI's exit 130
    emit(summary, lambda s: [*(_render(s) if "layers" in s else []), describe(s)])


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize_command)
