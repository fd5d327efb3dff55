"""Turning what the caller gives `train` into this process's stream of micro-batches.

`train` accepts any iterable of dicts holding `input_ids` (plus optional `labels`,
`attention_mask`, `position_ids` or keys a custom loss reads):
- 2-D `input_ids` [B, T] are micro-batches, used as they come;
- 1-D `input_ids` [T] are single examples, stacked into micro-batches of `batch_size`.
A re-iterable source (a list, a DataLoader, `ShuffledWindows`) is cycled when it ends; a one-shot
iterator (a generator) ends the run when it runs out. Under several processes each takes every
world-th micro-batch, so a source that yields the same sequence in every process is split
without overlap. Resuming replays the source and skips what was consumed, so a source must yield
the same sequence each time it is created for a resumed run to match an uninterrupted one.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch


def _stack(examples: list[dict]) -> dict:
    keys = examples[0].keys()
    return {k: torch.stack([e[k] for e in examples]) if torch.is_tensor(examples[0][k]) else [e[k] for e in examples]
            for k in keys}


def micro_batches(source: Iterable[dict], batch_size: int) -> Iterator[dict]:
    """Micro-batches from a mix of batches and single examples, cycling a re-iterable source."""
    reiterable = iter(source) is not source
    while True:
        pending: list[dict] = []
        produced = False
        for item in source:
            if not isinstance(item, dict) or "input_ids" not in item:
                raise TypeError("training batches must be dicts holding 'input_ids'")
            if item["input_ids"].dim() >= 2:
                produced = True
                yield item
                continue
            pending.append(item)
            if len(pending) == batch_size:
                produced = True
                yield _stack(pending)
                pending = []
        if not reiterable or not produced:
            return


def process_stream(source: Iterable[dict], batch_size: int, rank: int, world: int, skip: int) -> Iterator[dict]:
    """This process's micro-batches: every world-th one from `rank`, the first `skip` of them dropped."""
    stream = micro_batches(source, batch_size)
    if world > 1:
        stream = itertools.islice(stream, rank, None, world)
    return itertools.islice(stream, skip, None)


class ShuffledWindows:
    """Fixed-length examples served in a seeded random order, epoch after epoch (re-iterable).

    `tensors` maps batch keys to tensors sharing their first dimension (e.g. `input_ids` [N, T]
    and `labels` [N, T]). Each epoch is a fresh permutation drawn from (seed, epoch), so the
    stream is the same every time it is created: what resuming needs.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], batch_size: int, seed: int = 0, drop_last: bool = False):
        sizes = {t.shape[0] for t in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"tensors disagree on the number of examples: {sorted(sizes)}")
        self.tensors = tensors
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.num_examples = sizes.pop()

    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[dict]:
        for epoch in itertools.count():
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_examples, generator=generator)
            for start in range(0, self.num_examples, self.batch_size):
                index = order[start : start + self.batch_size]
                if self.drop_last and len(index) < self.batch_size:
                    break
                yield {k: t[index] for k, t in self.tensors.items()}
