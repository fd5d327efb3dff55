"""Fine-tuning quality and speed: lctool finetune (LoRA, QLoRA, LoRA + trainable embed/norm) against a
plain Hugging Face Trainer + peft run of the same LoRA (same steps, batch, sequence length, lr schedule).

Task: adapt the testbed (pretrained on wiki) to Shakespeare. Reported per run: held-out Shakespeare and
wiki perplexity after training (eval split, ctx 256, first --eval-tokens tokens of each), training
tokens/s (training loop only, data preparation and loading excluded) and the process's peak RSS
during training. Each run is a fresh process with --threads torch threads (default 1: the bench box is
a shared 2-core machine where two spinning OpenMP threads slow small models down many times).
A second table compares the bare training loop with a plain PyTorch loop on full-parameter training.
CPU only: GPU speed is unmeasured.

Run: .venv/bin/python bench/finetune.py [--steps 150] [--batch 8] [--seq-len 128] [--lr 1e-3]
     [--eval-tokens 16384] [--threads 1] [--out bench/results/finetune.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

# The repo root first; this folder out (a bench script named like an installed package would shadow it).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

RUNS = {
    "base": "testbed, no fine-tuning",
    "base-nf4": "testbed in nf4 (QLoRA's starting point)",
    "hf-trainer": "HF Trainer + peft LoRA (baseline)",
    "lora": "lctool finetune (LoRA)",
    "qlora": "lctool finetune --qlora",
    "lora-embed-norm": "lctool finetune --trainable embed,norm",
}
EVAL_CTX = 256


# ---- worker ----------------------------------------------------------------------------------------
def evaluate(model, tokenizer, eval_tokens: int) -> dict:
    from lctool.data import load_text_source
    from lctool.eval import perplexity

    return {
        corpus: round(perplexity(model, tokenizer, load_text_source(corpus, "eval"), ctx=EVAL_CTX,
                                 max_tokens=eval_tokens)["ppl"], 3)
        for corpus in ("shakespeare", "wiki")
    }


def options_for(kind: str, args):
    from lctool.ops.finetune import FinetuneOptions

    extra = {"qlora": kind == "qlora", "trainable": "embed,norm" if kind == "lora-embed-norm" else None}
    return FinetuneOptions(data="shakespeare", seq_len=args.seq_len, steps=args.steps, batch=args.batch, lr=args.lr,
                           warmup=args.warmup, lora_r=16, lora_alpha=32, lora_dropout=0.05, target="all",
                           seed=0, **extra)


def run_lctool(kind: str, base: str, args, workdir: str) -> dict:
    from lctool.ops.finetune import finetune
    from lctool.train.lora import load_adapter, nf4_config

    out = os.path.join(workdir, kind)
    options = options_for(kind, args)
    summary = finetune(base, out, options, progress=False)
    row = {"tokens_per_s": summary["tokens_per_s"], "peak_rss_mb": summary["peak_rss_mb"],
           "train_s": summary["wall_s"], "final_loss": summary["final_loss"],
           "trainable": summary["trainable_parameters"]}
    if kind == "qlora":  # evaluate as trained: the adapter on the nf4 base
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, quantization_config=nf4_config(), device_map="cpu"), out).eval()
    else:
        model = load_adapter(out)
    return row, model


def run_hf_trainer(base: str, args, workdir: str) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    from lctool.io import Checkpoint
    from lctool.io.hf import load_causal_lm, load_tokenizer
    from lctool.io.manifest import peak_rss_mb
    from lctool.ops.finetune import lora_config, training_examples

    checkpoint = Checkpoint(base)
    options = options_for("lora", args)
    windows = training_examples(load_tokenizer(base), options, args.seq_len)["input_ids"]

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return len(windows)

        def __getitem__(self, i):
            return {"input_ids": windows[i], "labels": windows[i]}

    set_seed(0)
    model = get_peft_model(load_causal_lm(base), lora_config(checkpoint, options))
    training_args = TrainingArguments(
        output_dir=os.path.join(workdir, "hf"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, warmup_steps=args.warmup, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=max(1, args.steps // 3), save_strategy="no", report_to="none", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=Windows())
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    row = {"tokens_per_s": round(args.steps * args.batch * args.seq_len / seconds, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
           "train_s": round(seconds, 2), "final_loss": round([e["loss"] for e in trainer.state.log_history if "loss" in e][-1], 5),
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    return row, model.eval()


def worker(kind: str, args) -> None:
    import torch

    from lctool.io.hf import load_causal_lm, load_tokenizer
    from lctool.ops.testbed import testbed_path

    torch.set_num_threads(args.threads)
    base = testbed_path(build=False)
    tokenizer = load_tokenizer(base)
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        if kind == "base":
            row, model = {}, load_causal_lm(base)
        elif kind == "base-nf4":
            from transformers import AutoModelForCausalLM

            from lctool.train.lora import nf4_config

            row, model = {}, AutoModelForCausalLM.from_pretrained(base, quantization_config=nf4_config(), device_map="cpu").eval()
        elif kind == "hf-trainer":
            row, model = run_hf_trainer(base, args, workdir)
        else:
            row, model = run_lctool(kind, base, args, workdir)
        row["ppl"] = evaluate(model, tokenizer, args.eval_tokens)
    print("RESULT " + json.dumps(row), flush=True)


# ---- loop overhead: lctool.train vs a plain torch loop (full-parameter) ------------------------------
def loop_worker(which: str, args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lctool.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    generator = torch.Generator().manual_seed(0)
    steps, batch, seq = args.loop_steps, 8, 128
    data = [{"input_ids": torch.randint(0, 4096, (batch, seq), generator=generator)} for _ in range(steps + 1)]
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if which == "plain":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
        model.train()
        for i, item in enumerate(data):
            if i == 1:  # the first step warms up allocators; timed like lctool's (which includes it)
                started = time.perf_counter()
            loss = model(input_ids=item["input_ids"], labels=item["input_ids"], use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        rate = steps * batch * seq / (time.perf_counter() - started)
    else:
        warm = train(model, data[:1], TrainConfig(steps=1, lr=1e-3, batch_size=batch, progress=False))
        del warm
        result = train(model, data[1:], TrainConfig(steps=steps, lr=1e-3, batch_size=batch, progress=False))
        rate = result.tokens_per_s
    print("RESULT " + json.dumps({"tokens_per_s": round(rate, 1)}), flush=True)


# ---- driver ----------------------------------------------------------------------------------------
def spawn(flag: str, kind: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), flag, kind, *sys.argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def finetune_table(rows: dict, args) -> list[str]:
    base = rows["base"]["ppl"]
    hf_rate = rows["hf-trainer"]["tokens_per_s"]
    lines = [
        "| run | trainable params | final train loss | Shakespeare ppl | wiki ppl | tokens/s | vs HF Trainer | train s | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, row in rows.items():
        ppl = row["ppl"]
        gain = f" ({(ppl['shakespeare'] / base['shakespeare'] - 1) * 100:+.1f}%)"
        drift = f" ({(ppl['wiki'] / base['wiki'] - 1) * 100:+.1f}%)"
        rate = row.get("tokens_per_s")
        lines.append(
            f"| {RUNS[kind]} | {row.get('trainable', 0):,} | {row.get('final_loss', '-')} | {ppl['shakespeare']}{gain} | "
            f"{ppl['wiki']}{drift} | {rate if rate else '-'} | {f'{rate / hf_rate:.2f}×' if rate else '-'} | "
            f"{row.get('train_s', '-')} | {row.get('peak_rss_mb', '-')} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loop-steps", type=int, default=12)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "finetune.md"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--loop-worker", default=None, help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.worker:
        return worker(args.worker, args)
    if args.loop_worker:
        return loop_worker(args.loop_worker, args)

    from lctool.ops.testbed import testbed_path

    if testbed_path(build=False) is None:
        raise SystemExit("the testbed is not built: run `lctool testbed build` first")
    started = time.time()
    rows = {}
    for kind in args.runs.split(","):
        print(f"{kind} …", file=sys.stderr, flush=True)
        rows[kind] = spawn("--worker", kind, args)
        print(f"  {rows[kind]}", file=sys.stderr, flush=True)
    # Interleave the loop-overhead runs so that load from other users hits both alike.
    loop = {"plain": [], "lctool": []}
    for _ in range(2):
        for which in loop:
            loop[which].append(spawn("--loop-worker", which, args)["tokens_per_s"])
    command = "python bench/finetune.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = report(rows, loop, args, command, time.time() - started)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


def report(rows: dict, loop: dict, args, command: str, seconds: float) -> str:
    import platform

    import torch

    plain, ours = max(loop["plain"]), max(loop["lctool"])
    lines = [
        "# lctool finetune: quality and speed on the testbed",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min in all)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, torch {torch.__version__} "
        f"(CPU), {args.threads} thread(s) per run. GPU speed is unmeasured.",
        "",
        f"Task: adapt the testbed (wiki-pretrained Llama) to the Shakespeare train split; {args.steps} steps × batch "
        f"{args.batch} × {args.seq_len} tokens, lr {args.lr} (cosine to 10%, {args.warmup} warmup steps), LoRA r 16 / "
        f"alpha 32 / dropout 0.05 on all linear roles. Perplexity on the eval splits (ctx {EVAL_CTX}, first "
        f"{args.eval_tokens} tokens); change vs the base in brackets. tokens/s counts the training loop only.",
        "",
        *finetune_table(rows, args),
        "",
        "## Loop overhead: lctool.train vs a plain PyTorch loop",
        "",
        "Full-parameter training of a testbed-shaped random Llama (4 layers, hidden 256, vocab 4096), batch 8 × 128, "
        f"{args.loop_steps} steps after one warm-up step, AdamW + clipping in both; best of 2 interleaved runs each.",
        "",
        "| loop | tokens/s | ratio |",
        "|---|---:|---:|",
        f"| plain torch loop | {plain} | 1.00× |",
        f"| lctool.train | {ours} | {ours / plain:.2f}× |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
