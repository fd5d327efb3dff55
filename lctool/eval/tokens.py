"""A text as one token stream, with the UTF-8 bytes each token accounts for.

Bits-per-byte needs to know how many bytes of text the scored tokens stand for. Token `i` *owns*
the UTF-8 bytes from the end of token `i-1` to the end of token `i` (token 0 owns everything from
the start of the text to its end), using the tokenizer's character offsets. So:

- the owned bytes of all tokens add up to the UTF-8 size of the text up to the end of its last
  token (whitespace a tokenizer drops is owned by the token after it);
- a character split over several byte-level tokens is owned by the first of them (the others own 0);
- the bytes counted for a score are the owned bytes of exactly the tokens that were scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lctool.errors import LctoolError, check


@dataclass(frozen=True)
class TokenStream:
    ids: torch.Tensor  # [n] int64
    owned_bytes: torch.Tensor  # [n] int64, see the module docstring
    exact_bytes: bool  # False when the tokenizer gives no offsets and bytes are estimated

    def __len__(self) -> int:
        return int(self.ids.numel())

    def truncated(self, max_tokens: int | None) -> TokenStream:
        if max_tokens is None or max_tokens >= len(self):
            return self
        return TokenStream(self.ids[:max_tokens], self.owned_bytes[:max_tokens], self.exact_bytes)

    @property
    def total_bytes(self) -> int:
        return int(self.owned_bytes.sum())


def char_to_byte_offsets(text: str) -> np.ndarray:
    """offsets[c] = UTF-8 byte offset of character c; offsets[len(text)] = the text's byte size."""
    code_points = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    offsets = np.zeros(len(code_points) + 1, dtype=np.int64)
    np.cumsum(widths, out=offsets[1:])
    return offsets


def owned_bytes_from_offsets(text: str, token_char_ends: list[int]) -> np.ndarray:
    byte_at = char_to_byte_offsets(text)
    ends = (
        np.maximum.accumulate(np.asarray(token_char_ends, dtype=np.int64))
        if token_char_ends
        else np.zeros(0, np.int64)
    )
    byte_ends = byte_at[np.clip(ends, 0, len(text))]
    return np.diff(byte_ends, prepend=0)


def tokenize_stream(tokenizer, text: str) -> TokenStream:
    """The text's ids without special tokens (as lctool.data tokenizes), with owned bytes."""
    check(bool(text), "the evaluation text is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise LctoolError(f"the evaluation text is not valid Unicode at character {e.start}") from None
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = encoded["input_ids"]
        owned = owned_bytes_from_offsets(text, [end for _, end in encoded["offset_mapping"]])
        exact = True
    else:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        owned = _spread_bytes(len(text.encode("utf-8")), len(ids))
        exact = False
    check(len(ids) > 0, "the evaluation text produces no tokens")
    return TokenStream(
        torch.tensor(ids, dtype=torch.long), torch.from_numpy(np.asarray(owned, dtype=np.int64)), exact
    )


def _spread_bytes(total_bytes: int, num_tokens: int) -> np.ndarray:
    """Without offsets: the text's bytes spread evenly over its tokens (bits-per-byte then approximate)."""
    edges = np.floor(np.arange(num_tokens + 1) * (total_bytes / max(num_tokens, 1))).astype(np.int64)
    return np.diff(edges)
