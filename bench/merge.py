"""lctool merge vs mergekit 0.1.5: the same ties and dare_ties YAML, wall time and peak RSS side by side.

    .venv/bin/python bench/merge.py                 # testbed + synthetic ~1.5 GB model, 2 runs each
    .venv/bin/python bench/merge.py --only testbed  # the small model only

Each merge runs as its own process (CLI start-up included, as users run it) under a wrapper that
reports the child's wall time, CPU time (user + system, all threads) and peak RSS (getrusage). Runs
are interleaved (mergekit, lctool, lctool --tie-break index, then again) so that each lctool run has a
mergekit run made under the same load beside it: the time ratios are the medians of those paired
ratios; the seconds shown are the minima over --runs runs. mergekit comes from $LCTOOL_MERGEKIT_VENV
(the Makefile's side environment, made by bench/setup_mergekit.sh). Inputs: a base and two fine-tunes
= base + Gaussian deltas (2-3 % of each tensor's std) in float32. CPU only; GPU speed is unmeasured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from _testbed import add_testbed_argument, resolve_testbed, testbed_line  # noqa: E402  (bench/ is sys.path[0])

from lctool.io.cache import cache_root  # noqa: E402

LCTOOL = os.path.join(ROOT, ".venv", "bin", "lctool")
_CACHE = cache_root()
MERGEKIT = os.path.join(
    os.environ.get("LCTOOL_MERGEKIT_VENV", os.path.join(_CACHE, "venvs", "mergekit-0.1.5")), "bin", "mergekit-yaml"
)
THREADS = "2"

# Peak RSS and CPU time of one child process: RUSAGE_CHILDREN of a wrapper that has exactly one child.
MEASURE = r"""
import json, resource, subprocess, sys, time
start = time.time()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.time() - start
if code.returncode:
    sys.stderr.write(code.stderr[-2000:]); sys.exit(code.returncode)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024}))
