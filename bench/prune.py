"""LLM-Pruner on the testbed: quality (ppl, bpb, KL to dense) and decode speed, per importance and ratio.

For each ratio (default 20% and 50% of all parameters) and each importance (random, l2, taylor-vector,
taylor-element, second-order) the testbed is pruned with per-layer ranking over every layer (a uniform,
stock-loadable result), evaluated, then pruned again with the same recovery budget (LoRA on every
linear role, merged) and evaluated again. Every recovered row gets the same steps, lr, data and seed.

Eval: wiki eval split, windows of --ctx tokens, the first --max-tokens tokens; KL(dense || pruned)
in nats per token on the same windows. Decode: greedy generation of --decode-tokens new tokens after
a 32-token prompt, batch 1, KV cache, best of --repeats, one thread; the ratio is tokens/s against
the dense model measured in the same process. CPU only: GPU speed is unmeasured.

Run: .venv/bin/python bench/prune.py [--model DIR] [--ratios 0.2,0.5] [--recover-steps 100]
     [--out bench/results/prune.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

IMPORTANCES = ("random", "l2", "taylor-vector", "taylor-element", "second-order")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint (default: the quick testbed, which must be built)")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--importances", default=",".join(IMPORTANCES))
    parser.add_argument("--recover-steps", type=int, default=100)
    parser.add_argument("--recover-lr", type=float, default=1e-3)
    parser.add_argument("--recover-rank", type=int, default=8)
    parser.add_argument("--recover-batch-size", type=int, default=8)
    parser.add_argument("--recover-len", type=int, default=256)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="scratch folder (default: a temp folder)")
    parser.add_argument("--out", help="also write the results as markdown here")
    return parser.parse_args(argv)


def evaluate(path: str, dense, tokenizer, text: str, args) -> dict:
    from lctool.eval import kl_divergence, load_for_eval, perplexity

    model, _ = load_for_eval(path, trust_remote_code=True)
    scores = perplexity(model, tokenizer, text, ctx=args.ctx, max_tokens=args.max_tokens)
    kl = 0.0 if dense is None else kl_divergence(model, dense, tokenizer, text, ctx=args.ctx, max_tokens=args.max_tokens)
    return {"ppl": scores["ppl"], "bpb": scores["bpb"], "kl": kl, "model": model}


def decode_seconds(model, prompt: torch.Tensor, new_tokens: int) -> float:
    with torch.no_grad():
        began = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return time.perf_counter() - began


def measure_decode(dense, pruned: dict, prompt: torch.Tensor, args) -> tuple[float, dict]:
    """Tokens/s of the dense model and of one pruned model per ratio (all importances share its shapes),
    measured in turns so that load from other jobs on the machine hits them alike; best of --repeats."""
    models = {"dense": dense, **pruned}
    best = dict.fromkeys(models, float("inf"))
    for _ in range(args.repeats):
        for key, model in models.items():
            best[key] = min(best[key], decode_seconds(model, prompt, args.decode_tokens))
    rates = {key: args.decode_tokens / seconds for key, seconds in best.items()}
    return rates.pop("dense"), rates


def run_row(base: str, out: str, ratio: float, importance: str, recover: bool, args) -> dict:
    from lctool.prune import LlmPrunerOptions, prune

    recovery = {}
    if recover:
        recovery = {"steps": args.recover_steps, "lr": args.recover_lr, "rank": args.recover_rank,
                    "batch_size": args.recover_batch_size, "seq_len": args.recover_len, "seed": args.seed}
    options = LlmPrunerOptions(ratio=ratio, importance=importance, seed=args.seed, recovery=recovery)
    began = time.perf_counter()
    summary = prune(base, out, options, force=True)
    summary["prune_s"] = time.perf_counter() - began
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from lctool.data import corpus_text
    from lctool.io.hf import load_tokenizer
    from lctool.ops.testbed import testbed_path

    started = time.time()
    base = args.model or testbed_path("quick", build=False)
    if base is None:
        print("the testbed is not built: run `lctool testbed build` first (or pass --model)", file=sys.stderr)
        return 2
    work = args.work or tempfile.mkdtemp(prefix="lctool-bench-prune-")
    os.makedirs(work, exist_ok=True)
    tokenizer = load_tokenizer(base)
    text = corpus_text("wiki", "eval")
    prompt = torch.tensor([tokenizer(text[:2000])["input_ids"][:32]])
    dense = evaluate(base, None, tokenizer, text, args)
    dense_model = dense.pop("model")
    rows, decode_models = [], {}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for importance in args.importances.split(","):
            row = {"ratio": ratio, "importance": importance}
            for recover in (False, True):
                out = os.path.join(work, f"{importance}-{ratio}-{'rec' if recover else 'plain'}")
                summary = run_row(base, out, ratio, importance, recover, args)
                result = evaluate(out, dense_model, tokenizer, text, args)
                model = result.pop("model")
                key = "after" if recover else "before"
                row[key] = {**result, "removed": summary["removed_fraction"], "prune_s": summary["prune_s"],
                            "layers": summary["layers"][0], "recovery": summary.get("recovery")}
                if recover and importance == "taylor-vector":
                    decode_models[ratio] = model
                print(f"{ratio:.0%} {importance:15s} {key:6s} ppl {result['ppl']:9.2f} bpb {result['bpb']:.4f} "
                      f"KL {result['kl']:.4f} ({summary['prune_s']:.1f} s)", file=sys.stderr, flush=True)
            rows.append(row)
    dense["decode"], decode = measure_decode(dense_model, decode_models, prompt, args)
    for row in rows:
        row["after"]["decode"] = decode.get(row["ratio"])
    text_table = table(dense, rows)
    print(text_table)
    if args.out:
        write_markdown(args, argv, base, dense, rows, text_table, time.time() - started)
    return 0


def table(dense: dict, rows: list[dict]) -> str:
    lines = [
        "| removed | importance | heads / kv / intermediate | ppl before | × dense | bpb before | KL before "
        "| ppl after | × dense | bpb after | KL after | decode tok/s | × dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| 0% (dense) | – | – | {dense['ppl']:.2f} | 1.00 | {dense['bpb']:.4f} | 0 | {dense['ppl']:.2f} | 1.00 "
        f"| {dense['bpb']:.4f} | 0 | {dense['decode']:.0f} | 1.00 |",
    ]
    for row in rows:
        b, a = row["before"], row["after"]
        sizes = b["layers"]
        lines.append(
            f"| {b['removed']:.1%} | {row['importance']} | {sizes['heads']} / {sizes['kv_heads']} / "
            f"{sizes['intermediate_size']} | {b['ppl']:.2f} | {b['ppl'] / dense['ppl']:.2f} | {b['bpb']:.4f} "
            f"| {b['kl']:.4f} | {a['ppl']:.2f} | {a['ppl'] / dense['ppl']:.2f} | {a['bpb']:.4f} | {a['kl']:.4f} "
            + (f"| {a['decode']:.0f} | {a['decode'] / dense['decode']:.2f} |" if a.get("decode") else "| – | – |")
        )
    return "\n".join(lines)


def write_markdown(args, argv, base: str, dense: dict, rows: list[dict], text_table: str, wall: float) -> None:
    command = "python bench/prune.py " + " ".join(argv if argv is not None else sys.argv[1:])
    recovery = next((r["after"]["recovery"] for r in rows if r["after"]["recovery"]), {})
    lines = [
        "# prune --method llm-pruner: the testbed at 20% and 50% of its parameters removed",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {args.threads} CPU thread(s), torch {torch.__version__}, shared with other "
        f"jobs; whole run {wall / 60:.1f} min. CPU only: GPU speed is unmeasured.",
        "",
        f"Model: `{base}`. Pruning: per-layer ranking over every layer (uniform, stock-loadable output), "
        "query heads pruned within KV groups, gradients from 10 calibration windows of 128 tokens (wiki calib). "
        f"Recovery (the `after` columns): LoRA r={args.recover_rank} on every linear role, {args.recover_steps} "
        f"steps × {args.recover_batch_size} windows of {args.recover_len} tokens of wiki train, lr "
        f"{args.recover_lr}, merged; the same budget and seed for every row "
        f"(one run: {recovery.get('wall_s', '?')} s). Eval: wiki eval split, windows of {args.ctx} tokens, "
        f"first {args.max_tokens:,} tokens; KL(dense ‖ pruned) in nats/token on the same windows. Decode: greedy, "
        f"batch 1, {args.decode_tokens} new tokens after a 32-token prompt, best of {args.repeats} runs taken in turns "
        "with the dense model; one model per ratio (the recovered taylor-vector one: every importance gives the "
        "same shapes at a ratio).",
        "",
        text_table,
        "",
    ]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
