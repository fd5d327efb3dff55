"""LLM-Pruner on the testbed: quality (ppl, bpb, KL to dense) and decode speed, per importance and ratio.

For each ratio (default 20% and 50% of all parameters) and each importance (random, l2, taylor-vector,
taylor-element, second-order) the testbed is pruned with --ranking (per-layer) over lctool's default layer
range (every layer but the first and the last, as the paper keeps them dense) or --layers, evaluated,
then pruned again with the same recovery budget (LoRA on every linear role, merged) and evaluated
again. Every recovered row gets the same steps, lr, data and seed; --recover-steps 0 skips recovery.
A ratio that the layer range cannot reach (a 4-layer testbed's 2 middle layers hold 37% of its
parameters) is pruned over every layer instead; the table's `layers` column says which were pruned.
Random importance is drawn with --random-seeds seeds per row: one draw alone is luck (at 50% of the
quick testbed, seeds 0-3 gave ppl 620 to 1393).

Eval: wiki eval split, windows of --ctx tokens, the first --max-tokens tokens; KL(dense || pruned)
in nats per token on the same windows. Decode: greedy generation of --decode-tokens new tokens after
a 32-token prompt, batch 1, KV cache, best of --repeats, one thread; the ratio is tokens/s against
the dense model measured in the same process. CPU only: GPU speed is unmeasured.

Run: .venv/bin/python bench/prune.py [--model DIR] [--ratios 0.2,0.5] [--recover-steps 100]
     [--layers 1-2|all] [--ranking per-layer|global] [--random-seeds 3] [--calib-n 10]
     [--out bench/results/prune.md]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
from _testbed import add_testbed_argument, resolve_testbed, testbed_line  # noqa: E402  (bench/ is sys.path[0])

# Then bench/ out of the path: bench/aqlm.py would shadow the aqlm package that peft probes for.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402

IMPORTANCES = ("random", "l2", "taylor-vector", "taylor-element", "second-order")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint (default: the --testbed preset)")
    add_testbed_argument(parser)
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--importances", default=",".join(IMPORTANCES))
    parser.add_argument("--layers", help="layer range to prune, e.g. 1-2 or all (default: lctool's, see above)")
    parser.add_argument("--ranking", default="per-layer", choices=("per-layer", "global"))
    parser.add_argument("--random-seeds", type=int, default=3, help="random importance: draws averaged per row")
    parser.add_argument("--calib-n", type=int, default=10, help="calibration windows for the gradients")
    parser.add_argument("--calib-len", type=int, default=128, help="tokens per calibration window")
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


def layers_for(base: str, ratio: float, args) -> str | None:
    """--layers, else lctool's default range when it can reach `ratio`, else every layer."""
    from lctool.errors import LctoolError
    from lctool.io import Checkpoint
    from lctool.prune import LlmPrunerOptions
    from lctool.prune.llm_pruner import check_feasible
    from lctool.prune.options import selected_layers

    if args.layers:
        return args.layers
    arch = Checkpoint(base).arch
    options = LlmPrunerOptions(ratio=ratio, ranking=args.ranking)
    try:
        check_feasible(arch, options, selected_layers(options, arch.num_layers))
    except LctoolError:
        return "all"
    return None


def run_row(base: str, out: str, ratio: float, importance: str, layers: str | None, recover: bool, seed: int,
            args) -> dict:
    from lctool.prune import LlmPrunerOptions, prune

    recovery = {}
    if recover:
        recovery = {"steps": args.recover_steps, "lr": args.recover_lr, "rank": args.recover_rank,
                    "batch_size": args.recover_batch_size, "seq_len": args.recover_len, "seed": args.seed}
    options = LlmPrunerOptions(ratio=ratio, importance=importance, layers=layers, ranking=args.ranking,
                               calib_n=args.calib_n, calib_len=args.calib_len, seed=seed, recovery=recovery)
    began = time.perf_counter()
    summary = prune(base, out, options, force=True)
    summary["prune_s"] = time.perf_counter() - began
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from lctool.data import corpus_text
    from lctool.io.hf import load_tokenizer

    started = time.time()
    if args.model:
        base, preset = args.model, None
    else:
        base, preset = resolve_testbed(args.testbed, log=lambda message: print(message, file=sys.stderr))
    work = args.work or tempfile.mkdtemp(prefix="lctool-bench-prune-")
    os.makedirs(work, exist_ok=True)
    tokenizer = load_tokenizer(base)
    text = corpus_text("wiki", "eval")
    prompt = torch.tensor([tokenizer(text[:2000])["input_ids"][:32]])
    dense = evaluate(base, None, tokenizer, text, args)
    dense_model = dense.pop("model")
    rows, decode_models = [], {}
    recover_modes = (False, True) if args.recover_steps > 0 else (False,)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        layers = layers_for(base, ratio, args)
        for importance in args.importances.split(","):
            row = {"ratio": ratio, "importance": importance}
            # Random importance is one draw per seed; several draws show how much luck one draw holds.
            seeds = range(args.seed, args.seed + (args.random_seeds if importance == "random" else 1))
            for recover in recover_modes:
                key = "after" if recover else "before"
                draws = []
                for seed in seeds:
                    out = os.path.join(work, f"{importance}-{ratio}-{seed}-{'rec' if recover else 'plain'}")
                    summary = run_row(base, out, ratio, importance, layers, recover, seed, args)
                    result = evaluate(out, dense_model, tokenizer, text, args)
                    model = result.pop("model")
                    draws.append({**result, "summary": summary})
                    if importance == "taylor-element" and (recover or len(recover_modes) == 1):
                        decode_models[ratio] = model
                    print(f"{ratio:.0%} {importance:15s} seed {seed} {key:6s} ppl {result['ppl']:9.2f} bpb "
                          f"{result['bpb']:.4f} KL {result['kl']:.4f} ({summary['prune_s']:.1f} s)",
                          file=sys.stderr, flush=True)
                row[key] = combine(draws)
            rows.append(row)
    dense["decode"], decode = measure_decode(dense_model, decode_models, prompt, args)
    for row in rows:
        row.get("after", row["before"])["decode"] = decode.get(row["ratio"])
    text_table = table(dense, rows)
    print(text_table)
    if args.out:
        write_markdown(args, argv, base, preset, dense, rows, text_table, time.time() - started)
    return 0


