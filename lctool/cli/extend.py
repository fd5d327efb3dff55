"""`lctool extend MODEL OUT --method ...`: longer context by RoPE scaling, E²-LLM or CLEX."""

from __future__ import annotations

import json
import os

import typer

from lctool.cli.common import device_option, dtype_option, emit, kv_table
from lctool.errors import LctoolError

METHOD_HELP = "linear | ntk | dynamic | yarn | llama3 | longrope (training-free); e2llm | clex (short fine-tune)"
DEVICE_HELP = ("e2llm/clex: accelerate's device of the training run; --search: where perplexities are measured; "
               "the training-free methods otherwise touch no tensors (the flag is only checked): cpu, cuda, "
               "cuda:N or mps.")
DTYPE_HELP = ("e2llm/clex: the training run's mixed precision (weights stay float32; float16 needs cuda); --search: "
              "the scoring model's dtype; training-free otherwise: checked only. The output keeps the input's dtypes")


def _factor_list(text: str | None) -> list[float] | None:
    """'1.0,1.2,...' or a path to a JSON list of numbers."""
    if text is None:
        return None
    if os.path.isfile(text):
        from lctool.io.reader import read_json

        values = read_json(text, text)
    else:
        try:
            values = [float(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise LctoolError(f"cannot read {text!r} as comma-separated numbers or a JSON file") from None
    if not isinstance(values, list):
        raise LctoolError(f"{text}: expected a list of numbers")
    return values


def summary(path: str) -> dict:
    """What the output holds, for the result table / JSON."""
    from lctool.io import Checkpoint

    checkpoint = Checkpoint(path)
    results = (checkpoint.manifest or {}).get("results", {})
    rope = checkpoint.arch.rope
    return {
        "output": checkpoint.path,
        "method": results.get("method"),
        "original_length": results.get("original_length"),
        "target_length": results.get("target_length"),
        "factor": results.get("factor"),
        "max_position_embeddings": checkpoint.arch.max_positions,
        "rope": {"theta": rope.theta, "type": rope.rope_type,
                 **{k: v for k, v in rope.params.items() if not isinstance(v, list)}},
        "needs_trust_remote_code": bool(checkpoint.config.get("auto_map")),
        "training": results.get("training"),
        "search": results.get("search"),
    }


def _table(info: dict):
    rows = [
        ("method", str(info["method"])),
        ("original length L0", str(info["original_length"])),
        ("target length L", str(info["target_length"])),
        ("factor", f"{info['factor']:g}" if info["factor"] else "-"),
        ("max_position_embeddings", str(info["max_position_embeddings"])),
        ("rope_parameters", json.dumps(info["rope"])),
        ("trust_remote_code needed", "yes" if info["needs_trust_remote_code"] else "no"),
    ]
    training = info.get("training") or {}
    for key in ("steps", "first_loss", "final_loss", "cpu_minutes", "wall_s", "tokens_per_s"):
        if key in training:
            value = training[key]
            rows.append((f"training {key}", f"{value:.4g}" if isinstance(value, float) else str(value)))
    for trial in info.get("search") or []:
        shape = ", ".join(f"{k} {v:g}" for k, v in trial.items() if k not in ("factor", "ppl"))
        rows.append((f"search factor {trial['factor']:g}" + (f", {shape}" if shape else ""), f"ppl {trial['ppl']:.3f}"))
    return kv_table(f"extend → {info['output']}", rows)


def extend_command(
    source: str = typer.Argument(..., help="Input checkpoint folder."),
    target: str = typer.Argument(..., help="Output folder (must not exist unless --force)."),
    method: str = typer.Option(..., "--method", "-m", help=METHOD_HELP),
    factor: float = typer.Option(None, "--factor", help="Scale F (> 1); default target/original length."),
    original_length: int = typer.Option(None, "--original-length", help="L0; default from the input config."),
    target_length: int = typer.Option(None, "--target-length", help="L; default ceil(F·L0)."),
    beta_fast: float = typer.Option(32.0, "--beta-fast", help="YaRN: rotations above which a frequency is kept."),
    beta_slow: float = typer.Option(1.0, "--beta-slow", help="YaRN: rotations below which it is interpolated."),
    attention_factor: float = typer.Option(None, "--attention-factor", help="YaRN/LongRoPE temperature."),
    low_freq_factor: float = typer.Option(1.0, "--low-freq-factor", help="Llama 3.1 low_freq_factor."),
    high_freq_factor: float = typer.Option(4.0, "--high-freq-factor", help="Llama 3.1 high_freq_factor."),
    short_factor: str = typer.Option(None, "--short-factor", help="LongRoPE: comma list or JSON file."),
    long_factor: str = typer.Option(None, "--long-factor", help="LongRoPE: comma list or JSON file."),
    corpus: str = typer.Option("wiki", "--corpus", help="Training text (e2llm/clex): corpus, name:split or .txt."),
    steps: int = typer.Option(200, "--steps", help="Training steps (e2llm/clex)."),
    lr: float = typer.Option(2e-4, "--lr", help="Learning rate (e2llm/clex)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Sequences of L0 tokens per step."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Gradient accumulation steps."),
    lora_rank: int = typer.Option(None, "--lora-rank", help="Train LoRA on attention instead of all weights."),
    g_max: int = typer.Option(None, "--g-max", help="E²-LLM: largest sampled scale (default ceil(L/L0))."),
    t_max: int = typer.Option(None, "--t-max", help="CLEX: largest sampled time (default ceil(L/L0))."),
    clex_positions: str = typer.Option("consecutive", "--clex-positions",
                                       help="CLEX: training positions: consecutive | runs | sampled (paper's code)."),
    clex_run_length: int = typer.Option(32, "--clex-run-length", help="CLEX: consecutive positions per run."),
    clex_ode_lr_scale: float = typer.Option(0.001, "--clex-ode-lr-scale", help="CLEX: the ODE's lr as a fraction of --lr (measured best of 0.01 and 0.001)."),
    clex_long_text: bool = typer.Option(False, "--clex-long-text/--clex-short-text",
                                        help="CLEX: read each token at its position of t·L0-token text (else L0-token text)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the training run."),
    checkpoint_dir: str = typer.Option(None, "--checkpoint-dir", help="Save training state here (resumable)."),
    resume: bool = typer.Option(False, "--resume", help="Resume from --checkpoint-dir."),
    search: bool = typer.Option(False, "--search", help="Pick factor/shape by held-out ppl at the target length."),
    search_corpus: str = typer.Option("wiki:calib", "--search-corpus", help="Held-out text for --search."),
    search_tokens: int = typer.Option(8192, "--search-tokens", help="Tokens scored per --search candidate."),
    device: str = device_option("auto", DEVICE_HELP),
    dtype: str = dtype_option("float32", DTYPE_HELP),
    force: bool = typer.Option(False, "--force", help="Replace an existing output; re-scale an already scaled input."),
) -> None:
    """Extend the context window: write the RoPE scaling (training-free) or fine-tune with E²-LLM / CLEX."""
    from lctool.ops.extend import ExtendOptions, TrainingOptions, extend
    from lctool.ops.extend.options import TRAINED_METHODS

    compute = {"device": device, "dtype": dtype}
    training = TrainingOptions(
        corpus=corpus, steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, lora_rank=lora_rank,
        seed=seed, checkpoint_dir=checkpoint_dir, resume=resume, **(compute if method in TRAINED_METHODS else {}),
    )
    options = ExtendOptions(
        method=method, factor=factor, original_length=original_length, target_length=target_length,
        beta_fast=beta_fast, beta_slow=beta_slow, attention_factor=attention_factor,
        low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor,
        short_factor=_factor_list(short_factor), long_factor=_factor_list(long_factor),
        training=training, g_max=g_max, t_max=t_max, clex_positions=clex_positions, clex_run_length=clex_run_length,
        clex_long_text=clex_long_text, clex_ode_lr_scale=clex_ode_lr_scale,
    )
    search_options = None
    if search:
        from lctool.ops.extend.search import SearchOptions

        search_options = SearchOptions(corpus=search_corpus, max_tokens=search_tokens, **compute)
    out = extend(source, target, options, force=force, search=search_options)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under accelerate launch / torchrun the main process reports
    emit(summary(out), _table)


def register(app: typer.Typer) -> None:
    app.command("extend")(extend_command)
