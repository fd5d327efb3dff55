"""On-disk tensors of each quantized format, per Linear module, and their exact inverses.

GPTQ (quant_method "gptq", checkpoint_format "gptq", the layout optimum + GPTQModel load):
    qweight  int32 [I*bits/32, O]   codes packed along the input dim (bit stream, see packing.py)
    qzeros   int32 [groups, O*bits/32]  zero point − 1 ("v1"), packed along the output dim
    scales   fp16  [groups, O]
    g_idx    int32 [I]              group of each input column (act-order makes it non-monotonic)
    bias     fp16  [O]              when the Linear has one

SpQR, Hugging Face layout (quant_method "spqr": 3-bit, beta1 = beta2 = 16, what transformers'
integration and spqr-quant read):
    dense_weights int64 [ceil(O/16)·ceil(I/16)·16]  one word per row of each 16x16 tile, tiles in
                  row-major order; word bits: [0,3) scale code, [3,6) zero code, [6,54) the 16 weight
                  codes, [54,62) one byte of the tile's 64-bit second-order record (rows 2k and 2k+1
                  carry byte k). The record is four fp16: scale-of-scales | scale-of-zeros (bits 16..31)
                  | zero-of-scales (32..47) | zero-of-zeros (48..63).
    row_offsets   int32 [O+1]  CSR row pointers of the outliers
    col_vals      int32 [nnz]  low 16 bits: column; high 16 bits: fp16 value added to the dense weight
    in_perm       int32 [I/2]  the input permutation as uint16 pairs (identity: spqr-quant ignores it)

SpQR, lctool layout (quant_method "lctool_spqr": any bits, beta1, beta2, stat bits, act-order):
    dense_codes   int32 [O, words(I)]       weight codes, bit stream along the (permuted) input dim
    stat_codes    int32 [2, groups, words(O)]  first-order scale codes, zero codes
    second_order  fp16  [groups, ceil(O/beta2), 4]  scale-of-s, zero-of-s, scale-of-z, zero-of-z
    row_offsets, col_vals  as above (columns in the permuted order, so I ≤ 65536)
    in_perm       int32 [I]  stored column j multiplies input feature in_perm[j]
Both SpQR layouts mean: W[:, in_perm] = dense + outliers, dense[r, c] = s·(q − z) with
s = ss·(s_code − sz), z = zs·(z_code − zz) computed in float32 from the fp16 second-order numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lctool.errors import LctoolError
from lctool.quant.gptq import GroupedResult
from lctool.quant.packing import fp16_bits, fp16_from_bits, pack_stream, packed_words, unpack_stream
from lctool.quant.spqr import SpqrResult, SpqrSettings, dequantize_dense, dequantize_stats

GPTQ_BITS = (2, 3, 4, 8)
HF_SPQR_TILE = 16

# ---- GPTQ ------------------------------------------------------------------------------------------


def gptq_tensors(result: GroupedResult, bits: int, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    tensors = {
        "qweight": pack_stream(result.codes, bits).T.contiguous(),
        "qzeros": pack_stream((result.zeros.round().to(torch.int64) - 1).T & ((1 << bits) - 1), bits).contiguous(),
        "scales": result.scales.T.to(torch.float16).contiguous(),
        "g_idx": result.g_idx.to(torch.int32).contiguous(),
    }
    if bias is not None:
        tensors["bias"] = bias.to(torch.float16)
    return tensors


def gptq_dequantize(tensors: dict[str, torch.Tensor], bits: int, in_features: int, out_features: int) -> torch.Tensor:
    """The float32 weight [O, I] a GPTQ (v1) module holds."""
    codes = unpack_stream(tensors["qweight"].T.contiguous(), bits, in_features)
    zeros = unpack_stream(tensors["qzeros"], bits, out_features) + 1  # [groups, O]
    g_idx = tensors["g_idx"].long()
    scales = tensors["scales"].float()  # [groups, O]
    return scales.T[:, g_idx] * (codes.float() - zeros.T[:, g_idx].float())


def gptq_module_bits(qconfig: dict, module: str) -> int:
    """A module's bitwidth: the first GPTQModel `dynamic` override whose pattern matches it, else `bits`.

    `dynamic` maps "+:<regex>" (or a bare regex) to overrides such as {"bits": 2}, matched with
    re.match against the module path, in order, as GPTQModel does (lctool writes it for mixed-bit
    EvoPress results; "-:" patterns, which leave modules unquantized, are not lctool's to write).
    """
    import re

    for pattern, overrides in (qconfig.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            continue
        if re.match(pattern[2:] if pattern.startswith("+:") else pattern, module):
            return int(overrides.get("bits", qconfig["bits"]))
    return int(qconfig["bits"])


def gptq_quantization_config(bits: int, group_size: int, sym: bool, act_order: bool, damp: float,
                             modules_not_quantized: list[str]) -> dict:
    config = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": act_order,
        "sym": sym,
        "damp_percent": damp,
        "true_sequential": True,
        "static_groups": False,
    }
    if modules_not_quantized:
        config["modules_not_quantized"] = modules_not_quantized
    return config


# ---- SpQR ------------------------------------------------------------------------------------------


def hf_spqr_allowed(settings: SpqrSettings, shapes: list[tuple[int, int]]) -> bool:
    """Whether the Hugging Face `spqr` layout can hold this configuration."""
    s = settings
    fixed = (s.bits, s.beta1, s.beta2, s.stat_bits) == (3, HF_SPQR_TILE, HF_SPQR_TILE, 3)
    fits = all(o % HF_SPQR_TILE == 0 and i % HF_SPQR_TILE == 0 and i <= 2**15 for o, i in shapes)
    return fixed and fits and not s.act_order


def _csr(result: SpqrResult, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.bincount(result.outlier_rows, minlength=out_features)
    row_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
    merged = (fp16_bits(result.outlier_values) << 16) | (result.outlier_cols & 0xFFFF)
    merged = torch.where(merged >= 2**31, merged - 2**32, merged).to(torch.int32)
    return row_offsets, merged


def _csr_dense(row_offsets: torch.Tensor, col_vals: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The outliers as a dense float32 matrix (zeros elsewhere)."""
    dense = torch.zeros(out_features, in_features)
    if col_vals.numel():
        counts = (row_offsets[1:] - row_offsets[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(out_features), counts)
        merged = col_vals.to(torch.int64) & 0xFFFFFFFF
        cols = merged & 0xFFFF
        dense[rows, cols] = fp16_from_bits(merged >> 16).float()
    return dense


def spqr_hf_tensors(result: SpqrResult, out_features: int, in_features: int) -> dict[str, torch.Tensor]:
    t = HF_SPQR_TILE
    row_tiles, col_tiles = -(-out_features // t), -(-in_features // t)
    # Ragged edges (only lctool's kernels accept them; the stock format needs multiples of 16) are zero-padded.
    codes = torch.zeros(row_tiles * t, col_tiles * t, dtype=torch.int64)
    codes[:out_features, :in_features] = result.codes
    codes = codes.reshape(row_tiles, t, col_tiles, t).permute(0, 2, 1, 3)
    stats = torch.zeros(2, col_tiles, row_tiles * t, dtype=torch.int64)
    stats[:, :, :out_features] = result.stat_codes
    scale_codes = stats[0].reshape(col_tiles, row_tiles, t).permute(1, 0, 2)
    zero_codes = stats[1].reshape(col_tiles, row_tiles, t).permute(1, 0, 2)
    second = fp16_bits(result.second_order).permute(1, 0, 2)  # [row_tiles, col_tiles, 4]
    record = second[..., 0] | (second[..., 2] << 16) | (second[..., 1] << 32) | (second[..., 3] << 48)
    fragment_shift = (torch.arange(t) // 2) * 8
    fragments = (record[..., None] >> fragment_shift) & 0xFF  # [row_tiles, col_tiles, 16]
    weight_shift = 6 + 3 * torch.arange(t)
    words = scale_codes | (zero_codes << 3) | (codes << weight_shift).sum(-1) | (fragments << 54)
    row_offsets, col_vals = _csr(result, out_features)
    perm = torch.cat([result.perm.to(torch.int64), torch.zeros(in_features % 2, dtype=torch.int64)])
    in_perm = (perm[0::2] | (perm[1::2] << 16))
    in_perm = torch.where(in_perm >= 2**31, in_perm - 2**32, in_perm).to(torch.int32)
    return {"dense_weights": words.reshape(-1).contiguous(), "row_offsets": row_offsets, "col_vals": col_vals,
            "in_perm": in_perm}


def spqr_lctool_tensors(result: SpqrResult, settings: SpqrSettings, out_features: int) -> dict[str, torch.Tensor]:
    row_offsets, col_vals = _csr(result, out_features)
    return {
        "dense_codes": pack_stream(result.codes, settings.bits),
        "stat_codes": pack_stream(result.stat_codes, settings.stat_bits),
        "second_order": result.second_order.contiguous(),
        "row_offsets": row_offsets,
        "col_vals": col_vals,
        "in_perm": result.perm.to(torch.int32),
    }


@dataclass
class SpqrParts:
    """A stored SpQR weight decoded to plain tensors (stored column order)."""

    codes: torch.Tensor  # [O, I]
    scale: torch.Tensor  # float32 [O, groups] first-order scale
    zero: torch.Tensor  # float32 [O, groups]
    beta1: int
    outliers: torch.Tensor  # float32 [O, I] dense view of the sparse part
    perm: torch.Tensor  # int64 [I]

    def dense(self) -> torch.Tensor:
        group = torch.arange(self.codes.shape[1]) // self.beta1
        return dequantize_dense(self.codes, self.scale[:, group], self.zero[:, group])

    def weight(self) -> torch.Tensor:
        """The float32 weight [O, I] in the original input order."""
        stored = self.dense() + self.outliers
        return stored[:, torch.argsort(self.perm)]


def _stats_per_row(codes: torch.Tensor, second_order: torch.Tensor, beta2: int, out_features: int):
    """First-order (scale, zero) [O, groups] from stat codes [2, groups, O] and second order [groups, tiles, 4]."""
    rows = second_order.repeat_interleave(beta2, dim=1)[:, :out_features]  # [groups, O, 4]
    scale = dequantize_stats(codes[0], rows[..., 0], rows[..., 1])
    zero = dequantize_stats(codes[1], rows[..., 2], rows[..., 3])
    return scale.T.contiguous(), zero.T.contiguous()


def spqr_hf_parts(tensors: dict[str, torch.Tensor], out_features: int, in_features: int) -> SpqrParts:
    t = HF_SPQR_TILE
    row_tiles, col_tiles = -(-out_features // t), -(-in_features // t)
    words = tensors["dense_weights"].to(torch.int64).reshape(row_tiles, col_tiles, t)
    codes = (words[..., None] >> (6 + 3 * torch.arange(t))) & 7  # [rt, ct, k, l]
    codes = codes.permute(0, 2, 1, 3).reshape(row_tiles * t, col_tiles * t)[:out_features, :in_features]
    fragments = (words >> 54) & 0xFF
    record = torch.zeros(row_tiles, col_tiles, dtype=torch.int64)
    for k in range(0, t, 2):
        record |= fragments[..., k] << ((k // 2) * 8)
    second = torch.stack([record & 0xFFFF, (record >> 32) & 0xFFFF, (record >> 16) & 0xFFFF, (record >> 48) & 0xFFFF], -1)
    second_order = fp16_from_bits(second).permute(1, 0, 2)  # [groups, tiles, 4]
    stat_codes = torch.stack([words & 7, (words >> 3) & 7]).permute(0, 2, 1, 3).reshape(2, col_tiles, row_tiles * t)
    scale, zero = _stats_per_row(stat_codes[..., :out_features], second_order, t, out_features)
    packed_perm = tensors["in_perm"].to(torch.int64) & 0xFFFFFFFF
    perm = torch.stack([packed_perm & 0xFFFF, packed_perm >> 16], dim=1).reshape(-1)[:in_features]
    if perm.numel() != in_features:
        perm = torch.arange(in_features)
    outliers = _csr_dense(tensors["row_offsets"], tensors["col_vals"], out_features, in_features)
    return SpqrParts(codes, scale, zero, t, outliers, perm)


def spqr_lctool_parts(tensors: dict[str, torch.Tensor], qconfig: dict, out_features: int, in_features: int) -> SpqrParts:
    bits, stat_bits, beta1, beta2 = qconfig["bits"], qconfig["stat_bits"], qconfig["beta1"], qconfig["beta2"]
    codes = unpack_stream(tensors["dense_codes"], bits, in_features)
    stat_codes = unpack_stream(tensors["stat_codes"], stat_bits, out_features)
    scale, zero = _stats_per_row(stat_codes, tensors["second_order"], beta2, out_features)
    outliers = _csr_dense(tensors["row_offsets"], tensors["col_vals"], out_features, in_features)
    return SpqrParts(codes, scale, zero, beta1, outliers, tensors["in_perm"].long())


def spqr_parts(tensors: dict[str, torch.Tensor], qconfig: dict, out_features: int, in_features: int) -> SpqrParts:
    method = qconfig.get("quant_method")
    if method == "spqr":
        return spqr_hf_parts(tensors, out_features, in_features)
    if method == "lctool_spqr":
        return spqr_lctool_parts(tensors, qconfig, out_features, in_features)
    raise LctoolError(f"not a SpQR checkpoint (quant_method {method!r})")


def stored_bits(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() * 8 for t in tensors.values())


def packed_code_words(n: int, bits: int) -> int:
    return packed_words(n, bits)