def combine(draws: list[dict]) -> dict:
    """One table cell from one or more pruning draws: mean bpb and KL, ppl as exp(mean log ppl); sizes are
    the first draw's (with global ranking, random draws differ in shape)."""
    summary = draws[0]["summary"]
    pruned = [p for p in summary["layers"] if p["pruned"]]
    sizes = [f"{p['heads']} / {p['kv_heads']} / {p['intermediate_size']}" for p in pruned]
    ppls = [d["ppl"] for d in draws]
    return {
        "ppl": math.exp(sum(math.log(p) for p in ppls) / len(ppls)),
        "ppl_range": (min(ppls), max(ppls)) if len(ppls) > 1 else None,
        "draws": len(draws),
        "bpb": sum(d["bpb"] for d in draws) / len(draws),
        "kl": sum(d["kl"] for d in draws) / len(draws),
        "removed": summary["removed_fraction"],
        "sizes": sizes[0] if len(set(sizes)) == 1 else " · ".join(sizes),
        "pruned_layers": f"{pruned[0]['layer']}-{pruned[-1]['layer']}",
        "recovery": summary.get("recovery"),
    }


def table(dense: dict, rows: list[dict]) -> str:
    recovered = all("after" in row for row in rows)
    after_head = "| ppl after | × dense | bpb after | KL after " if recovered else ""
    lines = [
        "| removed | importance | layers | heads / kv / intermediate | ppl before | × dense | bpb before | KL before "
        + after_head + "| decode tok/s | × dense |",
        "|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if recovered else "") + "---|---|",
        f"| 0% (dense) | – | – | – | {dense['ppl']:.2f} | 1.00 | {dense['bpb']:.4f} | 0 "
        + (f"| {dense['ppl']:.2f} | 1.00 | {dense['bpb']:.4f} | 0 " if recovered else "")
        + f"| {dense['decode']:.0f} | 1.00 |",
    ]
    for row in rows:
        b = row["before"]
        last = row["after"] if recovered else b
        line = (f"| {b['removed']:.1%} | {row['importance']}{draw_note(b)} | {b['pruned_layers']} | {b['sizes']} "
                f"| {b['ppl']:.2f}{ppl_range(b)} | {b['ppl'] / dense['ppl']:.2f} | {b['bpb']:.4f} | {b['kl']:.4f} ")
        if recovered:
            a = row["after"]
            line += (f"| {a['ppl']:.2f}{ppl_range(a)} | {a['ppl'] / dense['ppl']:.2f} | {a['bpb']:.4f} "
                     f"| {a['kl']:.4f} ")
        decode = last.get("decode")
        line += f"| {decode:.0f} | {decode / dense['decode']:.2f} |" if decode else "| – | – |"
        lines.append(line)
    return "\n".join(lines)


def draw_note(cell: dict) -> str:
    return f" ({cell['draws']} seeds)" if cell.get("draws", 1) > 1 else ""


def ppl_range(cell: dict) -> str:
    low_high = cell.get("ppl_range")
    return f" ({low_high[0]:.0f}–{low_high[1]:.0f})" if low_high else ""


def write_markdown(args, argv, base: str, preset: str | None, dense: dict, rows: list[dict], text_table: str,
                   wall: float) -> None:
    command = "python bench/prune.py " + " ".join(argv if argv is not None else sys.argv[1:])
    recovery = next((r["after"]["recovery"] for r in rows if r.get("after", {}).get("recovery")), {})
    lines = [
        "# prune --method llm-pruner: the testbed at 20% and 50% of its parameters removed",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {args.threads} CPU thread(s), torch {torch.__version__}, shared with other "
        f"jobs; whole run {wall / 60:.1f} min. CPU only: GPU speed is unmeasured.",
        "",
        (testbed_line(preset, base) if preset else f"Model: `{base}`.")
        + f" Pruning: {args.ranking} ranking over the layers in the `layers` column (lctool's "
        "default: all but the first and the last; every layer where that range cannot reach the ratio), sizes "
        "(heads / kv heads / MLP channels) of each pruned layer, query heads pruned within KV groups, gradients "
        f"from {args.calib_n} calibration windows of {args.calib_len} tokens (wiki calib). Random importance: "
        f"{args.random_seeds} seeds per row, ppl as exp(mean log ppl) with the range of the draws, bpb and KL "
        "averaged. "
        f"Recovery (the `after` columns): LoRA r={args.recover_rank} on every linear role, {args.recover_steps} "
        f"steps × {args.recover_batch_size} windows of {args.recover_len} tokens of wiki train, lr "
        f"{args.recover_lr}, merged; the same budget and seed for every row "
        f"(one run: {recovery.get('wall_s', '?')} s). Eval: wiki eval split, windows of {args.ctx} tokens, "
        f"first {args.max_tokens:,} tokens; KL(dense ‖ pruned) in nats/token on the same windows. Decode: greedy, "
        f"batch 1, {args.decode_tokens} new tokens after a 32-token prompt, best of {args.repeats} runs taken in turns "
        "with the dense model; one model per ratio, the taylor-element one (recovered when recovery runs); with "
        "per-layer ranking every importance gives the same shapes at a ratio.",
        "",
        text_table,
        "",
    ]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
