"""Bit packing of small integer codes into int32 words, as one little-endian bit stream per row.

Code k of a row occupies bits [k*bits, (k+1)*bits) of the stream and word j holds stream bits
[32j, 32j+32). For 2, 4 and 8 bits this is the usual "32/bits codes per word, low bits first"; for 3
bits it is exactly GPTQ's packing of 32 codes into 3 words (codes straddle word boundaries).
"""

from __future__ import annotations

import torch


def packed_words(n: int, bits: int) -> int:
    return -(-n * bits // 32)


def pack_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes in [0, 2^bits) along the last dim into int32 words (zero padded at the end)."""
    *lead, n = codes.shape
    words = packed_words(n, bits)
    flat = codes.reshape(-1, n).to(torch.int64)
    position = torch.arange(n, dtype=torch.int64) * bits
    word, offset = position // 32, position % 32
    out = torch.zeros(flat.shape[0], words + 1, dtype=torch.int64)
    out.scatter_add_(1, word.expand_as(flat), (flat << offset) & 0xFFFFFFFF)
    spill = flat >> (32 - offset)  # bits that run into the next word (0 when the code fits)
    out.scatter_add_(1, (word + 1).expand_as(flat), spill)
    return _as_int32(out[:, :words]).reshape(*lead, words)


def unpack_stream(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first `n` codes of each row of `packed` (int64)."""
    *lead, words = packed.shape
    flat = packed.reshape(-1, words).to(torch.int64) & 0xFFFFFFFF
    flat = torch.cat([flat, torch.zeros(flat.shape[0], 1, dtype=torch.int64)], dim=1)
    position = torch.arange(n, dtype=torch.int64) * bits
    word, offset = position // 32, position % 32
    low = flat[:, word] >> offset
    high = flat[:, word + 1] << (32 - offset)
    codes = (low | high) & ((1 << bits) - 1)
    return codes.reshape(*lead, n)


def _as_int32(values: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 -> the same bits as int32."""
    values = values & 0xFFFFFFFF
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def fp16_bits(values: torch.Tensor) -> torch.Tensor:
    """The 16-bit patterns of fp16 values, as int64 in [0, 65536)."""
    return values.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF


def fp16_from_bits(bits: torch.Tensor) -> torch.Tensor:
    b = bits.to(torch.int64) & 0xFFFF
    return torch.where(b >= 2**15, b - 2**16, b).to(torch.int16).view(torch.float16)
