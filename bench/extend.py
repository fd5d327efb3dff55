"""Context extension on the testbed: perplexity versus length and passkey retrieval for the original
model, every training-free RoPE scaling at factors 4 and 8, and E²-LLM and CLEX after the same short
training budget.

Every variant is written by `lctool extend` and measured by lctool's evaluation (the function behind
`lctool eval --lengths ... --passkey`, CLEX with trust_remote_code). E²-LLM is trained once (g_max =
8) and written as two stock artifacts, linear g = 4 and g = 8 (the second by re-labelling the same
weights); CLEX is trained once (t_max = 8) and picks t from each input's length.
Columns "r4"/"r8" are ppl(4·L0)/ppl(L0) and ppl(8·L0)/ppl(L0): the reference is each row's own L0.
Goals (from the CLEX paper, scaled to the testbed): r4 ≤ 1.10 for the trained methods, lower ppl
than every training-free row at 4·L0 and 8·L0, and passkey accuracy at 4·L0 ≥ at L0.

CPU only; timings are this machine's (2 shared cores); GPU speed is unmeasured.
Run: .venv/bin/python bench/extend.py [--preset quick] [--steps 300] [--batch-size 4] [--lr 3e-4]
     [--max-tokens 16384] [--trials 2] [--out bench/results/extend.md] [--variants original,dynamic,clex]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _testbed import add_testbed_argument, resolve_testbed, testbed_line  # noqa: E402  (bench/ is sys.path[0])

TRAINING_FREE = ("linear", "ntk", "dynamic", "yarn", "llama3", "longrope")
TRAINED = ("e2llm", "clex")
TARGET = 1.10


def build_variants(testbed: str, work: str, args) -> tuple[dict[str, str], dict[str, dict]]:
    """name -> checkpoint folder, and name -> training summary for the trained ones."""
    from lctool.ops.extend import ExtendOptions, TrainingOptions, extend

    wanted = set(args.variants.split(",")) if args.variants else {"original", *TRAINING_FREE, *TRAINED}
    variants = {"original": testbed} if "original" in wanted else {}
    for factor in (4, 8):
        for method in (m for m in TRAINING_FREE if m in wanted):
            variants[f"{method} ×{factor}"] = extend(
                testbed, os.path.join(work, f"{method}-{factor}"), ExtendOptions(method=method, factor=factor))
    training = TrainingOptions(corpus="wiki", steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               warmup_steps=min(20, args.steps), seed=args.seed)
    summaries = {}
    for method in (m for m in TRAINED if m in wanted):
        started = time.time()
        extra = {"clex_ode_lr_scale": args.clex_ode_lr_scale} if method == "clex" and args.clex_ode_lr_scale else {}
        out = extend(testbed, os.path.join(work, method),
                     ExtendOptions(method=method, factor=8, training=training, **extra))
        manifest = json.load(open(os.path.join(out, "lctool.json")))
        summaries[method] = {**manifest["results"]["training"], "bench_wall_s": round(time.time() - started, 1)}
        variants[f"{method} (trained)"] = out
    # E²-LLM's inference scale follows the target length: the same weights as stock linear g=4 and g=8.
    if "e2llm" in wanted:
        e2 = variants.pop("e2llm (trained)")
        variants["e2llm g=8"] = e2
        variants["e2llm g=4"] = extend(e2, os.path.join(work, "e2llm-4"), ExtendOptions(method="linear", factor=4),
                                       force=True)
    if "clex" in wanted:
        variants["clex"] = variants.pop("clex (trained)")
    return variants, summaries


def measure(path: str, lengths: list[int], args) -> dict:
    from lctool.eval import EvalOptions, evaluate

    options = EvalOptions(corpus="wiki:eval", lengths=lengths, passkey=True, passkey_trials=args.trials,
                          max_tokens=args.max_tokens, ctx=lengths[0], seed=args.seed, trust_remote_code=True,
                          layer_by_layer="never")
    started = time.time()
    results = evaluate(path, options)
    ppl = {row["length"]: row["ppl"] for row in results["ppl_vs_length"]}
    passkey = {row["length"]: row["accuracy"] for row in results["passkey"]["by_length"]}
    return {"ppl": ppl, "passkey": passkey, "eval_s": round(time.time() - started, 1)}


def plot(rows: dict[str, dict], lengths: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5), dpi=120)
    for name, row in rows.items():
        style = "-" if name == "original" or "×" not in name else ":"
        width = 2.5 if name.startswith(("clex", "e2llm", "original")) else 1.2
        axes.plot(lengths, [row["ppl"][n] for n in lengths], style, marker="o", linewidth=width, label=name)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xticks(lengths, [str(n) for n in lengths])
    axes.set_xlabel(f"context length (tokens); L0 = {lengths[0]}")
    axes.set_ylabel("perplexity (wiki eval)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def goals(rows: dict[str, dict], lengths: list[int]) -> list[str]:
    l0, l4, l8 = lengths[0], 4 * lengths[0], 8 * lengths[0]
    free = {k: v for k, v in rows.items() if "×" in k}
    if not free:
        return ["- (no training-free rows in this run: goals not evaluated)"]
    best4 = min(free.items(), key=lambda kv: kv[1]["ppl"][l4])
    best8 = min(free.items(), key=lambda kv: kv[1]["ppl"][l8])
    lines = []
    for name in (n for n in ("e2llm g=4", "e2llm g=8", "clex") if n in rows):
        row = rows[name]
        ratio = row["ppl"][l4] / row["ppl"][l0]
        lines.append(
            f"- **{name}**: ppl(4·L0)/ppl(L0) = {ratio:.3f} (goal ≤ {TARGET}: "
            f"{'met' if ratio <= TARGET else f'missed by {ratio - TARGET:.3f}'}); "
            f"ppl at 4·L0 {row['ppl'][l4]:.2f} vs best training-free {best4[0]} {best4[1]['ppl'][l4]:.2f} "
            f"({'beats' if row['ppl'][l4] < best4[1]['ppl'][l4] else 'does not beat'} it, ×{row['ppl'][l4] / best4[1]['ppl'][l4]:.3f}); "
            f"at 8·L0 {row['ppl'][l8]:.2f} vs {best8[0]} {best8[1]['ppl'][l8]:.2f} "
            f"({'beats' if row['ppl'][l8] < best8[1]['ppl'][l8] else 'does not beat'} it, ×{row['ppl'][l8] / best8[1]['ppl'][l8]:.3f}); "
            f"passkey {row['passkey'][l0]:.2f} at L0, {row['passkey'][l4]:.2f} at 4·L0 "
            f"({'met' if row['passkey'][l4] >= row['passkey'][l0] else 'missed'})."
        )
    return lines


def table(rows: dict[str, dict], lengths: list[int]) -> list[str]:
    l0 = lengths[0]
    head = "| variant | " + " | ".join(f"ppl@{n}" for n in lengths) + " | r4 | r8 | " + \
        " | ".join(f"passkey@{n}" for n in lengths) + " | eval s |"
    lines = [head, "|" + "---|" * (2 * len(lengths) + 4)]
    for name, row in rows.items():
        ppl = row["ppl"]
        cells = [f"{ppl[n]:.2f}" for n in lengths]
        ratios = [f"{ppl[4 * l0] / ppl[l0]:.3f}", f"{ppl[8 * l0] / ppl[l0]:.3f}"]
        keys = [f"{row['passkey'][n]:.2f}" for n in lengths]
        lines.append(f"| {name} | " + " | ".join(cells + ratios + keys) + f" | {row['eval_s']} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_testbed_argument(parser)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--clex-ode-lr-scale", type=float, default=None,
                        help="CLEX: the ODE's lr as a fraction of --lr (default: lctool's)")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/extend.md")
    parser.add_argument("--variants", default="",
                        help="comma list of original, training-free methods, e2llm, clex (default: all)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(2)
    testbed, preset = resolve_testbed(args.testbed)
    l0 = json.load(open(os.path.join(testbed, "config.json")))["max_position_embeddings"]
    lengths = [l0, 2 * l0, 4 * l0, 8 * l0]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-extend-") as work:
        variants, summaries = build_variants(testbed, work, args)
        rows = {}
        for name, path in variants.items():
            rows[name] = measure(path, lengths, args)
            print(f"{name:18s} " + " ".join(f"{rows[name]['ppl'][n]:9.2f}" for n in lengths)
                  + "  passkey " + " ".join(f"{rows[name]['passkey'][n]:.2f}" for n in lengths), flush=True)
    png = os.path.splitext(args.out)[0] + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot(rows, lengths, png)
    command = "CUDA_VISIBLE_DEVICES= .venv/bin/python bench/extend.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v != "")
    train_lines = [
        f"- **{m}**: {s['steps']} steps × {args.batch_size} sequences × {l0} tokens ({s['tokens']:,} tokens), "
        f"lr {args.lr}, loss {s['first_loss']} → {s['final_loss']}, {s['cpu_minutes']} CPU-minutes "
        f"({s['wall_s']} s wall in the loop), sampled {'scales' if m == 'e2llm' else 't'}: "
        f"{s.get('sampled_scales') or s.get('sampled_times')}"
        for m, s in summaries.items()
    ]
    text = "\n".join([
        "# Context extension (`lctool extend`) on the testbed",
        "",
        f"Command: `{command}`  ",
        f"{testbed_line(preset, testbed)} L0 = {l0}. Text: wiki eval split, first {args.max_tokens} "
        f"tokens, non-overlapping windows of each length; passkey: {args.trials} keys × 5 depths per length. "
        f"Total wall time {time.time() - started:.0f} s on 2 shared CPU cores (GPU speed unmeasured).",
        "",
        "Training budget (equal for both):" if len(summaries) > 1 else "Training budget:",
        *train_lines,
        "",
        *table(rows, lengths),
        "",
        f"![ppl vs length]({os.path.basename(png)})",
        "",
        "## Goals",
        "",
        *goals(rows, lengths),
        "",
    ])
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
