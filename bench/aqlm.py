"""AQLM at ≈2 bits on the testbed, side by side with fp32, RTN 2-bit and GPTQ 2-bit, and AQLM
fine-tuned to the fp model with the straight-through estimator (STE) and with PV-Tuning.

    .venv/bin/python bench/aqlm.py                    # quick testbed, writes bench/results/aqlm.md
    .venv/bin/python bench/aqlm.py --testbed bench    # the bench testbed
    .venv/bin/python bench/aqlm.py --calib-n 8 --eval-chars 20000 --pv-steps 20 --no-write

Every model is measured with lctool's eval (ppl, bpb on the wiki eval split; KL to fp32); the AQLM
artifacts are read by lctool's reference loader (the same logits as stock transformers + aqlm, which
tests/test_aqlm.py checks). STE and PV start from the AQLM row they name and get the same budget
(steps, windows per step, lr); their time columns count the fine-tune only. Wall clock and CPU time
(user + system of the lctool process, all threads) are measured on the shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from _testbed import add_testbed_argument, resolve_testbed, testbed_line  # noqa: E402  (bench/ is sys.path[0])
LCTOOL = os.path.join(ROOT, ".venv", "bin", "lctool")
PAPER = "PV-Tuning paper, Llama-2-7B at 2.29 bits: ppl 5.12 → 5.68 (×1.11) with AQLM+PV"

CONFIGS = [  # (label, lctool quantize arguments); an AQLM row's label doubles as the base of the tuned rows
    ("RTN 2-bit g64", ["--method", "rtn", "--bits", "2", "--group-size", "64", "--asym"]),
    ("GPTQ 2-bit g64", ["--method", "gptq", "--bits", "2", "--group-size", "64", "--asym"]),
    ("AQLM 2x8 g8, no block FT", ["--method", "aqlm", "--codebooks", "2", "--codebook-bits", "8",
                                  "--in-group-size", "8", "--finetune-steps", "0"]),
    ("AQLM 2x8 g8 + block FT", ["--method", "aqlm", "--codebooks", "2", "--codebook-bits", "8",
                                "--in-group-size", "8", "--finetune-steps", "100"]),
    ("AQLM 1x8 g4 + block FT", ["--method", "aqlm", "--codebooks", "1", "--codebook-bits", "8",
                                "--in-group-size", "4", "--finetune-steps", "100"]),
]
TUNED = [  # (label, base row, method): the whole-model fine-tunes the PV-Tuning paper compares
    ("AQLM 1x8 g4 + block FT + STE", "AQLM 1x8 g4 + block FT", "ste"),
    ("AQLM 1x8 g4 + block FT + PV", "AQLM 1x8 g4 + block FT", "pv"),
]


def largest_dividing_group(source: str) -> int:
    """RTN/GPTQ group size: 64 where it divides every linear's inputs (quick testbed), else 32 (bench: MLP 864)."""
    config = json.load(open(os.path.join(source, "config.json")))
    widths = (config["hidden_size"], config["intermediate_size"])
    return next(g for g in (64, 32, 16) if all(w % g == 0 for w in widths))


