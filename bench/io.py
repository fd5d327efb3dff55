"""Checkpoint I/O throughput and peak RSS: lctool's lazy reader / streamed writer against safetensors'
`load_file` / `save_file`, on synthetic Llama checkpoints of three sizes.

Each figure is one fresh process (so peak RSS is that operation's alone); the median of --repeats
runs is shown. Run: .venv/bin/python bench/io.py [--sizes 100,400,1600] [--repeats 3] [--out bench/results/io.md]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 1024, 2816, 16, 8, 8192


def synthetic_config(target_mb: int) -> dict:
    per_layer = 4 * (HIDDEN * HIDDEN * 2 + HIDDEN * HIDDEN // 2 * 2 + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN)
    fixed = 4 * (2 * VOCAB * HIDDEN + HIDDEN)
    layers = max(1, round((target_mb * 1e6 - fixed) / per_layer))
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "tie_word_embeddings": False,
        "max_position_embeddings": 2048, "torch_dtype": "float32",
    }


def tensors_of(config: dict):
    """Synthetic tensors in checkpoint order, one at a time; cheap to make (a fill), so the timings
    measure I/O rather than random number generation."""
    import torch

    from lctool.arch import ModelArch

    for number, (name, shape) in enumerate(ModelArch(config).expected_shapes().items()):
        yield name, torch.full(shape, float(number) / 7.0)


def make_checkpoint(folder: str, target_mb: int) -> None:
    from lctool.io import CheckpointWriter

    config = synthetic_config(target_mb)
    with CheckpointWriter(folder, operation="bench-synthetic", force=True, max_shard_size="2GB") as writer:
        writer.write_config(config)
        for name, tensor in tensors_of(config):
            writer.add_tensor(name, tensor)


# ---- the measured operations (each runs in its own process) ------------------------------------

def op_read_lctool(src: str, dst: str) -> None:
    from lctool.io import Checkpoint

    checkpoint = Checkpoint(src)
    total = 0.0
    for _, tensor in checkpoint.iter_tensors():
        total += float(tensor.sum())  # use every byte


def op_read_safetensors(src: str, dst: str) -> None:
    from safetensors.torch import load_file

    total = 0.0
    for file in sorted(os.listdir(src)):
        if file.endswith(".safetensors"):
            tensors = load_file(os.path.join(src, file))
            for tensor in tensors.values():
                total += float(tensor.sum())  # use every byte (load_file maps lazily)
            del tensors  # release the mapping inside the timed region, as lctool does tensor by tensor


def op_write_lctool(src: str, dst: str) -> None:
    from lctool.io import CheckpointWriter

    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    with CheckpointWriter(dst, operation="bench", force=True, max_shard_size="5GB") as writer:
        writer.write_config(config)
        for name, tensor in tensors_of(config):
            writer.add_tensor(name, tensor)


def op_write_safetensors(src: str, dst: str) -> None:
    from safetensors.torch import save_file

    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    os.makedirs(dst, exist_ok=True)
    save_file(dict(tensors_of(config)), os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)


OPS = {f.__name__[3:]: f for f in (op_read_lctool, op_read_safetensors, op_write_lctool, op_write_safetensors)}


def worker(op: str, src: str, dst: str) -> None:
    import safetensors.torch  # noqa: F401 - imports are not what is measured
    import torch  # noqa: F401

    import lctool.io  # noqa: F401

    start = time.perf_counter()
    OPS[op](src, dst)
    wall = time.perf_counter() - start
    print(json.dumps({"wall": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(op: str, src: str, dst: str, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        shutil.rmtree(dst, ignore_errors=True)
        out = subprocess.run([sys.executable, __file__, "--worker", op, src, dst], check=True,
                             capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return {"wall": statistics.median(r["wall"] for r in runs),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs)}


def baseline_rss_mb() -> float:
    out = subprocess.run([sys.executable, "-c", "import torch, lctool.io, safetensors.torch, resource;"
                          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)"],
                         check=True, capture_output=True, text=True).stdout
    return float(out.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,400,1600", help="synthetic checkpoint sizes in MB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="write the markdown table here too")
    parser.add_argument("--worker", nargs=3, metavar=("OP", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    workdir = args.workdir or tempfile.mkdtemp(prefix="lctool-bench-io-")
    base_rss = baseline_rss_mb()
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        src, dst = os.path.join(workdir, f"src-{size}"), os.path.join(workdir, f"dst-{size}")
        make_checkpoint(src, size)
        nbytes = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors"))
        result = {kind: measure(kind, src, dst, args.repeats) for kind in OPS}
        rows.append((size, nbytes, result))
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
        print(f"done {size} MB", file=sys.stderr)
    table = render(rows, base_rss, args)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def render(rows, base_rss: float, args) -> str:
    lines = [
        "| size | op | lctool MB/s | safetensors MB/s | throughput ratio | lctool peak RSS MB | safetensors peak RSS MB | RSS ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _size, nbytes, result in rows:
        mb = nbytes / 1e6
        for op in ("read", "write"):
            ours, theirs = result[f"{op}_lctool"], result[f"{op}_safetensors"]
            lines.append(
                f"| {mb:.0f} MB | {op} | {mb / ours['wall']:.0f} | {mb / theirs['wall']:.0f} | "
                f"{theirs['wall'] / ours['wall']:.2f}× | {ours['peak_rss_mb']:.0f} | {theirs['peak_rss_mb']:.0f} | "
                f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f} |"
            )
    growth = ""
    if len(rows) > 1:
        (first_mb, first), (last_mb, last) = (rows[0][1] / 1e6, rows[0][2]), (rows[-1][1] / 1e6, rows[-1][2])
        span = last_mb - first_mb
        slopes = {kind: (last[kind]["peak_rss_mb"] - first[kind]["peak_rss_mb"]) / span for kind in last}
        growth = (
            "\nPeak RSS growth with checkpoint size (MB of RSS per MB of checkpoint, first to last size): "
            + ", ".join(f"{kind} {slope:.2f}" for kind, slope in slopes.items())
            + ". lctool holds about one tensor at a time (the largest here is the embedding), so its peak is flat; "
            "load_file/save_file hold the whole checkpoint.\n"
        )
    command = f".venv/bin/python bench/io.py --sizes {args.sizes} --repeats {args.repeats}"
    return (
        "# Checkpoint I/O: lctool vs safetensors load_file/save_file\n\n"
        f"Command: `{command}` (median of {args.repeats} fresh processes per cell; CPU only).\n\n"
        f"Process baseline (python + torch + lctool imported, nothing read): {base_rss:.0f} MB peak RSS.\n"
        "Throughput ratio = safetensors time / lctool time (>1: lctool faster). Read = every tensor into memory "
        "(one at a time for lctool, the whole file for load_file); write = synthetic tensors (a constant fill each) to disk "
        "(streamed for lctool, one dict for save_file).\n\n" + "\n".join(lines) + "\n" + growth
        + "\nThese machines are shared and noisy (other jobs ran during this measurement): treat ratios within "
        "about ±30% as parity. GPU and network-filesystem throughput are unmeasured.\n"
    )


if __name__ == "__main__":
    main()
