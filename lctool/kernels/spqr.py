"""SpQR matmul, y = x Wᵀ, on the Hugging Face `spqr` layout (lctool/quant/formats.py documents it).

`spqr_matmul_reference` defines the result (decode with formats.spqr_hf_parts, then a float32
matmul); `spqr_matmul_triton` computes it without materializing W: one program per 16-row tile
band walks the band's tiles, decodes each 64-bit tile row (scale/zero codes, 16 weight codes, and the
tile's second-order record spread over the 16 rows), accumulates for every row of a small batch of
inputs, then adds the band's CSR outliers. Meant for decode (batch 1) and small batches.
"""

from __future__ import annotations

import torch

from lctool.quant.formats import HF_SPQR_TILE, spqr_hf_parts

MAX_TRITON_BATCH = 16


def spqr_matmul_reference(x: torch.Tensor, dense_weights, row_offsets, col_vals, out_features: int,
                          in_features: int) -> torch.Tensor:
    parts = spqr_hf_parts({"dense_weights": dense_weights.cpu(), "row_offsets": row_offsets.cpu(),
                           "col_vals": col_vals.cpu(), "in_perm": torch.zeros(0, dtype=torch.int32)},
                          out_features, in_features)
    weight = (parts.dense() + parts.outliers).to(x.device)
    return x.float() @ weight.T


def spqr_matmul(x, dense_weights, row_offsets, col_vals, out_features: int, in_features: int) -> torch.Tensor:
    """Triton for batches up to MAX_TRITON_BATCH rows (looping over chunks beyond), reference where Triton is absent."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return spqr_matmul_reference(x, dense_weights, row_offsets, col_vals, out_features, in_features)
    chunks = [spqr_matmul_triton(part, dense_weights, row_offsets, col_vals, out_features, in_features)
              for part in x.split(MAX_TRITON_BATCH)]
    return torch.cat(chunks)


def spqr_matmul_triton(x: torch.Tensor, dense_weights, row_offsets, col_vals, out_features: int,
                       in_features: int) -> torch.Tensor:
    import triton

    batch = x.shape[0]
    if batch > MAX_TRITON_BATCH:
        raise ValueError(f"spqr_matmul_triton takes at most {MAX_TRITON_BATCH} rows, got {batch}")
    x = x.contiguous()
    y = torch.empty(batch, out_features, dtype=torch.float32, device=x.device)
    row_tiles = triton.cdiv(out_features, HF_SPQR_TILE)
    col_tiles = triton.cdiv(in_features, HF_SPQR_TILE)
    kernel = _kernel()
    kernel[(row_tiles,)](
        x, dense_weights, row_offsets, col_vals, y,
        batch, out_features, in_features, col_tiles,
        x.stride(0), y.stride(0),
        BLOCK_B=max(triton.next_power_of_2(batch), 1), TILE=HF_SPQR_TILE,
    )
    return y


_KERNEL = None


def _kernel():
    """Compile-on-first-use, so importing this module never needs triton."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build_kernel()
    return _KERNEL


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def spqr_band_kernel(x_ptr, dense_ptr, row_offsets_ptr, col_vals_ptr, y_ptr,
                         batch, rows, cols, col_tiles, x_stride, y_stride,
                         BLOCK_B: tl.constexpr, TILE: tl.constexpr):
        band = tl.program_id(0)
        k = tl.arange(0, TILE)  # row within the tile
        lane = tl.arange(0, TILE)  # column within the tile
        b = tl.arange(0, BLOCK_B)
        b_mask = b < batch
        acc = tl.zeros((BLOCK_B, TILE), dtype=tl.float32)
        # Rows 2j and 2j+1 of a tile both carry byte j of the 64-bit second-order record.
        byte_shift = ((k // 2) * 8).to(tl.int64)
        carries = (k % 2) == 0
        for tile in range(0, col_tiles):
            words = tl.load(dense_ptr + (band * col_tiles + tile) * TILE + k).to(tl.int64)
            byte = (words >> 54) & 0xFF
            record = tl.sum(tl.where(carries, byte << byte_shift, 0), axis=0)
            s_scale = ((record & 0xFFFF).to(tl.int16)).to(tl.float16, bitcast=True).to(tl.float32)
            z_scale = (((record >> 16) & 0xFFFF).to(tl.int16)).to(tl.float16, bitcast=True).to(tl.float32)
            s_zero = (((record >> 32) & 0xFFFF).to(tl.int16)).to(tl.float16, bitcast=True).to(tl.float32)
            z_zero = (((record >> 48) & 0xFFFF).to(tl.int16)).to(tl.float16, bitcast=True).to(tl.float32)
            scale = s_scale * ((words & 7).to(tl.float32) - s_zero)
            zero = z_scale * (((words >> 3) & 7).to(tl.float32) - z_zero)
            codes = ((words[:, None] >> (6 + 3 * lane[None, :]).to(tl.int64)) & 7).to(tl.float32)
            weight = scale[:, None] * (codes - zero[:, None])  # [row, column]
            column = tile * TILE + lane
            xs = tl.load(x_ptr + b[:, None] * x_stride + column[None, :],
                         mask=b_mask[:, None] & (column[None, :] < cols), other=0.0).to(tl.float32)
            acc += tl.sum(weight[None, :, :] * xs[:, None, :], axis=2)
        row = band * TILE + k
        row_mask = row < rows
        start = tl.load(row_offsets_ptr + row, mask=row_mask, other=0)
        end = tl.load(row_offsets_ptr + row + 1, mask=row_mask, other=0)
        longest = tl.max(end - start, axis=0)
        for t in range(0, longest):
            index = start + t
            present = index < end
            packed = tl.load(col_vals_ptr + index, mask=present, other=0).to(tl.int64) & 0xFFFFFFFF
            column = packed & 0xFFFF
            value = (((packed >> 16) & 0xFFFF).to(tl.int16)).to(tl.float16, bitcast=True).to(tl.float32)
            value = tl.where(present, value, 0.0)
            xs = tl.load(x_ptr + b[:, None] * x_stride + column[None, :],
                         mask=b_mask[:, None] & present[None, :], other=0.0).to(tl.float32)
            acc += xs * value[None, :]
        tl.store(y_ptr + b[:, None] * y_stride + row[None, :], acc, mask=b_mask[:, None] & row_mask[None, :])

    return spqr_band_kernel
