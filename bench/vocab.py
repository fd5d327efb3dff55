"""Benchmark: expand the testbed's vocabulary for Shakespeare, per init method.

For the unexpanded testbed (the reference) and one expansion per init method, it measures
  - tokens per character (fertility) on held-out Shakespeare and wiki,
  - bits per byte (not perplexity: the tokenizers differ) on the same texts,
    immediately after expansion and after the same short `lctool finetune --trainable embed,lm_head`
    (LoRA on every linear role + the embedding, tied kept tied) on the Shakespeare train split,
and prints them beside their ratios to the reference; `--out` writes the markdown results file.

    .venv/bin/python bench/vocab.py --out bench/results/vocab.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _testbed import add_testbed_argument, resolve_testbed  # noqa: E402  (bench/ is sys.path[0])

# Then bench/ out of the path: bench/aqlm.py would shadow the aqlm package that peft probes for.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from lctool.data import corpus_text  # noqa: E402
from lctool.eval import load_for_eval, perplexity  # noqa: E402
from lctool.ops.vocab import ExpandOptions, expand, tokens_per_char  # noqa: E402

REFERENCE = "none (unexpanded)"
TEXTS = {"shakespeare": ("shakespeare", "eval"), "wiki": ("wiki", "eval")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_testbed_argument(parser)
    parser.add_argument("--model", default=None, help="benchmark this checkpoint instead of the testbed")
    parser.add_argument("--num-new", type=int, default=1024)
    parser.add_argument("--inits", default="mean,merge,random,align")
    parser.add_argument("--eval-chars", type=int, default=100_000, help="characters of each eval text scored")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--steps", type=int, default=150, help="fine-tune steps (0: skip the fine-tune)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="folder for the expanded models (default: a temp folder)")
    parser.add_argument("--out", default=None, help="write the markdown results here")
    return parser.parse_args(argv)


def eval_texts(chars: int) -> dict[str, str]:
    return {name: corpus_text(corpus, split)[:chars] for name, (corpus, split) in TEXTS.items()}


def bits_per_byte(model, tokenizer, texts: dict[str, str], ctx: int) -> dict[str, float]:
    return {name: perplexity(model, tokenizer, text, ctx)["bpb"] for name, text in texts.items()}


def finetuned(path: str, work: str, args) -> tuple[str, dict]:
    """The same short `lctool finetune` for every model: LoRA on all linear roles + embed/lm_head, merged."""
    from lctool.ops.finetune import FinetuneOptions, finetune

    options = FinetuneOptions(data="shakespeare", seq_len=args.ctx, lora_r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                              trainable="embed,lm_head", steps=args.steps, lr=args.lr, warmup=max(1, args.steps // 10),
                              batch=args.batch_size, merge=True, seed=args.seed)
    out = os.path.join(work, os.path.basename(path.rstrip("/")) + "-finetuned")
    return out, finetune(path, out, options, force=True, progress=False)


def measure(name: str, path: str, texts: dict[str, str], work: str, args) -> dict:
    started = time.time()
    model, tokenizer = load_for_eval(path)
    row = {"model": name, "path": path}
    row.update({f"tpc_{k}": tokens_per_char(path, t) for k, t in texts.items()})
    row.update({f"bpb0_{k}": v for k, v in bits_per_byte(model, tokenizer, texts, args.ctx).items()})
    if args.steps:
        tuned_path, summary = finetuned(path, work, args)
        tuned, tokenizer = load_for_eval(tuned_path)
        row.update({f"bpb1_{k}": v for k, v in bits_per_byte(tuned, tokenizer, texts, args.ctx).items()})
        row["ft_loss"] = summary["final_loss"]
    row["wall_s"] = time.time() - started
    print(f"  {name}: {row['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return row


def table(rows: list[dict], steps: int) -> str:
    reference = rows[0]
    columns = [("tpc_shakespeare", "tokens/char Shakespeare"), ("tpc_wiki", "tokens/char wiki"),
               ("bpb0_shakespeare", "bpb Shakespeare, expanded"), ("bpb0_wiki", "bpb wiki, expanded")]
    if steps:
        columns += [("bpb1_shakespeare", f"bpb Shakespeare, +{steps}-step fine-tune"),
                    ("bpb1_wiki", f"bpb wiki, +{steps}-step fine-tune")]
    header = "| init | " + " | ".join(f"{title} | × ref" for _, title in columns) + " |"
    lines = [header, "|---|" + "---:|---:|" * len(columns)]
    for row in rows:
        cells = [f"{row[key]:.4f} | {row[key] / reference[key]:.3f}" for key, _ in columns]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    if args.model:
        base, args.preset = args.model, "custom"
    else:
        base, args.preset = resolve_testbed(args.testbed)
    work = args.work or tempfile.mkdtemp(prefix="lctool-bench-vocab-")
    os.makedirs(work, exist_ok=True)
    texts = eval_texts(args.eval_chars)
    rows = [measure(REFERENCE, base, texts, work, args)]
    expansions = {}
    for init in args.inits.split(","):
        out = os.path.join(work, f"expanded-{init}")
        options = ExpandOptions(corpus="shakespeare", split="train", num_new=args.num_new, init=init, seed=args.seed)
        expansions[init] = expand(base, out, options, force=True)
        rows.append(measure(init, out, texts, work, args))
    text = table(rows, args.steps)
    command = "python bench/vocab.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(text)
    if args.out:
        write_markdown(args, command, text, rows, expansions, time.time() - started)
    return 0


def finetune_sentence(args) -> str:
    if not args.steps:
        return "No fine-tune in this run (`--steps 0`): the numbers are those right after expansion."
    return (f"Fine-tune: {args.steps} steps × {args.batch_size} windows of {args.ctx} tokens of Shakespeare train with "
            f"`lctool finetune --trainable embed,lm_head` (LoRA r={args.lora_rank} on every linear role + the whole "
            f"embedding, tied kept tied; merged), lr {args.lr}, the same for every row (the reference too).")


def write_markdown(args, command, text, rows, expansions, wall) -> None:
    first = next(iter(expansions.values()))
    lines = [
        "# vocab expand: the testbed expanded for Shakespeare",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {args.threads} CPU threads, torch {torch.__version__}; "
        f"whole run {wall / 60:.1f} min. CPU only: GPU speed is unmeasured.",
        "",
        f"Model: {'`' + args.model + '`' if args.model else f'the `{args.preset}` testbed (`lctool testbed build --preset {args.preset}`)'} (tokenizer {first['tokenizer_size_before']} tokens, tied embeddings), "
        f"expanded by {args.num_new} merges learned on the Shakespeare train split "
        f"(vocab_size {first['vocab_size_before']} → {first['vocab_size_after']}). "
        f"Eval: the first {args.eval_chars:,} characters of the Shakespeare and wiki eval splits, "
        f"windows of {args.ctx} tokens. {finetune_sentence(args)} `× ref` is the ratio to the unexpanded model's "
        "value in the same column (lower is better everywhere).",
        "",
        text,
        "",
        "First new tokens: " + ", ".join(f"`{t!r}`" for t in first["first_new_tokens"]),
        "",
    ]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
