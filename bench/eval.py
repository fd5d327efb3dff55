"""Perplexity throughput and peak RSS: `lctool eval` against a naive Hugging Face loop.

Both score the same windows in the same batches (lctool.eval.windows.plan_windows): the naive loop
calls `model(input_ids=batch, labels=labels)` (labels -100 where a token is not scored) and sums
`loss x scored tokens`; lctool runs the decoder, then the output head on the scored rows only, in
bounded chunks. The layer-by-layer mode (one decoder layer in memory) is shown too.

Each figure comes from a fresh process; the best tokens/s and the lowest peak of --repeats runs are
shown. Peak RSS is measured over the evaluation alone: the process resets its high-water mark
(/proc/self/clear_refs) after loading, so "peak RSS" = loaded model + evaluation working set, and
"eval extra" = peak minus the RSS just before evaluating. CPU only: GPU speed is unmeasured.

Model: the testbed when it is built (`lctool testbed build`), else a random Llama of testbed-like
shape. Run: .venv/bin/python bench/eval.py [--max-tokens 16384] [--ctx 256] [--batch-size 8]
[--threads 1] [--repeats 3] [--random-vocab N] [--out bench/results/eval.md [--append]]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = ("naive HF loop", "lctool eval", "lctool eval, layer by layer")
RANDOM_SHAPE = dict(
    hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
    num_key_value_heads=2, vocab_size=8192, max_position_embeddings=256, tie_word_embeddings=True,
)  # fmt: skip


# ---- the worker: one method, one process ---------------------------------------------------------


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def naive_nll(model, batches) -> float:
    import torch

    total = 0.0
    for batch in batches:
        labels = batch.input_ids.clone()
        for row, first in enumerate(batch.first_scored.tolist()):
            labels[row, :first] = -100
        with torch.no_grad():
            loss = model(input_ids=batch.input_ids, labels=labels).loss
        total += float(loss) * int((labels[:, 1:] != -100).sum())
    return total


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from lctool.data import load_text_source
    from lctool.eval import LayerwiseRunner, load_for_eval, perplexity_of_stream, tokenize_stream
    from lctool.eval.windows import plan_windows

    model, tokenizer = load_for_eval(args.model) if args.method != METHODS[2] else (None, None)
    if model is None:
        from lctool.io.hf import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        model = LayerwiseRunner(args.model)
    stream = tokenize_stream(tokenizer, load_text_source(args.text, split="eval")).truncated(args.max_tokens)
    plan = plan_windows(len(stream), args.ctx)
    batches = list(plan.batches(stream.ids, args.batch_size))
    reset_peak_rss()
    before_kb = status_kb("VmRSS")
    began = time.perf_counter()
    if args.method == METHODS[0]:
        nll = naive_nll(model, batches)
    else:
        nll = perplexity_of_stream(model, stream, args.ctx, None, args.batch_size)["nll_sum"]
    seconds = time.perf_counter() - began
    return {
        "ppl": math.exp(nll / plan.scored_tokens),
        "tokens_per_s": plan.input_tokens / seconds,
        "peak_rss_mb": status_kb("VmHWM") / 1024,
        "eval_extra_mb": (status_kb("VmHWM") - before_kb) / 1024,
        "windows": plan.num_windows,
        "input_tokens": plan.input_tokens,
    }


# ---- the driver ----------------------------------------------------------------------------------


def bench_model(scratch: str, random_vocab: int | None) -> tuple[str, str]:
    from lctool.ops.testbed import testbed_path

    path = None if random_vocab else testbed_path(build=False)
    if path:
        from lctool.io import Checkpoint

        arch = Checkpoint(path).arch
        params = Checkpoint(path).num_parameters() / 1e6
        shape = f"{arch.num_layers} layers, hidden {arch.hidden_size}, vocab {arch.vocab_size}"
        return path, f"the testbed ({os.path.basename(path)}: {params:.2f}M parameters, {shape})"
    from tests.tiny_models import save_tiny

    shape_overrides = {**RANDOM_SHAPE, "vocab_size": random_vocab or RANDOM_SHAPE["vocab_size"]}
    shape = ", ".join(f"{k}={v}" for k, v in shape_overrides.items() if k != "max_position_embeddings")
    return save_tiny(
        os.path.join(scratch, "random"), **RANDOM_SHAPE
    ), f"random Llama ({shape}; byte tokenizer)"


def run_method(method: str, model: str, args) -> dict:
    command = [
        sys.executable, __file__, "--worker", method, "--model", model, "--text", args.text, "--ctx", str(args.ctx),
        "--batch-size", str(args.batch_size), "--max-tokens", str(args.max_tokens), "--threads", str(args.threads),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_of(runs: list[dict]) -> dict:
    return {
        **runs[0],
        "tokens_per_s": max(r["tokens_per_s"] for r in runs),
        "peak_rss_mb": min(r["peak_rss_mb"] for r in runs),
        "eval_extra_mb": min(r["eval_extra_mb"] for r in runs),
    }


def table(results: dict[str, dict]) -> str:
    naive = results[METHODS[0]]
    lines = [
        "| method | perplexity | tokens/s | × naive | peak RSS (MB) | × naive | eval extra (MB) | × naive |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, r in results.items():
        lines.append(
            f"| {method} | {r['ppl']:.4f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / naive['tokens_per_s']:.2f} | "
            f"{r['peak_rss_mb']:,.0f} | {r['peak_rss_mb'] / naive['peak_rss_mb']:.2f} | "
            f"{r['eval_extra_mb']:,.0f} | {r['eval_extra_mb'] / max(naive['eval_extra_mb'], 1e-9):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help="checkpoint (default: the testbed, else a random Llama)")
    parser.add_argument("--text", default="wiki:eval")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--random-vocab", type=int, help="use a random Llama with this vocabulary, not the testbed"
    )
    parser.add_argument("--out", help="also write the results as markdown here")
    parser.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    args = parser.parse_args()
    if args.worker:
        args.method = args.worker
        print(json.dumps(worker(args)))
        return
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        model, description = (
            (args.model, args.model) if args.model else bench_model(scratch, args.random_vocab)
        )
        results = {}
        for method in METHODS:
            results[method] = best_of([run_method(method, model, args) for _ in range(args.repeats)])
            print(f"{method}: {results[method]}", file=sys.stderr)
    first = results[METHODS[0]]
    report = "\n".join([
        "## lctool eval vs a naive Hugging Face loop: "
        + (f"random Llama, vocab {args.random_vocab:,}" if args.random_vocab else "testbed"),
        "",
        f"Command: `.venv/bin/python bench/eval.py {' '.join(sys.argv[1:])}`",
        "",
        f"Model: {description}. Text: {args.text}, first {args.max_tokens} tokens: {first['windows']} windows × "
        f"{args.ctx} tokens ({first['input_tokens']:,} tokens), batch {args.batch_size}, float32, "
        f"{args.threads} thread(s), CPU; best of {args.repeats} fresh processes per method.",
        "",
        table(results),
        "",
        f"Machine load average (1 min) before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores, shared with other work: absolute figures are noisy, ratios less so.",
        "",
        "peak RSS = the process's high-water mark during evaluation (reset after loading), so it includes",
        "the loaded weights (none for layer by layer); eval extra = that peak minus the RSS just before",
        "evaluating. GPU speed is unmeasured (no GPU here).",
    ])  # fmt: skip
    print(report)
    if args.out:
        with open(args.out, "a" if args.append else "w") as f:
            f.write(("\n" if args.append else "") + report + "\n")


if __name__ == "__main__":
    main()
