"""`lctool vocab expand|trim|fertility`: change a model's BPE vocabulary without breaking it."""

from __future__ import annotations

import typer

from lctool.cli.common import DTYPES, device_option, dtype_option, emit, grid_table, kv_table, log

vocab_app = typer.Typer(help="Expand or trim a model's byte-level BPE vocabulary (tokenizer + embeddings).",
                        no_args_is_help=True)


def _results_table(title: str):
    def render(results: dict):
        rows = [(key.replace("_", " "), ", ".join(repr(v) for v in value) if isinstance(value, list) else value)
                for key, value in results.items()]
        return kv_table(f"{title}: {results['output']}", rows)

    return render


@vocab_app.command("expand")
def expand_command(
    model: str = typer.Argument(..., help="Input checkpoint folder (with a byte-level BPE tokenizer.json)."),
    out: str = typer.Argument(..., help="Output folder (must not exist unless --force)."),
    corpus: str = typer.Option(None, "--corpus", help="Text to learn merges from: wiki, shakespeare, pydoc, name:split, or a .txt file."),
    split: str = typer.Option("train", "--split", help="Split of a named corpus."),
    num_new: int = typer.Option(None, "--num-new", help="How many new merges (tokens) to learn from --corpus."),
    tokens: str = typer.Option(None, "--tokens", help="Add these tokens instead: one per line (leading spaces count) or a .json list."),
    init: str = typer.Option("mean", "--init", help="New rows: mean, merge, random or align."),
    min_frequency: int = typer.Option(2, "--min-frequency", help="Least corpus count of a pair to become a merge."),
    pad_to_multiple: int = typer.Option(1, "--pad-to-multiple", help="Round vocab_size up to a multiple (e.g. 64)."),
    seed: int = typer.Option(0, "--seed", help="Seed of random init and of align's SVD."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size"),
    device: str = device_option("cpu", "Where the new rows (and the padding rows' mean) are computed: cpu, cuda, "
                                       "cuda:N or mps."),
    dtype: str = dtype_option("float32", "Dtype of that arithmetic (old rows are copied exactly; the matrices "
                                         "keep their dtype; align's auxiliary SVD stays float32 on the CPU)",
                              (*DTYPES, "float64")),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
) -> None:
    """Learn new BPE merges on a corpus (or add given tokens), continuing the model's own merges."""
    from lctool.ops.vocab import ExpandOptions, expand

    options = ExpandOptions(corpus=corpus, split=split, num_new=num_new, tokens_file=tokens, init=init,
                            min_frequency=min_frequency, pad_to_multiple=pad_to_multiple, seed=seed,
                            max_shard_size=max_shard_size, device=device, dtype=dtype)
    log(f"vocab expand: {model} -> {out}")
    results = expand(model, out, options, force=force)
    emit(results, _results_table("vocab expand"))


@vocab_app.command("trim")
def trim_command(
    model: str = typer.Argument(..., help="Input checkpoint folder (with a byte-level BPE tokenizer.json)."),
    out: str = typer.Argument(..., help="Output folder (must not exist unless --force)."),
    corpus: str = typer.Option(..., "--corpus", help="Keep the tokens this text uses: corpus name, name:split, or a .txt file."),
    split: str = typer.Option("train", "--split", help="Split of a named corpus."),
    pad_to_multiple: int = typer.Option(1, "--pad-to-multiple", help="Round vocab_size up to a multiple (e.g. 64)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size"),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
) -> None:
    """Remove tokens a corpus never uses (and merges producing only them), renumbering ids everywhere."""
    from lctool.ops.vocab import TrimOptions, trim

    options = TrimOptions(corpus=corpus, split=split, pad_to_multiple=pad_to_multiple, max_shard_size=max_shard_size)
    log(f"vocab trim: {model} -> {out}")
    results = trim(model, out, options, force=force)
    emit(results, _results_table("vocab trim"))


@vocab_app.command("fertility")
def fertility_command(
    models: list[str] = typer.Argument(..., help="Checkpoint or tokenizer folders."),
    corpus: list[str] = typer.Option(["shakespeare:eval", "wiki:eval"], "--corpus", help="Texts to measure (repeatable)."),
) -> None:
    """Tokens per character of each tokenizer on each text (lower: fewer tokens for the same text)."""
    from lctool.data import load_text_source
    from lctool.ops.vocab import tokens_per_char

    texts = {name: load_text_source(name) for name in corpus}
    rows = {model: {name: round(tokens_per_char(model, text), 5) for name, text in texts.items()} for model in models}
    emit({"tokens_per_char": rows}, lambda result: grid_table(
        "tokens per character", ("tokenizer", *texts),
        [(model, *(f"{v:.4f}" for v in values.values())) for model, values in result["tokens_per_char"].items()],
        left=("tokenizer",),
    ))


def register(app: typer.Typer) -> None:
    app.add_typer(vocab_app, name="vocab")
