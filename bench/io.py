"""Checkpoint I/O throughput and peak RSS: lctool's lazy reader / streamed writer against safetensors'
`load_file` / `save_file`, on synthetic Llama checkpoints of three sizes.

Each figure is one fresh process (so peak RSS is that operation's alone). Runs are paired: each
repeat runs lctool and safetensors back to back (alternating which goes first), so a ratio compares
two runs made under the same machine load; the table shows medians over --repeats pairs. Besides wall
time, each run reports its CPU time (all threads), which a shared, busy machine disturbs far less.
--cold also reads with the source's pages evicted from the page cache first (posix_fadvise DONTNEED
on the shard files), i.e. from disk.
Run: .venv/bin/python bench/io.py [--sizes 100,400,1600] [--repeats 5] [--threads 1] [--cold] [--out bench/results/io.md]
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
            tensors = tensor = None  # release the mapping inside the timed region, as lctool does tensor by tensor


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


def evict_from_page_cache(folder: str) -> None:
    """Drop the folder's shard pages from the page cache so the next read comes from disk."""
    for file in os.listdir(folder):
        if file.endswith(".safetensors"):
            fd = os.open(os.path.join(folder, file), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def worker(op: str, src: str, dst: str, threads: int, cold: bool) -> None:
    import safetensors.torch  # noqa: F401 - imports are not what is measured
    import torch

    import lctool.io  # noqa: F401

    torch.set_num_threads(threads)
    if cold:
        evict_from_page_cache(src)
    start, cpu_start = time.perf_counter(), time.process_time()
    OPS[op](src, dst)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(json.dumps({"wall": wall, "cpu": cpu, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_once(op: str, src: str, dst: str, threads: int, cold: bool) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    command = [sys.executable, __file__, "--worker", op, src, dst, "--threads", str(threads)] + (["--cold"] if cold else [])
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_pair(kind: str, src: str, dst: str, args, cold: bool = False) -> dict:
    """`kind` (read or write) by lctool and by safetensors, --repeats paired runs; medians of each
    side's figures and of the per-pair ratios (safetensors time / lctool time)."""
    ours, theirs = [], []
    for repeat in range(args.repeats):
        order = ("lctool", "safetensors") if repeat % 2 == 0 else ("safetensors", "lctool")
        runs = {who: run_once(f"{kind}_{who}", src, dst, args.threads, cold) for who in order}
        ours.append(runs["lctool"])
        theirs.append(runs["safetensors"])
    median = statistics.median
    wall_ratios = [t["wall"] / o["wall"] for o, t in zip(ours, theirs, strict=True)]
    return {
        "lctool": {key: median(r[key] for r in ours) for key in ("wall", "cpu", "peak_rss_mb")},
        "safetensors": {key: median(r[key] for r in theirs) for key in ("wall", "cpu", "peak_rss_mb")},
        "wall_ratio": median(wall_ratios),
        "cpu_ratio": median(t["cpu"] / o["cpu"] for o, t in zip(ours, theirs, strict=True)),
        "wall_ratio_range": (min(wall_ratios), max(wall_ratios)),
    }


def baseline_rss_mb() -> float:
    out = subprocess.run([sys.executable, "-c", "import torch, lctool.io, safetensors.torch, resource;"
                          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)"],
                         check=True, capture_output=True, text=True).stdout
    return float(out.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,400,1600", help="synthetic checkpoint sizes in MB")
    parser.add_argument("--repeats", type=int, default=5, help="paired runs per cell")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in each run (the consumer's sum, not the I/O, uses them)")
    parser.add_argument("--cold", action="store_true", help="also read with the source evicted from the page cache")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="write the markdown table here too")
    parser.add_argument("--worker", nargs=3, metavar=("OP", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.threads, args.cold)
        return
    workdir = args.workdir or tempfile.mkdtemp(prefix="lctool-bench-io-")
    base_rss = baseline_rss_mb()
    load_before = os.getloadavg()
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        src, dst = os.path.join(workdir, f"src-{size}"), os.path.join(workdir, f"dst-{size}")
        make_checkpoint(src, size)
        nbytes = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors"))
        result = {"read": measure_pair("read", src, dst, args), "write": measure_pair("write", src, dst, args)}
        if args.cold:
            result["read (cold)"] = measure_pair("read", src, dst, args, cold=True)
        rows.append((size, nbytes, result))
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
        print(f"done {size} MB", file=sys.stderr)
    args.load = (load_before, os.getloadavg())
    table = render(rows, base_rss, args)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def render(rows, base_rss: float, args) -> str:
    lines = [
        "| size | op | lctool MB/s | safetensors MB/s | wall-time ratio (min–max) | CPU-time ratio "
        "| lctool peak RSS MB | safetensors peak RSS MB | RSS ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for _size, nbytes, result in rows:
        mb = nbytes / 1e6
        for op, cell in result.items():
            ours, theirs = cell["lctool"], cell["safetensors"]
            low, high = cell["wall_ratio_range"]
            lines.append(
                f"| {mb:.0f} MB | {op} | {mb / ours['wall']:.0f} | {mb / theirs['wall']:.0f} | "
                f"{cell['wall_ratio']:.2f}× ({low:.2f}–{high:.2f}) | {cell['cpu_ratio']:.2f}× | "
                f"{ours['peak_rss_mb']:.0f} | {theirs['peak_rss_mb']:.0f} | "
                f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f} |"
            )
    growth = ""
    if len(rows) > 1 and rows[-1][1] > rows[0][1]:
        (first_mb, first), (last_mb, last) = (rows[0][1] / 1e6, rows[0][2]), (rows[-1][1] / 1e6, rows[-1][2])
        span = last_mb - first_mb
        slopes = {
            f"{op}_{who}": (last[op][who]["peak_rss_mb"] - first[op][who]["peak_rss_mb"]) / span
            for op in ("read", "write") for who in ("lctool", "safetensors")
        }
        growth = (
            "\nPeak RSS growth with checkpoint size (MB of RSS per MB of checkpoint, first to last size): "
            + ", ".join(f"{kind} {slope:.2f}" for kind, slope in slopes.items())
            + ". lctool holds about one tensor at a time (the largest here is the embedding), so its peak is flat; "
            "load_file/save_file hold the whole checkpoint.\n"
        )
    command = f".venv/bin/python bench/io.py --sizes {args.sizes} --repeats {args.repeats} --threads {args.threads}"
    command += " --cold" if args.cold else ""
    (before, after) = args.load
    return (
        "# Checkpoint I/O: lctool vs safetensors load_file/save_file\n\n"
        f"Command: `{command}` ({args.repeats} paired fresh-process runs per cell, medians; CPU only; "
        f"torch threads per run: {args.threads}).\n"
        f"Load average (1/5/15 min) at start {before[0]:.1f}/{before[1]:.1f}/{before[2]:.1f}, "
        f"at end {after[0]:.1f}/{after[1]:.1f}/{after[2]:.1f}, on {os.cpu_count()} cores.\n\n"
        f"Process baseline (python + torch + lctool imported, nothing read): {base_rss:.0f} MB peak RSS.\n"
        "Ratios = safetensors time / lctool time, median over the pairs (>1: lctool faster); the wall-time range is "
        "the lowest and highest pair. Read = every tensor into memory and summed (one at a time for lctool, "
        "the whole file for load_file); write = synthetic tensors (a constant fill each) to disk "
        "(streamed for lctool, one dict for save_file). `read (cold)` first evicts the source from the page cache.\n\n"
        + "\n".join(lines) + "\n" + growth
    )


if __name__ == "__main__":
    main()
