"""SpQR matvec/matmul kernel: tokens/s and GB/s against fp16 torch.matmul and the bandwidth bound.

    .venv/bin/python bench/kernel_speed.py            # on CUDA: timed; on CPU: parity only (interpreter), says so

The bound: a decode step is memory bound, so at batch 1 a kernel reading `b` bits per weight can be
at most 16 / b times faster than fp16 (b = effective bits: dense words + outliers + row offsets).
Goal: >= 70% of that bound at batch 1. Writes bench/results/kernels.md.
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
BATCHES = [1, 4, 16]


def packed(out_features: int, in_features: int, outlier_rate: float = 0.01):
    """A synthetic packed SpQR weight (random codes and fp16 stats, `outlier_rate` outliers)."""
    import torch

    from lctool.quant.formats import spqr_hf_tensors
    from lctool.quant.spqr import SpqrResult

    g = torch.Generator().manual_seed(0)
    groups, tiles = in_features // 16, out_features // 16
    nnz = int(outlier_rate * out_features * in_features)
    rows = torch.sort(torch.randint(0, out_features, (nnz,), generator=g)).values
    second = torch.stack([torch.full((groups, tiles), 1e-3), torch.full((groups, tiles), -2.0),
                          torch.full((groups, tiles), 0.5), torch.full((groups, tiles), 0.0)], -1).half()
    result = SpqrResult(
        codes=torch.randint(0, 8, (out_features, in_features), generator=g, dtype=torch.int32),
        stat_codes=torch.randint(0, 8, (2, groups, out_features), generator=g, dtype=torch.int32),
        second_order=second, outlier_rows=rows,
        outlier_cols=torch.randint(0, in_features, (nnz,), generator=g),
        outlier_values=torch.randn(nnz, generator=g).half(), perm=torch.arange(in_features),
        w_hat=torch.zeros(0))
    return spqr_hf_tensors(result, out_features, in_features)


def effective_bits(tensors, out_features: int, in_features: int) -> float:
    read = sum(tensors[k].numel() * tensors[k].element_size() for k in ("dense_weights", "row_offsets", "col_vals"))
    return read * 8 / (out_features * in_features)


def time_cuda(fn, repeat: int = 50) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    import torch

    from lctool.kernels.spqr import spqr_matmul_reference, spqr_matmul_triton

    lines = ["# SpQR kernel benchmark", "", "Command: `.venv/bin/python bench/kernel_speed.py`", ""]
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        tensors = packed(64, 128)
        x = torch.randn(1, 128)
        args = [tensors[k] for k in ("dense_weights", "row_offsets", "col_vals")]
        diff = (spqr_matmul_triton(x, *args, 64, 128) - spqr_matmul_reference(x, *args, 64, 128)).abs().max().item()
        lines += [
            "**No GPU was available: the kernel is unverified on hardware and its speed is unmeasured.**",
            "On this CPU machine the Triton kernel ran under `TRITON_INTERPRET=1` only (parity, not speed):",
            f"max |triton − reference| on a 64x128 weight, batch 1: {diff:.2e}.",
            f"Effective bits at 1% outliers (4096x4096): {effective_bits(packed(4096, 4096), 4096, 4096):.3f} "
            f"→ bandwidth bound {16 / effective_bits(packed(4096, 4096), 4096, 4096):.2f}x fp16 at batch 1.",
        ]
    else:
        name = torch.cuda.get_device_name()
        lines += [f"GPU: {name}", "",
                  "| shape (O x I) | batch | eff. bits | fp16 matmul µs | spqr µs | speedup | bound | % of bound | GB/s | tokens/s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for out_f, in_f in SHAPES:
            tensors = {k: v.cuda() for k, v in packed(out_f, in_f).items()}
            bits = effective_bits(tensors, out_f, in_f)
            weight = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16)
            for batch in BATCHES:
                x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
                t_fp16 = time_cuda(lambda x=x, weight=weight: x @ weight.T)
                args = [tensors[k] for k in ("dense_weights", "row_offsets", "col_vals")]
                t_spqr = time_cuda(lambda x=x, args=args, o=out_f, i=in_f: spqr_matmul_triton(x, *args, o, i))
                bound = 16 / bits
                speedup = t_fp16 / t_spqr
                gbs = bits * out_f * in_f / 8 / t_spqr / 1e9
                lines.append(f"| {out_f}x{in_f} | {batch} | {bits:.3f} | {t_fp16 * 1e6:.1f} | {t_spqr * 1e6:.1f} | "
                             f"{speedup:.2f} | {bound:.2f} | {speedup / bound:.0%} | {gbs:.0f} | {batch / t_spqr:.0f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    with open(os.path.join(ROOT, "bench", "results", "kernels.md"), "w") as f:
        f.write(report)


if __name__ == "__main__":
    main()
