"""EvoPress on the testbed: searched per-layer levels against uniform and heuristic allocations.

Rows (each against its baselines, all in the same run, evaluated the same way):
- blocks: drop round(25% of the layers) (quick testbed: 1 of 4; bench: 1 of 5, i.e. 20%) —
  EvoPress over attention/MLP sub-blocks (as many attention as MLP blocks as the whole-layer
  baselines drop), EvoPress over whole layers, uniform spacing (layers int((i + 1/2)·L/k)), and
  ShortGPT's block influence (drop the k layers whose output is most similar to their input:
  BI = 1 − mean cosine(input, output) on the calibration windows).
- sparsity 50% and 70% average: EvoPress over the SparseGPT level database vs uniform SparseGPT
  (every linear at the target, from the same database).
- bits: 3-bit average from {2, 3, 4}: EvoPress over the GPTQ level database vs uniform 3-bit from the
  same database, and `lctool quantize --method gptq --bits 3` (sequential GPTQ, the usual recipe).

The level databases compute every level from the dense model's activations (see
lctool/prune/evopress/database.py); the uniform rows from the database are exactly the search's start.
Eval: wiki eval split, windows of --ctx tokens, first --max-tokens tokens: perplexity, bits-per-byte,
KL(dense ‖ compressed) in nats per token (lctool.eval). Search wall time and evaluated candidates are
the search's own counts. Search fitness is KL on wiki *calib* windows, never the eval text.

Run: .venv/bin/python bench/evopress.py [--testbed quick|bench] [--generations 50] [--rows blocks,sparsity,bits]
     [--out bench/results/evopress.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _testbed import add_testbed_argument, resolve_testbed  # noqa: E402  (bench/ is sys.path[0])

import torch  # noqa: E402

ROWS = ("blocks", "sparsity", "bits")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_testbed_argument(parser)
    parser.add_argument("--model", help="checkpoint (default: the --testbed model, which must be built)")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--block-fraction", type=float, default=0.25)
    parser.add_argument("--sparsities", default="0.5,0.7")
    parser.add_argument("--bits-choices", default="2,3,4")
    parser.add_argument("--target-bits", type=float, default=3)
    parser.add_argument("--group-size", type=int, default=32, help="GPTQ group (32 divides both testbeds' sizes)")
    parser.add_argument("--generations", type=int, default=50)
    parser.add_argument("--offspring", type=int, default=16)
    parser.add_argument("--selection-tokens", default="1024,4096,16384")
    parser.add_argument("--survivors", default="4,2,1")
    parser.add_argument("--calib-n", type=int, default=64)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="scratch folder (default: a temp folder); databases are reused from it")
    parser.add_argument("--out", help="also write the results as markdown here")
    return parser.parse_args(argv)


class Evaluator:
    """ppl / bpb / KL of a checkpoint on the eval text, against the dense model held once."""

    def __init__(self, base: str, args):
        from lctool.data import corpus_text
        from lctool.eval import load_for_eval

        self.args = args
        self.text = corpus_text("wiki", "eval")
        self.dense, self.tokenizer = load_for_eval(base)
        self.base = self.score(self.dense, reference=False)

    def score(self, model, reference: bool = True) -> dict:
        from lctool.eval import kl_divergence, perplexity

        result = perplexity(model, self.tokenizer, self.text, ctx=self.args.ctx, max_tokens=self.args.max_tokens)
        kl = kl_divergence(model, self.dense, self.tokenizer, self.text, ctx=self.args.ctx,
                           max_tokens=self.args.max_tokens) if reference else 0.0
        return {"ppl": result["ppl"], "bpb": result["bpb"], "kl": kl}

    def __call__(self, path: str) -> dict:
        from lctool.eval import load_for_eval

        model, _ = load_for_eval(path, trust_remote_code=True)
        return self.score(model)


def search_options(args, **extra) -> dict:
    return dict(generations=args.generations, offspring=args.offspring, selection_tokens=args.selection_tokens,
                survivors=args.survivors, calib="wiki", calib_n=args.calib_n, calib_len=args.calib_len,
                seed=args.seed, **extra)


def _searched(summary: dict) -> dict:
    return {"search_s": summary["search_s"], "evaluated": summary["evaluated"], "kl_calib": summary["kl_final"]}


# ---- blocks ---------------------------------------------------------------------------------------


def block_influence(base: str, args) -> list[float]:
    """ShortGPT's BI of each layer: 1 − mean cosine similarity of its input and output hidden states."""
    from lctool.io import Checkpoint
    from lctool.prune.evopress.options import SearchOptions
    from lctool.prune.evopress.run import calibration_windows
    from lctool.quant.engine import LayerStream

    checkpoint = Checkpoint(base)
    windows = calibration_windows(checkpoint, SearchOptions(calib="wiki", calib_n=args.calib_n,
                                                            calib_len=args.calib_len, seed=args.seed))
    stream = LayerStream(checkpoint, windows)
    scores = []
    for index in range(checkpoint.arch.num_layers):
        layer = stream.load_layer(index)
        before = stream.hidden
        stream.advance(layer)
        cosine = torch.nn.functional.cosine_similarity(before, stream.hidden, dim=-1)
        scores.append(float(1 - cosine.mean()))
    return scores


