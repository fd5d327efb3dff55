"""`lctool eval MODEL`: perplexity, bits-per-byte, perplexity versus length, passkey, KL to a reference."""

from __future__ import annotations

import time

import typer

from lctool.cli.common import State, device_option, dtype_option, emit, grid_table, kv_table
from lctool.errors import LctoolError


def _int_list(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LctoolError(f"{option}: expected comma-separated integers, got {text!r}") from None


def _float_list(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LctoolError(f"{option}: expected comma-separated numbers, got {text!r}") from None


class RichTracker:
    """Draws each evaluation stage as a rich progress bar with tokens/s."""

    def __init__(self, progress):
        self.progress = progress
        self.task = None
        self.began = 0.0
        self.done = 0

    def start(self, description: str, total: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(description, total=total, info="")
        self.began, self.done = time.perf_counter(), 0

    def advance(self, tokens: int) -> None:
        self.done += tokens
        rate = self.done / max(time.perf_counter() - self.began, 1e-9)
        self.progress.update(self.task, advance=tokens, info=f"{rate:,.0f} tok/s")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _tables(results: dict) -> list:
    ppl = results["perplexity"]
    rows = [
        ("text", f"{results['source']} ({ppl['text_tokens']:,} tokens, {ppl['text_bytes']:,} bytes)"),
        (
            "windows",
            f"{ppl['windows']} × {ppl['ctx']} tokens, stride {ppl['stride']} ({results['mode']}, {results['dtype']})",
        ),
        (
            "scored",
            f"{ppl['tokens']:,} tokens, {ppl['bytes']:,} bytes"
            + ("" if ppl["bytes_exact"] else " (estimated)"),
        ),
        ("perplexity", _fmt(ppl["ppl"])),
        ("bits per byte", _fmt(ppl["bpb"], 4)),
        ("speed", f"{ppl['tokens_per_s']:,.0f} tokens/s" if ppl["tokens_per_s"] else "-"),
    ]
    if "kl" in results:
        kl = results["kl"]
        rows.append(("KL(reference ‖ model)", f"{kl['kl']:.5f} nats/token vs {kl['reference']}"))
    tables = [kv_table(results["model"], rows)]
    if "ppl_vs_length" in results:
        title = "perplexity vs context length" + (f" → {results['plot']}" if results.get("plot") else "")
        tables.append(grid_table(
            title, ("length", "windows", "scored tokens", "ppl", "bpb"),
            [(row["length"], row["windows"], f"{row['tokens']:,}", _fmt(row["ppl"]), _fmt(row["bpb"], 4))
             for row in results["ppl_vs_length"]],
        ))
    if "passkey" in results:
        tables.append(_passkey_table(results["passkey"]))
    return tables


def _passkey_table(passkey: dict):
    depths = sorted({cell["depth"] for cell in passkey["cells"]})
    by_length = {row["length"]: row["accuracy"] for row in passkey["by_length"]}
    rows = []
    for length in by_length:
        cells = {c["depth"]: c for c in passkey["cells"] if c["length"] == length}
        rows.append((length, *[f"{cells[d]['correct']}/{cells[d]['trials']}" for d in depths],
                     f"{by_length[length]:.2f}"))
    return grid_table(
        f"passkey retrieval accuracy (overall {passkey['accuracy']:.2f}, seed {passkey['seed']})",
        ("length \\ depth", *(f"{depth:g}" for depth in depths), "mean"), rows,
    )


def eval_command(
    model: str = typer.Argument(..., help="Checkpoint folder to evaluate."),
    text: str = typer.Option(None, "--text", help="Evaluate on this UTF-8 text file."),
    corpus: str = typer.Option(
        None, "--corpus", help="Corpus NAME or NAME:SPLIT (wiki, shakespeare, pydoc). Default wiki:eval."
    ),
    ctx: int = typer.Option(
        None, "--ctx", help="Window length in tokens. Default: max_position_embeddings, at most 2048."
    ),
    stride: int = typer.Option(
        None, "--stride", help="Step between windows (default --ctx: non-overlapping)."
    ),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per forward pass."),
    lengths: str = typer.Option(
        None, "--lengths", help="Perplexity versus context length, e.g. 256,512,1024."
    ),
    plot: str = typer.Option(None, "--plot", help="Write the perplexity-versus-length figure to this PNG."),
    passkey: bool = typer.Option(
        False, "--passkey", help="Passkey retrieval accuracy over lengths × depths."
    ),
    passkey_lengths: str = typer.Option(
        None, "--passkey-lengths", help="Prompt lengths in tokens (default --lengths, else --ctx)."
    ),
    passkey_depths: str = typer.Option(
        None, "--passkey-depths", help="Key depths in [0,1] (default 0,0.25,0.5,0.75,1)."
    ),
    passkey_trials: int = typer.Option(3, "--passkey-trials", help="Keys per (length, depth) cell."),
    reference: str = typer.Option(
        None,
        "--reference",
        help="Reference checkpoint: mean per-token KL(P_reference ‖ P_model) in nats, same windows.",
    ),
    max_tokens: int = typer.Option(
        None, "--max-tokens", help="Evaluate only the first N tokens of the text."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the passkeys."),
    dtype: str = dtype_option("float32", "Weights and activations"),
    device: str = device_option("auto"),
    layer_by_layer: str = typer.Option(
        "auto", "--layer-by-layer", help="auto (when the weights do not fit in memory), always or never."
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow the checkpoint's own model code."
    ),
) -> None:
    """Perplexity and bits-per-byte over windows of --ctx tokens; optionally perplexity versus length
    (--lengths, --plot), passkey retrieval (--passkey) and KL(reference ‖ model) (--reference).

    Bits-per-byte = total NLL / (ln 2 × UTF-8 bytes of the scored tokens): the number that compares
    models with different tokenizers.
    """
    from lctool.cli.common import progress
    from lctool.eval.run import EvalOptions, evaluate

    options = EvalOptions(
        text=text,
        corpus=corpus,
        ctx=ctx,
        stride=stride,
        batch_size=batch_size,
        lengths=_int_list(lengths, "--lengths"),
        plot=plot,
        passkey=passkey,
        passkey_lengths=_int_list(passkey_lengths, "--passkey-lengths"),
        passkey_depths=_float_list(passkey_depths, "--passkey-depths"),
        passkey_trials=passkey_trials,
        reference=reference,
        max_tokens=max_tokens,
        seed=seed,
        dtype=dtype,
        device=device,
        layer_by_layer=layer_by_layer,
        trust_remote_code=trust_remote_code,
    )
    _quiet_transformers()
    with progress() as bar:
        results = evaluate(model, options, RichTracker(bar))
    emit(results, _tables)


def _quiet_transformers() -> None:
    # Our own progress bar replaces transformers' weight-loading bars; its warnings stay for --debug.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not State.debug:
        hf_logging.set_verbosity_error()


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
