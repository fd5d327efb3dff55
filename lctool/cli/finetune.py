"""`lctool finetune MODEL OUT --data …`: LoRA / QLoRA adapters (or a merged checkpoint) via peft."""

from __future__ import annotations

import typer

from lctool.cli.common import State, device_option, dtype_option, emit, kv_table, stderr

DEVICE_HELP = ("accelerate's device of the training run (cpu forces accelerate's CPU mode; --qlora: where "
               "bitsandbytes quantizes the base): cpu, cuda, cuda:N or mps.")
DTYPE_HELP = ("Mixed precision of the training run (autocast; the adapter and optimizer state stay float32, --merge "
              "writes the base's dtype; --qlora: also bitsandbytes' compute dtype; float16 needs cuda)")


def _table(summary: dict):
    rows = [
        ("written", summary["kind"]),
        ("steps", f"{summary['steps']} (from step {summary['start_step']})"),
        ("loss", f"{summary['first_loss']} → {summary['final_loss']}"),
        ("trainable parameters", f"{summary['trainable_parameters']:,}"),
        ("examples × seq-len", f"{summary['examples']} × {summary['seq_len']}"),
        ("tokens/s", f"{summary['tokens_per_s']:,.0f} ({summary['num_processes']} process(es))"),
        ("peak RSS", f"{summary['peak_rss_mb']:.0f} MB"),
        ("wall", f"{summary['wall_s']:.1f} s"),
    ]
    rows += [(f"eval @ step {e['step']}", ", ".join(f"{k} {v}" for k, v in e.items() if k != "step"))
             for e in summary["evals"]]
    return kv_table(summary["output"], rows)


def finetune_command(
    model: str = typer.Argument(..., help="Base checkpoint folder."),
    out: str = typer.Argument(..., help="Output folder: a peft adapter, or a full checkpoint with --merge."),
    data: str = typer.Option(..., "--data", help="Corpus name (wiki, shakespeare, pydoc; name:split), .txt or .jsonl."),
    data_format: str = typer.Option("auto", "--format", help="auto, text or jsonl ({text} or {prompt, completion} rows)."),
    seq_len: int = typer.Option(None, "--seq-len", help="Tokens per example (default: the model's context, ≤1024)."),
    lora_r: int = typer.Option(16, "--lora-r"),
    lora_alpha: float = typer.Option(32.0, "--lora-alpha"),
    lora_dropout: float = typer.Option(0.05, "--lora-dropout"),
    target: str = typer.Option("all", "--target", help="attn, mlp, all, or roles such as q,v."),
    qlora: bool = typer.Option(False, "--qlora", help="Base weights in bitsandbytes nf4 (double quant)."),
    trainable: str = typer.Option(None, "--trainable", help="Also train fully: comma list of embed, norm, lm_head."),
    steps: int = typer.Option(None, "--steps", help="Optimizer steps (default: one epoch)."),
    epochs: float = typer.Option(None, "--epochs"),
    lr: float = typer.Option(2e-4, "--lr"),
    warmup: int = typer.Option(0, "--warmup", help="Warmup steps."),
    batch: int = typer.Option(8, "--batch", help="Sequences per micro-batch (per process)."),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing"),
    merge: bool = typer.Option(False, "--merge", help="Write the base with the adapter merged in."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint."),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Save a resumable checkpoint every N steps."),
    eval_data: str = typer.Option(None, "--eval-data", help="Held-out text for --eval-every (default: the corpus's eval split)."),
    eval_every: int = typer.Option(0, "--eval-every", help="Held-out perplexity every K steps."),
    log: str = typer.Option(None, "--log", help="JSONL log of every step (a copy goes into OUT)."),
    seed: int = typer.Option(0, "--seed"),
    device: str = device_option("auto", DEVICE_HELP),
    dtype: str = dtype_option("float32", DTYPE_HELP),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
) -> None:
    """Fine-tune with LoRA (or QLoRA) adapters on the shared training loop."""
    from lctool.ops.finetune import FinetuneOptions, finetune
    from lctool.train import TrainingInterrupted

    options = FinetuneOptions(
        data=data, format=data_format, seq_len=seq_len, lora_r=lora_r, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, target=target, qlora=qlora, trainable=trainable, steps=steps, epochs=epochs,
        lr=lr, warmup=warmup, batch=batch, grad_accum=grad_accum, weight_decay=weight_decay,
        grad_checkpointing=grad_checkpointing, merge=merge, resume=resume, checkpoint_every=checkpoint_every,
        eval_data=eval_data, eval_every=eval_every, log=log, seed=seed, device=device, dtype=dtype,
    )
    try:
        summary = finetune(model, out, options, force=force, progress=not State.quiet)
    except TrainingInterrupted as stopped:
        stderr.print(str(stopped))
        raise typer.Abort() from stopped  # the CLI's exit 130
    emit(summary, _table)


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune_command)