"""

# ~1.47 GB in float32: 368M parameters.
SYNTHETIC = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=5632,
    num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=4, vocab_size=24000,
    max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-5, dtype="float32",
)


def measure(command: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS, HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stderr}")
    return json.loads(result.stdout)


def make_finetunes(source_tensors, config: dict, folder: str, carry_from: str | None = None) -> list[str]:
    """base/, ft1/, ft2/ under `folder`, written tensor by tensor (base + 2 % and 3 % noise)."""
    import torch

    from lctool.io import CheckpointWriter

    paths = [os.path.join(folder, n) for n in ("base", "ft1", "ft2")]
    # mergekit refuses configs without `architectures` (transformers writes it; some configs lack it).
    config = {**config, "architectures": config.get("architectures") or ["LlamaForCausalLM"]}
    if all(os.path.exists(os.path.join(p, "lctool.json")) for p in paths):
        return paths
    os.makedirs(folder, exist_ok=True)
    writers = [CheckpointWriter(p, operation="bench-input", force=True, max_shard_size="2GB") for p in paths]
    for w in writers:
        w.__enter__()
    generator = torch.Generator().manual_seed(0)
    for name, tensor in source_tensors:
        tensor = tensor.float()
        spread = max(tensor.std().item() if tensor.numel() > 1 else 1.0, 1e-3)
        writers[0].add_tensor(name, tensor)
        for writer, scale in zip(writers[1:], (0.02, 0.03), strict=True):
            writer.add_tensor(name, tensor + torch.randn(tensor.shape, generator=generator) * scale * spread)
    for writer in writers:
        writer.write_config(config)
        if carry_from:
            from lctool.io import Checkpoint

            writer.carry_files(Checkpoint(carry_from))
        writer.__exit__(None, None, None)
    return paths


def synthetic_tensors():
    import torch

    from lctool.arch import ModelArch

    generator = torch.Generator().manual_seed(1)
    for name, shape in ModelArch(SYNTHETIC).expected_shapes().items():
        if len(shape) == 1:
            yield name, 1 + 0.05 * torch.randn(shape, generator=generator)
        else:
            yield name, torch.randn(shape, generator=generator) * 0.02


def testbed_inputs(work: str, testbed: str) -> list[str]:
    from lctool.io import Checkpoint

    checkpoint = Checkpoint(testbed)
    return make_finetunes(checkpoint.iter_tensors(), checkpoint.config, os.path.join(work, "testbed"), carry_from=testbed)


def config_for(method: str, base: str, ft1: str, ft2: str) -> dict:
    density = 0.5 if method == "dare_ties" else 0.3
    return {
        "merge_method": method,
        "base_model": base,
        "models": [
            {"model": ft1, "parameters": {"weight": 0.6, "density": density}},
            {"model": ft2, "parameters": {"weight": 0.4, "density": density}},
        ],
        "dtype": "float32",
    }


def bench_model(label: str, paths: list[str], work: str, runs: int, size_mb: float, methods: list[str]) -> list[dict]:
    import yaml

    rows = []
    for method in methods:
        config = os.path.join(work, f"{label}-{method}.yml")
        with open(config, "w") as f:
            yaml.safe_dump(config_for(method, *paths), f)
        outs = {tool: os.path.join(work, f"out-{label}-{method}-{tool}") for tool in ("mergekit", "lctool", "lctool-index")}
        tools = {
            "mergekit": [MERGEKIT, config, outs["mergekit"], "--no-write-model-card", "--random-seed", "1", "--quiet"],
            "lctool": [LCTOOL, "-q", "merge", config, outs["lctool"], "--seed", "1", "--force"],
        }
        if method == "ties":
            # Equal magnitudes at the cut: mergekit's exact argsort choice (default) vs lowest index first.
            tools["lctool-index"] = [LCTOOL, "-q", "merge", config, outs["lctool-index"], "--force", "--tie-break", "index"]
        runs_of: dict[str, list[dict]] = {tool: [] for tool in tools}
        for _ in range(runs):
            for tool, command in tools.items():
                shutil.rmtree(outs[tool], ignore_errors=True)
                load = os.getloadavg()[0]
                result = measure(command)
                result["load"] = load
                runs_of[tool].append(result)
                print(f"  {label} {method} {tool}: {result['wall']:.1f} s wall, {result['cpu']:.1f} s CPU, "
                      f"{result['rss_mb']:.0f} MB, load {result['load']:.1f}", file=sys.stderr)
        names = {"lctool": method, "lctool-index": "ties, --tie-break index"}
        for tool in tools:
            if tool != "mergekit":
                rows.append({"model": label, "size_mb": size_mb, "method": names[tool], "mergekit": runs_of["mergekit"],
                             "lctool": runs_of[tool], "diff": max_abs_diff(outs["mergekit"], outs[tool])})
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
    return rows


def max_abs_diff(ours: str, theirs: str) -> float:
    """Largest |lctool − mergekit| over all tensors of the two outputs, read one tensor at a time."""
    from lctool.io import Checkpoint

    mine, other = Checkpoint(ours), Checkpoint(theirs)
    if sorted(mine.tensor_names()) != sorted(other.tensor_names()):
        raise SystemExit(f"{ours} and {theirs} hold different tensors")
    return max((mine.get(n).double() - other.get(n).double()).abs().max().item() for n in mine.tensor_names())


def startup() -> dict:
    return {
        "mergekit": measure([MERGEKIT, "--help"]),
        "lctool": measure([LCTOOL, "merge", "--help"]),
    }


def paired_ratio(rows: list[dict], key: str) -> tuple[float, float, float]:
    """Median, min and max over runs of lctool run i / mergekit run i (made back to back)."""
    ratios = [lc[key] / mk[key] for mk, lc in zip(rows[0], rows[1], strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def table(rows: list[dict]) -> str:
    lines = [
        "| model | size | method | runs | mergekit wall s | lctool wall s | wall ratio, paired median (range) "
        "| mergekit CPU s | lctool CPU s | CPU ratio | mergekit peak RSS MB | lctool peak RSS MB | RSS ratio "
        "| max abs diff vs mergekit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mk, lc = r["mergekit"], r["lctool"]
        best = {name: {key: min(run[key] for run in runs) for key in ("wall", "cpu", "rss_mb")}
                for name, runs in (("mk", mk), ("lc", lc))}
        wall, low, high = paired_ratio([mk, lc], "wall")
        cpu, _, _ = paired_ratio([mk, lc], "cpu")
        lines.append(
            f"| {r['model']} | {r['size_mb']:.0f} MB | {r['method']} | {len(lc)} | {best['mk']['wall']:.1f} | "
            f"{best['lc']['wall']:.1f} | {wall:.2f}× ({low:.2f}-{high:.2f}) | {best['mk']['cpu']:.1f} | "
            f"{best['lc']['cpu']:.1f} | {cpu:.2f}× | {best['mk']['rss_mb']:.0f} | {best['lc']['rss_mb']:.0f} | "
            f"{best['lc']['rss_mb'] / best['mk']['rss_mb']:.2f}× | {r['diff']:.2g} |"
        )
    return "\n".join(lines)


def folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["testbed", "synthetic"], help="Run one model only.")
    parser.add_argument("--runs", type=int, default=3, help="Paired runs per cell.")
    parser.add_argument("--methods", nargs="+", choices=["ties", "dare_ties"], default=["ties", "dare_ties"])
    parser.add_argument("--work", default=None, help="Where inputs and outputs go (default: lctool's cache).")
    add_testbed_argument(parser)
    args = parser.parse_args()
    if not os.access(MERGEKIT, os.X_OK):
        raise SystemExit(f"mergekit not found at {MERGEKIT}: run bench/setup_mergekit.sh first")
    from lctool.io.cache import cache_dir

    work = args.work or cache_dir("bench", "merge")
    rows = []
    testbed_note = ""
    if args.only in (None, "testbed"):
        testbed, preset = resolve_testbed(args.testbed)
        testbed_note = testbed_line(preset, testbed)
        paths = testbed_inputs(os.path.join(work, preset), testbed)
        rows += bench_model("testbed", paths, work, args.runs, folder_mb(paths[0]), args.methods)
    if args.only in (None, "synthetic"):
        started = time.time()
        paths = make_finetunes(synthetic_tensors(), SYNTHETIC, os.path.join(work, "synthetic"))
        print(f"  synthetic inputs ready in {time.time() - started:.0f} s", file=sys.stderr)
        rows += bench_model("synthetic", paths, work, args.runs, folder_mb(paths[0]), args.methods)
    base = startup()
    loads = [run["load"] for r in rows for run in r["mergekit"] + r["lctool"]]
    if testbed_note:
        print(testbed_note)
        print()
    print(table(rows))
    print()
    print(f"Load average (1 min) at the start of each run: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores.")
    print()
    print(f"Start-up alone (`--help`): mergekit {base['mergekit']['wall']:.1f} s, {base['mergekit']['cpu']:.1f} s CPU, "
          f"{base['mergekit']['rss_mb']:.0f} MB; lctool {base['lctool']['wall']:.1f} s, {base['lctool']['cpu']:.1f} s CPU, "
          f"{base['lctool']['rss_mb']:.0f} MB.")
    print("time ratio = lctool / mergekit (goal ≤ 0.5); RSS ratio = lctool / mergekit (goal ≤ 1). CPU only; GPU unmeasured.")


if __name__ == "__main__":
    main()
