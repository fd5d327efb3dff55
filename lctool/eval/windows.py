"""Which windows of a token stream are run, and which of their tokens are scored.

Windows are `ctx` tokens long and start at 0, stride, 2*stride, ... (stride defaults to ctx:
back-to-back, non-overlapping windows); a tail too short for another full window is not run, as
in `lctool.data.token_windows`. Every scored token is scored exactly once:

- window 0 scores its tokens 1..ctx-1 (token 0 has no context to be predicted from);
- window k >= 1 scores only the tokens no earlier window scored, i.e. its last min(stride, ctx-1)
  tokens. With stride == ctx that is tokens 1..ctx-1 again: the first token of each window only
  serves as context. With stride < ctx every scored token after the first window sees at least
  ctx - stride tokens of context.

Not scored: the first token of the text, the first token of each non-overlapping window, and the
tail after the last window. Bits-per-byte divides by the bytes owned by the scored tokens only
(see `lctool.eval.tokens`), so unscored text never enters the numerator or the denominator.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lctool.errors import check


@dataclass(frozen=True)
class WindowBatch:
    input_ids: torch.Tensor  # [B, ctx]
    first_scored: torch.Tensor  # [B] window position of the first scored token (>= 1)
    starts: torch.Tensor  # [B] position of the window in the stream

    def scored_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(window index within the batch, target position) of every scored token."""
        ctx = self.input_ids.shape[1]
        rows = [torch.arange(int(f), ctx) for f in self.first_scored]
        window = torch.cat([torch.full((len(r),), i, dtype=torch.long) for i, r in enumerate(rows)])
        return window, torch.cat(rows)


@dataclass(frozen=True)
class WindowPlan:
    ctx: int
    stride: int
    starts: torch.Tensor  # [W]
    first_scored: torch.Tensor  # [W]

    @property
    def num_windows(self) -> int:
        return int(self.starts.numel())

    @property
    def input_tokens(self) -> int:
        return self.num_windows * self.ctx

    @property
    def scored_tokens(self) -> int:
        return int((self.ctx - self.first_scored).sum())

    def scored_positions(self) -> torch.Tensor:
        """Stream positions of all scored tokens, in order."""
        return torch.cat(
            [
                torch.arange(int(s) + int(f), int(s) + self.ctx)
                for s, f in zip(self.starts, self.first_scored, strict=True)
            ]
        )

    def batches(self, ids: torch.Tensor, batch_size: int) -> Iterator[WindowBatch]:
        offsets = torch.arange(self.ctx)
        for begin in range(0, self.num_windows, batch_size):
            starts = self.starts[begin : begin + batch_size]
            yield WindowBatch(
                ids[starts[:, None] + offsets], self.first_scored[begin : begin + batch_size], starts
            )


def plan_windows(num_tokens: int, ctx: int, stride: int | None = None) -> WindowPlan:
    stride = ctx if stride is None else stride
    check(ctx >= 2, f"--ctx must be at least 2 tokens, got {ctx}")
    check(1 <= stride <= ctx, f"--stride must be between 1 and --ctx ({ctx}), got {stride}")
    check(
        num_tokens >= ctx,
        f"the text has {num_tokens} tokens, fewer than one window of --ctx {ctx}; give a longer text or a smaller --ctx",
    )
    starts = torch.arange(0, num_tokens - ctx + 1, stride)
    first_scored = torch.full_like(starts, max(1, ctx - stride))
    first_scored[0] = 1
    return WindowPlan(ctx, stride, starts, first_scored)
