"""Peak RSS and time of every lctool command at three (or four) synthetic model sizes, and how each grows.

    .venv/bin/python bench/scaling.py                        # sizes S, M, L (~40M, ~125M, ~395M params)
    .venv/bin/python bench/scaling.py --sizes S,M,L,XL       # and ~790M params (slow on a small machine)
    .venv/bin/python bench/scaling.py --sizes S --commands convert,quantize-gptq

The models are random Llama checkpoints (bfloat16, GQA 4:1, vocab 16384, untied, 512-token context, so
E²-LLM trains on 512-token windows) written in-process through lctool.io one tensor at a time, plus a
byte-level BPE tokenizer trained on wiki text. M and L have the SAME layer shape and differ only in
depth (8 vs 32 layers); S has a quarter of M's layer size. That design separates the two ways a command
can grow: one that streams layer by layer keeps its peak RSS from M to L, one that holds the whole model
quadruples it. Per command we fit

    peak RSS (MB) = a + b * (params of one decoder layer, millions) + c * (all params, millions)

(exact with three sizes, least squares with more), and CPU seconds = a' + c' * (all params, millions).
Each command runs as its own process (interpreter start-up included, as users run it); RSS and CPU time
come from GNU time (/usr/bin/time -f %M, the command's own wait4()). The "RSS / size" column is peak RSS
over the checkpoint's bytes on disk (the reference: what merely holding the model in its stored dtype
costs). Wall times on a shared machine are noisy; CPU time is the steadier measure. The report ends with
the fits extrapolated to Llama-2-7B and -70B shapes; docs/scaling.md explains them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VOCAB = 16384
SIZES = {  # name: (hidden, layers); intermediate 2.75 x hidden, head_dim 64, 4 query heads per kv head
    "S": (512, 8),
    "M": (1024, 8),
    "L": (1024, 32),
    "XL": (2048, 16),
}
THREADS = "2"
# (params of one decoder layer, all params), in millions: Llama-2-7B (MHA) and Llama-2-70B (GQA 8 kv heads).
TARGETS = {"7B": (202.4, 6738.4), "70B": (855.6, 68974.0)}
TIME = "/usr/bin/time"  # GNU time
TIMEOUT = 4 * 3600


def llama_config(hidden: int, layers: int) -> dict:
    heads = hidden // 64
    return dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=hidden,
        intermediate_size=int(2.75 * hidden), num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4), head_dim=64, vocab_size=VOCAB, max_position_embeddings=512,
        tie_word_embeddings=False, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=0, eos_token_id=0, dtype="bfloat16",
    )  # fmt: skip


def layer_params(config: dict) -> int:
    from lctool.arch import ModelArch

    prefix = ModelArch(config).layer_prefix(0) + "."
    shapes = ModelArch(config).expected_shapes()
    return sum(_numel(s) for n, s in shapes.items() if n.startswith(prefix))


def _numel(shape) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def write_model(path: str, config: dict, tokenizer, delta_seed: int | None = None) -> None:
    """A random checkpoint streamed through CheckpointWriter; `delta_seed` makes a fine-tune of the same
    base (base + 2% Gaussian deltas), for merge."""
    import torch

    from lctool.arch import ModelArch
    from lctool.io import CheckpointWriter

    with CheckpointWriter(path, operation="synthetic", parameters={"delta_seed": delta_seed}, force=True,
                          max_shard_size="2GB") as writer:
        writer.write_config(config)
        for index, (name, shape) in enumerate(ModelArch(config).expected_shapes().items()):
            generator = torch.Generator().manual_seed(index)
            if len(shape) == 1:
                tensor = torch.ones(shape) + 0.05 * torch.randn(shape, generator=generator)
            else:
                tensor = 0.02 * torch.randn(shape, generator=generator)
            if delta_seed is not None:
                noise = torch.randn(shape, generator=torch.Generator().manual_seed(10_000 * delta_seed + index))
                tensor = tensor + 0.02 * tensor.std() * noise
            writer.add_tensor(name, tensor.to(torch.bfloat16))
        tokenizer.save_pretrained(writer.tmp)


def prepare(work: str, size: str, tokenizer) -> dict:
    hidden, layers = SIZES[size]
    config = llama_config(hidden, layers)
    folder = os.path.join(work, size)
    os.makedirs(folder, exist_ok=True)
    paths = {"base": os.path.join(folder, "base"), "ft1": os.path.join(folder, "ft1"),
             "ft2": os.path.join(folder, "ft2")}
    for key, delta in (("base", None), ("ft1", 1), ("ft2", 2)):
        if not os.path.exists(os.path.join(paths[key], "lctool.json")):
            write_model(paths[key], config, tokenizer, delta)
    from lctool.io import Checkpoint

    checkpoint = Checkpoint(paths["base"])
    return {**paths, "folder": folder, "params": checkpoint.num_parameters(), "layer_params": layer_params(config),
            "bytes": checkpoint.total_bytes()}


def commands(model: dict, text: str, out: str) -> dict[str, list[str]]:
    base = model["base"]
    merge_yaml = os.path.join(model["folder"], "merge.yml")
    with open(merge_yaml, "w") as f:
        json.dump({"merge_method": "dare_ties", "base_model": base, "dtype": "bfloat16", "models": [
            {"model": model["ft1"], "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": model["ft2"], "parameters": {"weight": 0.5, "density": 0.5}}]}, f)  # JSON is YAML
    calib = ["--calib", text, "--calib-n", "4", "--calib-len", "128"]
    return {
        "inspect": ["inspect", base],
        "convert": ["convert", base, out],
        "extend-yarn": ["extend", base, out, "--method", "yarn", "--factor", "4"],
        "extend-e2llm": ["extend", base, out, "--method", "e2llm", "--factor", "2", "--steps", "1", "--corpus", text,
                         "--batch-size", "1", "--lora-rank", "8"],
        "eval": ["eval", base, "--text", text, "--ctx", "128", "--max-tokens", "512", "--layer-by-layer", "never"],
        "eval-layerwise": ["eval", base, "--text", text, "--ctx", "128", "--max-tokens", "512",
                           "--layer-by-layer", "always"],
        "quantize-rtn": ["quantize", base, out, "--method", "rtn"],
        "quantize-gptq": ["quantize", base, out, "--method", "gptq", *calib],
        "prune": ["prune", base, out, "--ratio", "0.2", "--calib", text, "--calib-n", "2", "--calib-len", "64"],
        "finetune": ["finetune", base, out, "--data", text, "--seq-len", "128", "--batch", "1", "--steps", "2",
                     "--lora-r", "8"],
        "merge": ["merge", merge_yaml, out, "--seed", "1"],
        "vocab-expand": ["vocab", "expand", base, out, "--corpus", text, "--num-new", "256"],
    }


def measure(args: list[str]) -> dict:
    """Wall time, CPU time and peak RSS of one CLI run in its own process, from GNU time: its wait4() sees
    only the command (a child forked from this big Python process would inherit its peak RSS)."""
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS, HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.NamedTemporaryFile("r", suffix=".time") as stats:
        done = subprocess.run([TIME, "-f", "%e %U %S %M", "-o", stats.name, sys.executable, "-m", "lctool.cli.main",
                               "--quiet", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=TIMEOUT)
        if done.returncode:
            raise RuntimeError(f"{args[0]} exited {done.returncode}: {done.stderr[-1500:]}")
        wall, user, system, rss_kb = stats.read().split()[-4:]
    return {"wall_s": float(wall), "cpu_s": float(user) + float(system), "rss_mb": int(rss_kb) / 1024}


def fit(rows: list[dict], key: str, columns) -> list[float]:
    """Least-squares coefficients of `key` against the given per-row regressors (exact when square)."""
    import numpy as np

    matrix = np.array([[column(r) for column in columns] for r in rows], dtype=float)
    target = np.array([r[key] for r in rows], dtype=float)
    solution, *_ = np.linalg.lstsq(matrix, target, rcond=None)
    return [float(x) for x in solution]


def rss_fit(rows: list[dict]) -> list[float]:
    if len(rows) < 3:
        return []
    return fit(rows, "rss_mb", [lambda r: 1.0, lambda r: r["layer_params"] / 1e6, lambda r: r["params"] / 1e6])


def cpu_fit(rows: list[dict]) -> list[float]:
    if len(rows) < 2:
        return []
    return fit(rows, "cpu_s", [lambda r: 1.0, lambda r: r["params"] / 1e6])


def report(results: dict, models: dict, argv: list[str]) -> str:
    sizes = list(models)
    lines = [
        "# Scaling: peak RSS and time per command vs model size",
        "",
        f"Command: `.venv/bin/python bench/scaling.py {' '.join(argv)}`".rstrip() + " (niced, on a shared 2-core "
        "machine under heavy load from other jobs: wall times are noisy and only indicative; CPU time is "
        f"steadier; {THREADS} torch threads).",
        "",
        "| size | hidden × layers | params | one layer | bf16 on disk |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for size, model in models.items():
        hidden, layers = SIZES[size]
        lines.append(f"| {size} | {hidden} × {layers} | {model['params'] / 1e6:.1f}M | "
                     f"{model['layer_params'] / 1e6:.2f}M | {model['bytes'] / 2**20:.0f} MB |")
    lines += ["", "Peak RSS (MB), RSS / checkpoint bytes, CPU s, wall s per size; then the fits "
              "`RSS MB = a + b·layer[M] + c·params[M]` and `CPU s = a' + c'·params[M]`.", ""]
    head = "| command | " + " | ".join(f"{s} RSS | {s} RSS/size | {s} CPU s | {s} wall s" for s in sizes)
    lines += [head + " | a MB | b MB/M-layer | c MB/M-params | a' s | c' s/M-params |",
              "| --- " * (1 + 4 * len(sizes) + 5) + "|"]
    for name, per_size in results.items():
        cells = []
        rows = []
        for size in sizes:
            run = per_size.get(size)
            if run is None:
                cells += ["-"] * 4
                continue
            ratio = run["rss_mb"] * 2**20 / models[size]["bytes"]
            cells += [f"{run['rss_mb']:.0f}", f"{ratio:.2f}", f"{run['cpu_s']:.1f}", f"{run['wall_s']:.1f}"]
            rows.append({**run, "params": models[size]["params"], "layer_params": models[size]["layer_params"]})
        rss, cpu = rss_fit(rows), cpu_fit(rows)
        fits = [f"{v:.1f}" for v in rss] if rss else ["-"] * 3
        fits += [f"{v:.2f}" if i == 0 else f"{v:.4f}" for i, v in enumerate(cpu)] if cpu else ["-"] * 2
        lines.append(f"| {name} | " + " | ".join(cells + fits) + " |")
    lines += ["", "Extrapolated with the fits (same settings: calibration, sequence lengths and steps as above; "
              "bf16 checkpoints; CPU seconds on this machine's cores):", "",
              "| command | " + " | ".join(f"{n} RSS GB | {n} CPU h" for n in TARGETS) + " |",
              "| --- " * (1 + 2 * len(TARGETS)) + "|"]
    for name, per_size in results.items():
        rows = [{**per_size[s], "params": models[s]["params"], "layer_params": models[s]["layer_params"]}
                for s in sizes if s in per_size]
        rss, cpu = rss_fit(rows), cpu_fit(rows)
        cells = []
        for layer, params in TARGETS.values():
            cells.append(f"{(rss[0] + rss[1] * layer + rss[2] * params) / 1024:.1f}" if rss else "-")
            cells.append(f"{(cpu[0] + cpu[1] * params) / 3600:.2f}" if cpu else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="S,M,L")
    parser.add_argument("--commands", default=None, help="comma-separated subset (default: all)")
    parser.add_argument("--skip", default="", help="size/command pairs not to measure, e.g. L/quantize-gptq "
                        "(too slow here); their cells stay empty and their fits use the other sizes")
    parser.add_argument("--work", default=os.path.join(ROOT, "logs", "scaling-work"))
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "scaling.md"))
    parser.add_argument("--json", default=os.path.join(ROOT, "logs", "scaling.json"),
                        help="raw measurements (reused: sizes/commands already measured are not rerun)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(THREADS))
    from lctool.data import load_text_source
    from lctool.ops.testbed import train_tokenizer

    os.makedirs(args.work, exist_ok=True)
    text = os.path.join(args.work, "text.txt")
    if not os.path.exists(text):
        with open(text, "w") as f:
            f.write(load_text_source("wiki", "train")[:200_000])
    tokenizer = train_tokenizer([open(text).read()], 4096)
    raw = json.load(open(args.json)) if os.path.exists(args.json) else {}
    models, results = {}, {}
    for size in args.sizes.split(","):
        models[size] = prepare(args.work, size, tokenizer)
        out = os.path.join(args.work, size, "out")
        table = commands(models[size], text, out)
        for name in (args.commands.split(",") if args.commands else table):
            key = f"{size}/{name}"
            if key in args.skip.split(",") and key not in raw:
                print(f"{size:3s} {name:15s} skipped (--skip)", flush=True)
                continue
            if key not in raw:
                shutil.rmtree(out, ignore_errors=True)
                raw[key] = measure(table[name])
                shutil.rmtree(out, ignore_errors=True)
                json.dump(raw, open(args.json, "w"), indent=1)
            results.setdefault(name, {})[size] = raw[key]
            run = raw[key]
            print(f"{size:3s} {name:15s} RSS {run['rss_mb']:8.0f} MB  CPU {run['cpu_s']:8.1f} s  "
                  f"wall {run['wall_s']:8.1f} s", flush=True)
    text_report = report(results, models, sys.argv[1:])
    print(text_report)
    with open(args.out, "w") as f:
        f.write(text_report)


if __name__ == "__main__":
    main()