def write_dropped_layers(base: str, out: str, layers: list[int]) -> None:
    from lctool.io import Checkpoint, CheckpointWriter
    from lctool.prune.evopress import output

    checkpoint = Checkpoint(base)
    with CheckpointWriter(out, operation="prune", inputs=[checkpoint], force=True,
                          parameters={"method": "bench baseline", "dropped_layers": layers}) as writer:
        output.write_blocks(checkpoint, writer, {"attn": layers, "mlp": layers})


def blocks_rows(base: str, work: str, evaluate: Evaluator, args, log) -> list[dict]:
    from lctool.io import Checkpoint
    from lctool.prune.evopress import EvoPressPruneOptions, run_evopress_prune

    layers = Checkpoint(base).arch.num_layers
    count = max(1, round(args.block_fraction * layers))
    label = f"blocks: drop {count} of {layers} layers ({count / layers:.0%})"
    rows = []
    for unit in ("sublayer", "layer"):
        out = os.path.join(work, f"blocks-evopress-{unit}")
        options = EvoPressPruneOptions(space="blocks", target=count, block_unit=unit,
                                       state=os.path.join(work, f"blocks-{unit}-state.json"), **search_options(args))
        summary = run_evopress_prune(base, out, options, force=True, log=log)
        partial = summary["sublayers_removed"]
        chosen = (f"layers {summary['layers_removed']}" if unit == "layer" else
                  f"whole {summary['layers_removed']}, attn {partial['attn']}, mlp {partial['mlp']} (renumbered)")
        rows.append({"row": label, "method": f"EvoPress ({unit})", "config": chosen, **evaluate(out),
                     **_searched(summary), "evopress": True})
    uniform = sorted({int((i + 0.5) * layers / count) for i in range(count)})
    influence = block_influence(base, args)
    shortgpt = sorted(sorted(range(layers), key=lambda i: influence[i])[:count])
    for name, chosen in (("uniform spacing", uniform), ("ShortGPT block influence", shortgpt)):
        out = os.path.join(work, f"blocks-{name.split()[0].lower()}")
        write_dropped_layers(base, out, chosen)
        note = f"layers {chosen}" + (f" (BI {', '.join(f'{b:.3f}' for b in influence)})" if "Short" in name else "")
        rows.append({"row": label, "method": name, "config": note, **evaluate(out)})
    return rows


# ---- sparsity and bits ---------------------------------------------------------------------------------


def _levels_note(summary: dict) -> str:
    values = sorted(summary["levels"].values())
    return f"min {values[0]:g}, max {values[-1]:g}, average {summary['average_level']:g}"


def sparsity_rows(base: str, work: str, evaluate: Evaluator, args, log) -> list[dict]:
    from lctool.prune.evopress import EvoPressPruneOptions, run_evopress_prune

    rows = []
    database = os.path.join(work, "db-sparsegpt")
    for target in [float(t) for t in args.sparsities.split(",")]:
        label = f"sparsity {target:.0%} average"
        for name, generations in (("EvoPress", args.generations), ("uniform SparseGPT", 0)):
            out = os.path.join(work, f"sparsity-{target}-{generations}")
            extra = search_options(args) if generations else {**search_options(args), "generations": 0,
                                                              "initial_candidates": 1}
            options = EvoPressPruneOptions(space="sparsity", target=target, database=database,
                                           state=os.path.join(work, f"sparsity-{target}-{generations}-state.json"),
                                           **extra)
            summary = run_evopress_prune(base, out, options, force=True, log=log)
            row = {"row": label, "method": name, "config": _levels_note(summary), **evaluate(out)}
            if generations:
                row.update(_searched(summary), evopress=True)
            rows.append(row)
    return rows


def bits_rows(base: str, work: str, evaluate: Evaluator, args, log) -> list[dict]:
    from lctool.prune.evopress import EvoPressQuantOptions, run_evopress_quantize
    from lctool.quant import QuantizeOptions, quantize

    label = f"bits: {args.target_bits:g}-bit average from {{{args.bits_choices}}}"
    rows = []
    database = os.path.join(work, "db-gptq")
    for name, generations in (("EvoPress", args.generations), (f"uniform {args.target_bits:g}-bit (database)", 0)):
        out = os.path.join(work, f"bits-{generations}")
        extra = search_options(args) if generations else {**search_options(args), "generations": 0,
                                                          "initial_candidates": 1}
        options = EvoPressQuantOptions(bits_choices=args.bits_choices, target_bits=args.target_bits,
                                       group_size=args.group_size, database=database,
                                       state=os.path.join(work, f"bits-{generations}-state.json"), **extra)
        summary = run_evopress_quantize(base, out, options, force=True, log=log)
        row = {"row": label, "method": name, "config": _levels_note(summary) + f", {summary['bits_per_param_stored']:.3f} "
               "stored bits/param", **evaluate(out)}
        if generations:
            row.update(_searched(summary), evopress=True)
        rows.append(row)
    if float(args.target_bits).is_integer():
        out = os.path.join(work, "bits-gptq-uniform")
        summary = quantize(base, out, QuantizeOptions(method="gptq", bits=int(args.target_bits),
                                                      group_size=args.group_size, calib="wiki", calib_n=args.calib_n,
                                                      calib_len=args.calib_len, seed=args.seed), force=True)
        rows.append({"row": label, "method": f"GPTQ {int(args.target_bits)}-bit (sequential)",
                     "config": f"{summary['bits_per_param_stored']:.3f} stored bits/param", **evaluate(out)})
    return rows


