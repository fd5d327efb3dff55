"""lctool merge vs mergekit 0.1.5: the same ties and dare_ties YAML, wall time and peak RSS side by side.

    .venv/bin/python bench/merge.py                 # testbed + synthetic ~1.5 GB model, 2 runs each
    .venv/bin/python bench/merge.py --only testbed  # the small model only

Each merge runs as its own process (CLI start-up included, as users run it) under a wrapper that
reports the child's wall time and peak RSS (getrusage). Cells are the minimum of --runs runs.
mergekit comes from .venv-mergekit (bench/setup_mergekit.sh). Inputs: a base and two fine-tunes =
base + Gaussian deltas (2-3 % of each tensor's std) in float32. CPU only; GPU speed is unmeasured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LCTOOL = os.path.join(ROOT, ".venv", "bin", "lctool")
MERGEKIT = os.path.join(os.environ.get("LCTOOL_MERGEKIT_VENV", os.path.join(ROOT, ".venv-mergekit")), "bin", "mergekit-yaml")
THREADS = "2"

# Peak RSS of one child process: RUSAGE_CHILDREN of a wrapper that has exactly one child.
MEASURE = r"""
import json, resource, subprocess, sys, time
start = time.time()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.time() - start
if code.returncode:
    sys.stderr.write(code.stderr[-2000:]); sys.exit(code.returncode)
print(json.dumps({"wall": wall, "rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
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


def testbed_inputs(work: str) -> list[str]:
    from lctool.io import Checkpoint
    from lctool.ops.testbed import testbed_path

    testbed = testbed_path(preset="quick", build=True)
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


def bench_model(label: str, paths: list[str], work: str, runs: int, size_mb: float) -> list[dict]:
    import yaml

    rows = []
    for method in ("ties", "dare_ties"):
        config = os.path.join(work, f"{label}-{method}.yml")
        with open(config, "w") as f:
            yaml.safe_dump(config_for(method, *paths), f)
        out = os.path.join(work, "out")
        tools = {
            "mergekit": [MERGEKIT, config, out, "--no-write-model-card", "--random-seed", "1", "--quiet"],
            "lctool": [LCTOOL, "-q", "merge", config, out, "--seed", "1", "--force"],
        }
        if method == "ties":
            # Equal magnitudes at the cut: mergekit's exact argsort choice (default) vs lowest index first.
            tools["lctool-index"] = [*tools["lctool"], "--tie-break", "index"]
        best: dict[str, dict] = {}
        for _ in range(runs):
            for tool, command in tools.items():
                shutil.rmtree(out, ignore_errors=True)
                result = measure(command)
                print(f"  {label} {method} {tool}: {result['wall']:.1f} s, {result['rss_mb']:.0f} MB", file=sys.stderr)
                previous = best.get(tool)
                best[tool] = {
                    "wall": min(result["wall"], previous["wall"]) if previous else result["wall"],
                    "rss_mb": min(result["rss_mb"], previous["rss_mb"]) if previous else result["rss_mb"],
                }
        shutil.rmtree(out, ignore_errors=True)
        rows.append({"model": label, "size_mb": size_mb, "method": method, "mergekit": best["mergekit"],
                     "lctool": best["lctool"]})
        if "lctool-index" in best:
            rows.append({"model": label, "size_mb": size_mb, "method": "ties, --tie-break index",
                         "mergekit": best["mergekit"], "lctool": best["lctool-index"]})
    return rows


def startup() -> dict:
    return {
        "mergekit": measure([MERGEKIT, "--help"]),
        "lctool": measure([LCTOOL, "merge", "--help"]),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | size | method | mergekit s | lctool s | time ratio | mergekit peak RSS MB | lctool peak RSS MB | RSS ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mk, lc = r["mergekit"], r["lctool"]
        lines.append(
            f"| {r['model']} | {r['size_mb']:.0f} MB | {r['method']} | {mk['wall']:.1f} | {lc['wall']:.1f} | "
            f"{lc['wall'] / mk['wall']:.2f}× | {mk['rss_mb']:.0f} | {lc['rss_mb']:.0f} | {lc['rss_mb'] / mk['rss_mb']:.2f}× |"
        )
    return "\n".join(lines)


def folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["testbed", "synthetic"], help="Run one model only.")
    parser.add_argument("--runs", type=int, default=2, help="Runs per cell (the minimum is reported).")
    parser.add_argument("--work", default=None, help="Where inputs and outputs go (default: lctool's cache).")
    args = parser.parse_args()
    if not os.access(MERGEKIT, os.X_OK):
        raise SystemExit(f"mergekit not found at {MERGEKIT}: run bench/setup_mergekit.sh first")
    from lctool.io.cache import cache_dir

    work = args.work or cache_dir("bench", "merge")
    rows = []
    if args.only in (None, "testbed"):
        paths = testbed_inputs(work)
        rows += bench_model("testbed", paths, work, args.runs, folder_mb(paths[0]))
    if args.only in (None, "synthetic"):
        started = time.time()
        paths = make_finetunes(synthetic_tensors(), SYNTHETIC, os.path.join(work, "synthetic"))
        print(f"  synthetic inputs ready in {time.time() - started:.0f} s", file=sys.stderr)
        rows += bench_model("synthetic", paths, work, args.runs, folder_mb(paths[0]))
    base = startup()
    print(table(rows))
    print()
    print(f"Start-up alone (`--help`): mergekit {base['mergekit']['wall']:.1f} s / {base['mergekit']['rss_mb']:.0f} MB, "
          f"lctool {base['lctool']['wall']:.1f} s / {base['lctool']['rss_mb']:.0f} MB.")
    print("time ratio = lctool / mergekit (goal ≤ 0.5); RSS ratio = lctool / mergekit (goal ≤ 1). CPU only; GPU unmeasured.")


if __name__ == "__main__":
    main()
