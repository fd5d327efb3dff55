"""New BPE merges that continue an existing tokenizer: learned from a corpus, or planned for given tokens.

New merges rank after every old merge, so BPE first runs the old merges to completion (the old
segmentation), then the new ones. A new merge never yields a string already in the vocabulary: then no
old merge can involve its result, and text the new merges do not touch segments exactly as before.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import pairwise

from lctool.errors import LctoolError
from lctool.ops.vocab.bpe import (
    ByteLevelBpe,
    Merge,
    apply_merge,
    apply_ranked_merges,
    segment_words,
    word_counts,
)


@dataclass
class PairStats:
    """Weighted counts of adjacent token pairs over segmented words, and which words hold each pair."""

    words: list[list[str]]
    freqs: list[int]
    counts: dict[Merge, int] = field(default_factory=lambda: defaultdict(int))
    holders: dict[Merge, set[int]] = field(default_factory=lambda: defaultdict(set))

    def __post_init__(self) -> None:
        for index, tokens in enumerate(self.words):
            self._add_pairs(index, tokens, +1)

    def _add_pairs(self, index: int, tokens: list[str], sign: int) -> list[Merge]:
        pairs = list(pairwise(tokens))
        for pair in pairs:
            self.counts[pair] += sign * self.freqs[index]
            if sign > 0:
                self.holders[pair].add(index)
        return pairs

    def merge(self, pair: Merge) -> set[Merge]:
        """Apply `pair` in every word holding it; returns the pairs whose counts grew."""
        merged = pair[0] + pair[1]
        grown: set[Merge] = set()
        for index in self.holders.pop(pair, set()):
            before = self.words[index]
            after = apply_merge(before, pair, merged)
            if after == before:
                continue
            self._add_pairs(index, before, -1)
            grown.update(self._add_pairs(index, after, +1))
            self.words[index] = after
        self.counts.pop(pair, None)
        return grown


def learn_merges(
    words: list[list[str]], freqs: list[int], num_new: int, min_frequency: int, taken: set[str]
) -> list[Merge]:
    """Greedy BPE training continued from the given segmentations: the most frequent pair first.

    Ties go to the lexicographically smallest pair (deterministic). Pairs whose merged string is in
    `taken` are skipped. Raises when fewer than `num_new` pairs reach `min_frequency`.
    """
    stats = PairStats([list(w) for w in words], list(freqs))
    heap = [(-count, pair) for pair, count in stats.counts.items()]
    heapq.heapify(heap)
    taken = set(taken)
    merges: list[Merge] = []
    while heap and len(merges) < num_new:
        negative, pair = heapq.heappop(heap)
        current = stats.counts.get(pair, 0)
        if -negative != current:
            # Stale: the count changed since. Grown counts were pushed afresh; re-push shrunk ones.
            if 0 < current < -negative:
                heapq.heappush(heap, (-current, pair))
            continue
        if current < min_frequency:
            break
        if pair[0] + pair[1] in taken:
            continue
        merges.append(pair)
        taken.add(pair[0] + pair[1])
        for grown in stats.merge(pair):
            heapq.heappush(heap, (-stats.counts[grown], grown))
    if len(merges) < num_new:
        raise LctoolError(
            f"the corpus yields only {len(merges)} new merges occurring at least {min_frequency} times, "
            f"not the {num_new} asked for (give more text, fewer --num-new, or a lower --min-frequency)"
        )
    return merges


def merges_from_corpus(bpe: ByteLevelBpe, text: str, num_new: int, min_frequency: int) -> list[Merge]:
    backend = bpe.backend()
    counts = word_counts(backend, text)
    if not counts:
        raise LctoolError("the corpus holds no text to learn merges from")
    words = list(counts)
    return learn_merges(segment_words(backend, words), [counts[w] for w in words], num_new, min_frequency,
                        bpe.token_strings())


@dataclass
class TokenPlan:
    merges: list[Merge]
    intermediates: list[str]  # tokens added only because a requested token is built from them


def byte_level_words(bpe: ByteLevelBpe, texts: list[str]) -> list[str]:
    """Each requested token text in byte-level form; refuses texts BPE can never make one token."""
    backend = bpe.backend()
    words = []
    for text in texts:
        normalized = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        pieces = [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]
        if len(pieces) != 1:
            raise LctoolError(
                f"token {text!r} is split by the pre-tokenizer into {len(pieces)} pieces: BPE can never make it one token"
            )
        words.append(pieces[0])
    return words


def plan_token_merges(bpe: ByteLevelBpe, words: list[str]) -> TokenPlan:
    """Merges that make each byte-level word a single token (shortest words first, so longer ones reuse them).

    Each step merges the first adjacent pair of the word's current segmentation whose result is new;
    a word none of whose pairs can be merged into a new string is unreachable.
    """
    _refuse_duplicates(bpe, words)
    backend = bpe.backend()
    taken = bpe.token_strings()
    ranks: dict[Merge, int] = {}
    merges: list[Merge] = []
    requested = set(words)
    for word, old_pieces in sorted(zip(words, segment_words(backend, words), strict=True), key=lambda x: (len(x[0]), x[0])):
        pieces = apply_ranked_merges(old_pieces, ranks)
        while len(pieces) > 1:
            pair = next((p for p in pairwise(pieces) if p[0] + p[1] not in taken), None)
            if pair is None:
                raise LctoolError(f"token {byte_level_text_safe(word)!r} is not reachable by new merges "
                                  f"(every join of its pieces {pieces} is already a token)")
            ranks[pair] = len(bpe.merges) + len(merges)
            merges.append(pair)
            taken.add(pair[0] + pair[1])
            pieces = apply_ranked_merges(pieces, ranks)
    intermediates = [a + b for a, b in merges if a + b not in requested]
    return TokenPlan(merges=merges, intermediates=intermediates)


def _refuse_duplicates(bpe: ByteLevelBpe, words: list[str]) -> None:
    seen: set[str] = set()
    existing = bpe.token_strings()
    for word in words:
        if word in seen:
            raise LctoolError(f"token {byte_level_text_safe(word)!r} is listed twice")
        if word in existing:
            raise LctoolError(f"token {byte_level_text_safe(word)!r} is already in the vocabulary")
        seen.add(word)


def byte_level_text_safe(token: str) -> str:
    from lctool.ops.vocab.bpe import byte_level_text

    try:
        return byte_level_text(token)
    except Exception:  # noqa: BLE001 - a report string; fall back to the raw form
        return token