# ---- report ---------------------------------------------------------------------------------------------


def table(dense: dict, rows: list[dict]) -> str:
    lines = ["| row | method | configuration | ppl | × dense | bpb | KL | best? | search s | evaluated |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| dense | – | – | {dense['ppl']:.2f} | 1.00 | {dense['bpb']:.4f} | 0 | | | |"]
    for row in rows:
        group = [r for r in rows if r["row"] == row["row"]]
        best = min(r["kl"] for r in group)
        search = f"{row['search_s']:.0f}" if "search_s" in row else ""
        evaluated = str(row["evaluated"]) if "evaluated" in row else ""
        lines.append(f"| {row['row']} | {row['method']} | {row['config']} | {row['ppl']:.2f} | "
                     f"{row['ppl'] / dense['ppl']:.2f} | {row['bpb']:.4f} | {row['kl']:.4f} | "
                     f"{'lowest KL' if row['kl'] == best else ''} | {search} | {evaluated} |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for label in dict.fromkeys(r["row"] for r in rows):
        group = [r for r in rows if r["row"] == label]
        evo = [r for r in group if r.get("evopress")]
        others = [r for r in group if not r.get("evopress")]
        best_evo = min(evo, key=lambda r: r["kl"])
        best_other = min(others, key=lambda r: r["kl"])
        if best_evo["kl"] < best_other["kl"] and best_evo["ppl"] < best_other["ppl"]:
            verdict = "best"
        elif best_evo["kl"] == best_other["kl"] and best_evo["ppl"] == best_other["ppl"]:
            verdict = "tied (the same configuration)"
        else:
            verdict = "NOT best"
        out.append(f"- {label}: EvoPress {verdict} — {best_evo['method']} KL "
                   f"{best_evo['kl']:.4f} / ppl {best_evo['ppl']:.2f} vs {best_other['method']} KL "
                   f"{best_other['kl']:.4f} / ppl {best_other['ppl']:.2f}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    if args.model:
        base = args.model
    else:
        base, args.testbed = resolve_testbed(args.testbed, log=lambda m: print(m, file=sys.stderr))
    work = args.work or tempfile.mkdtemp(prefix="lctool-bench-evopress-")
    os.makedirs(work, exist_ok=True)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    evaluate = Evaluator(base, args)
    rows = []
    wanted = args.rows.split(",")
    for name, make in (("blocks", blocks_rows), ("sparsity", sparsity_rows), ("bits", bits_rows)):
        if name in wanted:
            for row in make(base, work, evaluate, args, log):
                rows.append(row)
                print(f"{row['row']:40s} {row['method']:32s} ppl {row['ppl']:9.2f} bpb {row['bpb']:.4f} "
                      f"KL {row['kl']:.4f}", file=sys.stderr, flush=True)
    text = table(evaluate.base, rows) + "\n\n" + "\n".join(verdicts(rows))
    print(text)
    if args.out:
        write_markdown(args, argv, base, text, time.time() - started)
    return 0


def write_markdown(args, argv, base: str, text: str, wall: float) -> None:
    command = "python bench/evopress.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# EvoPress: searched per-layer compression vs uniform and heuristic allocations",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {args.threads} CPU thread(s), torch {torch.__version__}, shared with other "
        f"jobs (wall times are noisy); whole run {wall / 60:.1f} min.",
        "",
        f"Model: `{base}` ({args.testbed} testbed). Search: {args.generations} generations × {args.offspring} "
        f"offspring, selection steps of {args.selection_tokens} tokens keeping {args.survivors}, fitness KL to the "
        f"dense model on {args.calib_n} wiki calib windows of {args.calib_len} tokens, seed {args.seed}. Level "
        f"databases: SparseGPT 0–90% in 10% steps, GPTQ {args.bits_choices} bits (group {args.group_size}, "
        f"symmetric), from the dense model's activations on the same calibration windows. Eval: wiki eval split, "
        f"windows of {args.ctx} tokens, first {args.max_tokens:,} tokens; KL(dense ‖ compressed) in nats/token. "
        "`best?` marks the lowest eval KL of each row; `search s` and `evaluated` are the search's wall time and "
        "candidate evaluations.",
        "",
        text,
        "",
    ]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