def run_lctool(args: list[str]) -> dict:
    """The command's JSON summary, with its CPU seconds (user + system, all threads) as `cpu_s`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([LCTOOL, "-q", *args, "--json"], capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"lctool {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
    summary = json.loads(done.stdout)
    summary["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return summary


def pv_arguments(args, method: str) -> list[str]:
    return ["--pv-tune", method, "--pv-steps", str(args.pv_steps), "--pv-lr", str(args.pv_lr),
            "--pv-v-lr", str(args.pv_v_lr), "--pv-subspace", str(args.pv_subspace),
            "--pv-code-every", str(args.pv_code_every), "--batch-size", str(args.pv_batch)]


def evaluate(path: str, reference, text: str, ctx: int) -> dict:
    from lctool.eval import kl_divergence, load_for_eval, perplexity

    model, tokenizer = load_for_eval(path)
    result = perplexity(model, tokenizer, text, ctx=ctx)
    kl = kl_divergence(model, reference, tokenizer, text, ctx=ctx) if reference is not None else 0.0
    return {"ppl": result["ppl"], "bpb": result["bpb"], "kl": kl}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="model folder (default: the --testbed preset)")
    add_testbed_argument(parser)
    parser.add_argument("--calib-n", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--eval-chars", type=int, default=0, help="cut the eval text (0: whole wiki eval split)")
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="AQLM code search + codebook refit rounds")
    parser.add_argument("--pv-steps", type=int, default=200, help="STE and PV: optimizer steps (the same budget)")
    parser.add_argument("--pv-batch", type=int, default=8, help="STE and PV: calibration windows per step")
    parser.add_argument("--pv-lr", type=float, default=1e-4, help="STE and PV: Adam lr of the continuous parameters")
    parser.add_argument("--pv-v-lr", type=float, default=0.1, help="PV: V step size relative to each row's scale")
    parser.add_argument("--pv-subspace", type=float, default=0.01, help="PV: fraction of code groups per V step")
    parser.add_argument("--pv-code-every", type=int, default=1, help="PV: V step / STE: re-quantize every K steps")
    parser.add_argument("--no-tune", action="store_true", help="skip the STE and PV rows")
    parser.add_argument("--only", default="", help="run only the quantize rows whose label contains one of these comma-separated texts")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import torch

    from lctool.data import corpus_text
    from lctool.eval import load_for_eval

    torch.set_num_threads(2)
    if args.model:
        source, args.preset = args.model, None
    else:
        source, args.preset = resolve_testbed(args.testbed, log=lambda m: print(m, file=sys.stderr))
    text = corpus_text("wiki", "eval")
    text = text[: args.eval_chars] if args.eval_chars else text
    work = tempfile.mkdtemp(prefix="lctool-bench-aqlm-")
    calib = ["--calib", "wiki", "--calib-n", str(args.calib_n), "--calib-len", str(args.calib_len)]
    reference, _ = load_for_eval(source)
    rows = [("fp32", evaluate(source, None, text, args.ctx), {"bits_per_param_stored": 32.0, "wall_s": 0.0})]
    group = largest_dividing_group(source)
    configs = [(label.replace("g64", f"g{group}"), [str(group) if o == "64" else o for o in options])
               for label, options in CONFIGS if any(part in label for part in args.only.split(","))]
    tuned = [t for t in TUNED if not args.no_tune and any(t[1] == label for label, _ in configs)]
    bases = {base for _, base, _ in tuned}
    kept: dict[str, tuple[str, dict]] = {}  # base label -> (artifact, its summary)
    try:
        for label, options in configs:
            target = os.path.join(work, f"run{len(rows)}")
            extra = calib if "rtn" not in options else []
            if "aqlm" in options:
                extra += ["--beam-size", str(args.beam_size), "--aqlm-rounds", str(args.rounds)]
            summary = run_lctool(["quantize", source, target, *options, *extra])
            rows.append((label, evaluate(target, reference, text, args.ctx), summary))
            if label in bases:
                kept[label] = (target, summary)
            else:
                shutil.rmtree(target, ignore_errors=True)
            print(render(rows, source, args), file=sys.stderr)  # partial table as each run lands
        for label, base, method in tuned:
            base_path, base_summary = kept[base]
            target = os.path.join(work, f"run{len(rows)}")
            summary = run_lctool(["quantize", base_path, target, "--reference", source, *calib,
                                  "--beam-size", str(args.beam_size), *pv_arguments(args, method)])
            wall = summary["pv_tune"]["wall_s"]
            summary = {**base_summary, "pv_tune": summary["pv_tune"], "wall_s": wall, "cpu_s": summary["cpu_s"]}
            rows.append((label, evaluate(target, reference, text, args.ctx), summary))
            shutil.rmtree(target, ignore_errors=True)
            print(render(rows, source, args), file=sys.stderr)
    finally:
        report = render(rows, source, args)
        print(report)
        if not args.no_write:
            with open(os.path.join(ROOT, "bench", "results", "aqlm.md"), "w") as f:
                f.write(report)
        shutil.rmtree(work, ignore_errors=True)


def render(rows, source: str, args) -> str:
    base = rows[0][1]["ppl"]
    lines = [
        "# lctool quantize --method aqlm on the testbed",
        "",
        f"Command: `.venv/bin/python bench/aqlm.py {' '.join(sys.argv[1:])}`  (model: `{source}`)",
        testbed_line(args.preset, source) if args.preset else f"Model: `{source}` (not a testbed).",
        f"Calibration: wiki calib split, {args.calib_n} x {args.calib_len} tokens; eval: wiki eval split"
        f"{f' (first {args.eval_chars} chars)' if args.eval_chars else ''}, ctx {args.ctx}. AQLM: beam {args.beam_size},"
        f" {args.rounds} rounds. STE/PV: {args.pv_steps} steps of {args.pv_batch} calibration windows, lr"
        f" {args.pv_lr}; PV: V step size {args.pv_v_lr}, subspace {args.pv_subspace}; V step / STE re-quantization"
        f" every {args.pv_code_every} step(s).",
        "CPU only (2 shared cores, other jobs running); GPU speed unmeasured. Linear layers only are quantized;",
        "embeddings (tied lm_head) stay fp32, as in the paper's bit counts.",
        f"Reference: {PAPER}.",
        "",
        "| model | true bits/param (codes+codebooks+scales) | stored bits/param | ppl | ppl / fp32 | bpb | KL to fp32 "
        "| wall s | CPU min | CPU s / tune step | KL on calib before → after tune |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, metrics, summary in rows:
        true_bits = summary.get("bits_per_param_true", summary["bits_per_param_stored"])
        pv = summary.get("pv_tune")
        per_step = f"{pv['cpu_s_per_step']:.2f}" if pv else "-"
        calib_kl = f"{pv['kl_before']:.5f} → {pv['kl_after']:.5f}" if pv else "-"
        cpu = f"{summary['cpu_s'] / 60:.2f}" if "cpu_s" in summary else "-"
        lines.append(
            f"| {label} | {true_bits:.3f} | {summary['bits_per_param_stored']:.3f} | {metrics['ppl']:.3f} | "
            f"{metrics['ppl'] / base:.4f} | {metrics['bpb']:.4f} | {metrics['kl']:.5f} | {summary['wall_s']:.1f} | "
            f"{cpu} | {per_step} | {calib_kl} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
