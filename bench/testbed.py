"""The testbeds side by side: what each preset reaches, and whether the bench one meets its targets.

Builds (or reuses) the presets, then measures with `lctool eval`: held-out wiki ppl and bits-per-byte
at L0, 4×L0 and 8×L0 (no RoPE scaling: the extrapolation failure context extension must fix), and
passkey accuracy at L0 and 4×L0. Targets for the bench preset (issue "benchmark-grade testbed"):
bpb ≤ 2.1, passkey at L0 ≥ 90%, a visible failure beyond L0.

Run: .venv/bin/python bench/testbed.py [--presets quick,bench] [--out bench/results/testbed.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from lctool.eval import EvalOptions, evaluate
from lctool.ops.testbed import recipe_for, testbed_path, testbed_summary

L0 = 256


def measure(preset: str, passkey_trials: int) -> dict:
    started = time.time()
    path = testbed_path(preset, build=True, log=lambda m: print(m, file=sys.stderr))
    build = testbed_summary(path)
    lengths = [L0, 4 * L0, 8 * L0]
    options = EvalOptions(corpus="wiki:eval", ctx=L0, lengths=lengths, passkey=True,
                          passkey_lengths=[L0, 4 * L0], passkey_trials=passkey_trials)
    result = evaluate(path, options)
    return {"preset": preset, "path": path, "build": build, "eval": result,
            "eval_wall_s": round(time.time() - started, 1)}


def _ppl_at(result: dict, length: int) -> float:
    for row in result["eval"]["ppl_vs_length"]:
        if row["length"] == length:
            return row["ppl"]
    raise KeyError(length)


def _passkey_at(result: dict, length: int) -> float:
    return next(row["accuracy"] for row in result["eval"]["passkey"]["by_length"] if row["length"] == length)


def render(results: list[dict], command: str) -> str:
    lines = [
        "# Testbeds: quick (tests, demo) and bench (benchmarks)\n",
        f"Command: `{command}` (CPU, 2 cores; build times are whole-build wall times on this machine).\n",
        "| preset | params | steps × batch × L0 | build wall | wiki bpb @L0 | ppl @L0 | ppl @4×L0 | ppl @8×L0 | passkey @L0 | passkey @4×L0 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        recipe = recipe_for(r["preset"])
        ppl = r["eval"]["perplexity"]
        lines.append(
            f"| {r['preset']} | {r['build']['parameters'] / 1e6:.1f}M | {recipe.steps} × {recipe.batch_size} × {L0} | "
            f"{r['build'].get('train_wall_s', float('nan')):.0f} s | {ppl['bpb']:.3f} | {_ppl_at(r, L0):.1f} | "
            f"{_ppl_at(r, 4 * L0):.1f} | {_ppl_at(r, 8 * L0):.1f} | {_passkey_at(r, L0):.0%} | {_passkey_at(r, 4 * L0):.0%} |"
        )
    bench = next((r for r in results if r["preset"] == "bench"), None)
    if bench:
        bpb = bench["eval"]["perplexity"]["bpb"]
        lines += [
            "",
            "Bench targets:",
            f"- held-out wiki bpb ≤ 2.1: {'met' if bpb <= 2.1 else 'missed'} ({bpb:.3f})",
            f"- passkey at L0 ≥ 90%: {'met' if _passkey_at(bench, L0) >= 0.9 else 'missed'} ({_passkey_at(bench, L0):.0%})",
            f"- extrapolation failure without scaling: ppl ×{_ppl_at(bench, 4 * L0) / _ppl_at(bench, L0):.2f} at 4×L0, "
            f"×{_ppl_at(bench, 8 * L0) / _ppl_at(bench, L0):.2f} at 8×L0; passkey {_passkey_at(bench, 4 * L0):.0%} at 4×L0",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="quick,bench")
    parser.add_argument("--passkey-trials", type=int, default=4)
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None, help="also dump the raw results here")
    args = parser.parse_args()
    results = [measure(p, args.passkey_trials) for p in args.presets.split(",")]
    command = f".venv/bin/python bench/testbed.py --presets {args.presets} --passkey-trials {args.passkey_trials}"
    table = render(results, command)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
