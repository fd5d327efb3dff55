"""Quantization quality, size and time on the testbed, side by side with fp32 and with GPTQModel.

    .venv/bin/python bench/quantize.py                 # quick testbed, writes bench/results/quantize.md
    .venv/bin/python bench/quantize.py --model DIR --calib-n 8 --calib-len 128 --eval-chars 20000 --no-write

Every model is measured with lctool's eval (ppl, bpb on wiki eval; KL to the fp32 model). GPTQModel
runs in the side environment made by bench/setup_gptq_env.sh (skipped, and said so, without it)
with the same calibration windows and settings; its artifact is evaluated by the same code.
Peak RSS is read from each run's manifest (the quantize runs are separate processes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from _testbed import add_testbed_argument, resolve_testbed, testbed_line  # noqa: E402  (bench/ is on sys.path)

sys.path.insert(0, ROOT)
LCTOOL = os.path.join(ROOT, ".venv", "bin", "lctool")
GPTQ_PYTHON = os.path.join(os.environ.get("GPTQ_VENV", os.path.join(ROOT, ".venv-gptq")), "bin", "python")

def configs(group: int, source: str) -> list[tuple[str, list[str]]]:
    """(label, lctool quantize arguments) of every row after fp32."""
    inter = json.load(open(os.path.join(source, "config.json")))["intermediate_size"]
    nf4 = ("nf4", ["--method", "nf4"]) if inter % 64 == 0 else ("nf4 (down_proj fp32)", ["--method", "nf4", "--skip", "down"])
    return [
        (f"RTN 4-bit g{group}", ["--method", "rtn", "--bits", "4", "--group-size", str(group)]),
        (f"GPTQ 4-bit g{group}", ["--method", "gptq", "--bits", "4", "--group-size", str(group)]),
        (f"GPTQ 3-bit g{group}", ["--method", "gptq", "--bits", "3", "--group-size", str(group)]),
        *FIXED_CONFIGS[:2],
        nf4,  # bitsandbytes' CPU kernel needs input widths divisible by 64
        *FIXED_CONFIGS[3:],
    ]


FIXED_CONFIGS = [
    ("SpQR 3-bit b16 (≈3.9)", ["--method", "spqr", "--bits", "3", "--outlier-threshold", "1.0"]),
    ("SpQR 4-bit b16 (≈4.6)", ["--method", "spqr", "--bits", "4", "--outlier-threshold", "1.0"]),
    ("nf4", ["--method", "nf4"]),
    ("int8", ["--method", "int8"]),
]

GPTQMODEL_CHILD = r"""
import json, sys, time, torch
from safetensors.torch import load_file
from gptqmodel import GPTQModel, QuantizeConfig
source, target, ids_file, group = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ids = load_file(ids_file)["ids"]
calibration = [{"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]} for row in ids]
config = QuantizeConfig(bits=4, group_size=group, desc_act=False, sym=True, damp_percent=0.01)
started = time.time()
model = GPTQModel.load(source, config, device="cpu")
model.quantize(calibration, batch_size=8)
model.save(target)
print(json.dumps({"wall_s": time.time() - started}))
"""


def largest_dividing_group(source: str) -> int:
    """128 for the quick testbed; the bench one (hidden 320, MLP 864) needs 32."""
    config = json.load(open(os.path.join(source, "config.json")))
    widths = (config["hidden_size"], config["intermediate_size"])
    return next(g for g in (128, 64, 32, 16) if all(w % g == 0 for w in widths))


def run_lctool(args: list[str]) -> dict:
    done = subprocess.run([LCTOOL, "-q", *args, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"lctool {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def evaluate(path: str, reference, text: str, ctx: int) -> dict:
    from lctool.eval import kl_divergence, load_for_eval, perplexity

    model, tokenizer = load_for_eval(path)
    result = perplexity(model, tokenizer, text, ctx=ctx)
    kl = kl_divergence(model, reference, tokenizer, text, ctx=ctx) if reference is not None else 0.0
    return {"ppl": result["ppl"], "bpb": result["bpb"], "kl": kl}


def gptqmodel_run(source: str, target: str, calib_ids, group: int) -> dict | None:
    if not os.path.exists(GPTQ_PYTHON):
        return None
    from safetensors.torch import save_file

    ids_file = target + ".ids.safetensors"
    save_file({"ids": calib_ids.contiguous()}, ids_file)
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "PYTHONPATH": ""}
    env.pop("TRITON_INTERPRET", None)
    started = time.time()
    done = subprocess.run([GPTQ_PYTHON, "-c", GPTQMODEL_CHILD, source, target, ids_file, str(group)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"GPTQModel failed: {done.stderr[-1500:]}", file=sys.stderr)
        return None
    inner = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall_s": inner["wall_s"], "process_s": time.time() - started}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="model folder (default: the testbed, see --testbed)")
    add_testbed_argument(parser)
    parser.add_argument("--calib-n", type=int, default=128)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--eval-chars", type=int, default=0, help="cut the eval text (0: whole wiki eval split)")
    parser.add_argument("--group-size", type=int, default=0,
                        help="GPTQ/RTN group size (0: the largest of 128, 64, 32 dividing every linear's inputs)")
    parser.add_argument("--no-gptqmodel", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import torch

    from lctool.data import calibration_batches, corpus_text
    from lctool.eval import load_for_eval

    torch.set_num_threads(2)
    if args.model:
        source, args.preset = args.model, "custom"
    else:
        source, args.preset = resolve_testbed(args.testbed, log=lambda m: print(m, file=sys.stderr))
    text = corpus_text("wiki", "eval")
    text = text[: args.eval_chars] if args.eval_chars else text
    work = tempfile.mkdtemp(prefix="lctool-bench-quantize-")
    calib = ["--calib", "wiki", "--calib-n", str(args.calib_n), "--calib-len", str(args.calib_len)]
    reference, tokenizer = load_for_eval(source)
    rows = [("fp32", evaluate(source, None, text, args.ctx), {"bits_per_param_stored": 32.0, "wall_s": 0.0})]
    try:
        group = args.group_size or largest_dividing_group(source)
        for label, options in configs(group, source):
            target = os.path.join(work, label.split()[0].lower() + str(len(rows)))
            extra = calib if ("gptq" in options or "spqr" in options) else []
            summary = run_lctool(["quantize", source, target, *options, *extra])
            rows.append((label, evaluate(target, reference, text, args.ctx), summary))
            print(f"done {label}", file=sys.stderr)
        if not args.no_gptqmodel:
            target = os.path.join(work, "gptqmodel")
            ids = calibration_batches(tokenizer, "wiki", args.calib_n, args.calib_len, seed=0)
            timing = gptqmodel_run(source, target, ids, group)
            if timing:
                rows.append((f"GPTQModel 4-bit g{group}", evaluate(target, reference, text, args.ctx),
                             {"bits_per_param_stored": float("nan"), "wall_s": timing["wall_s"]}))
    finally:
        report = render(rows, source, args)
        print(report)
        if not args.no_write:
            with open(os.path.join(ROOT, "bench", "results", "quantize.md"), "w") as f:
                f.write(report)
        shutil.rmtree(work, ignore_errors=True)


def render(rows, source: str, args) -> str:
    base = rows[0][1]["ppl"]
    lines = [
        "# lctool quantize on the testbed",
        "",
        f"Command: `.venv/bin/python bench/quantize.py {' '.join(sys.argv[1:])}`  (model: `{source}`)",
        testbed_line(args.preset, source) if args.preset != "custom" else f"Model: `{source}` (not a testbed).",
        f"Calibration: wiki calib split, {args.calib_n} x {args.calib_len} tokens; eval: wiki eval split, ctx {args.ctx}.",
        "CPU only (2 shared cores); GPU speed unmeasured.",
        "",
        "| model | bits/param (stored) | bits/param (paper) | outliers | ppl | ppl / fp32 | bpb | KL to fp32 | quantize wall s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, metrics, summary in rows:
        paper = summary.get("bits_per_param_paper")
        outliers = summary.get("outlier_rate")
        lines.append(
            f"| {label} | {summary.get('bits_per_param_stored', float('nan')):.3f} | {'' if paper is None else f'{paper:.3f}'} "
            f"| {'' if outliers is None else f'{outliers:.2%}'} | {metrics['ppl']:.3f} | {metrics['ppl'] / base:.4f} "
            f"| {metrics['bpb']:.4f} | {metrics['kl']:.5f} | {summary.get('wall_s', 0):.1f} | {summary.get('peak_rss_mb', '')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
