"""`vocab trim`: drop the tokens a corpus never uses, and the merges that only produce them.

Kept: every token the corpus segments into, every token on the merge paths that build them, the 256
byte symbols (so any text stays encodable, losslessly), and all added/special tokens. A merge is kept
when its two parts and its result are. The corpus then segments exactly as before (only the ids
change, in order), because every merge BPE applied to it survives and merges were only removed.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from lctool.errors import LctoolError
from lctool.ops.vocab.bpe import ByteLevelBpe, text_chunks
from lctool.ops.vocab.checkpoint import TOKEN_ID_KEYS, open_for_vocab, padded_rows, write_vocab_checkpoint


class TrimOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    corpus: str = Field(description="text whose tokens are kept: corpus name, name:split, or a .txt file")
    split: str = "train"
    pad_to_multiple: int = Field(1, ge=1, le=65536)
    max_shard_size: str = "5GB"


def encoded_ids(backend, text: str) -> list[np.ndarray]:
    return [np.asarray(backend.encode(c, add_special_tokens=False).ids, dtype=np.int64) for c in text_chunks(text)]


def byte_symbols() -> set[str]:
    from tokenizers import pre_tokenizers

    return set(pre_tokenizers.ByteLevel.alphabet())


def kept_tokens(bpe: ByteLevelBpe, used_ids: set[int], pinned_ids: set[int]) -> set[str]:
    """Used and pinned tokens, byte symbols, added tokens, and every merge path building them."""
    by_id = bpe.id_to_token()
    missing = sorted(i for i in pinned_ids if i not in by_id)
    if missing:
        raise LctoolError(f"config names token id {missing[0]}, which the tokenizer does not have")
    keep = {by_id[i] for i in used_ids | pinned_ids} | set(bpe.added) | (byte_symbols() & set(bpe.vocab))
    producers = bpe.producers()
    pending = list(keep)
    while pending:
        for left, right in producers.get(pending.pop(), []):
            for part in (left, right):
                if part not in keep:
                    keep.add(part)
                    pending.append(part)
    return keep


def config_token_ids(config: dict) -> set[int]:
    ids: set[int] = set()
    for key in TOKEN_ID_KEYS:
        value = config.get(key)
        values = value if isinstance(value, list) else [value]
        ids.update(v for v in values if isinstance(v, int) and not isinstance(v, bool))
    return ids


def trimmed_tokenizer(bpe: ByteLevelBpe, keep: set[str]) -> tuple[ByteLevelBpe, dict[int, int]]:
    """The tokenizer holding only `keep`, ids renumbered in their old order; and old id -> new id."""
    everything = {**bpe.vocab, **bpe.added}
    old_ids = sorted(everything[t] for t in keep)
    old_to_new = {old: new for new, old in enumerate(old_ids)}
    vocab = {t: old_to_new[i] for t, i in bpe.vocab.items() if t in keep}
    added = {t: old_to_new[i] for t, i in bpe.added.items()}
    merges = [(a, b) for a, b in bpe.merges if a in keep and b in keep and a + b in keep]
    return bpe.replaced(vocab=vocab, merges=merges, added=added), old_to_new


def check_same_segmentation(trimmed: ByteLevelBpe, text: str, old_chunks: list[np.ndarray], old_to_new: dict[int, int]):
    """The corpus must segment exactly as before, up to the renumbering."""
    lookup = np.full(max(old_to_new) + 1, -1, dtype=np.int64)
    lookup[list(old_to_new)] = list(old_to_new.values())
    for old, new in zip(old_chunks, encoded_ids(trimmed.backend(), text), strict=True):
        if not np.array_equal(lookup[old], new):
            raise RuntimeError("trimming changed the corpus segmentation (a bug in vocab trim)")


def trim(source: str, target: str, options: TrimOptions, force: bool = False) -> dict:
    """Remove tokens `options.corpus` never uses from the checkpoint at `source`, writing `target`."""
    from lctool.data import load_text_source

    checkpoint, bpe = open_for_vocab(source, target, force)
    text = load_text_source(options.corpus, options.split)
    chunks = encoded_ids(bpe.backend(), text)
    used = {int(i) for chunk in chunks for i in np.unique(chunk)}
    keep = kept_tokens(bpe, used, config_token_ids(checkpoint.config))
    trimmed, old_to_new = trimmed_tokenizer(bpe, keep)
    check_same_segmentation(trimmed, text, chunks, old_to_new)
    num_rows = padded_rows(len(old_to_new), options.pad_to_multiple)
    kept_rows = torch.tensor(sorted(old_to_new), dtype=torch.long)

    def build(role: str, old: torch.Tensor) -> torch.Tensor:
        out = old.new_empty(num_rows, old.shape[1])
        out[: len(kept_rows)] = old[kept_rows]
        out[len(kept_rows):] = old[kept_rows].float().mean(dim=0).to(old.dtype)
        return out

    results = {
        "tokens_before": bpe.size,
        "tokens_after": len(old_to_new),
        "tokens_used_by_corpus": len(used),
        "merges_before": len(bpe.merges),
        "merges_after": len(trimmed.merges),
        "vocab_size_before": checkpoint.arch.vocab_size,
        "vocab_size_after": num_rows,
        "tied": checkpoint.arch.tied,
    }
    path = write_vocab_checkpoint(
        checkpoint,
        target,
        operation="vocab-trim",
        parameters=options.model_dump(),
        bpe=trimmed,
        num_rows=num_rows,
        build_rows=build,
        remap_id=lambda i: _remap(old_to_new, i),
        results=results,
        force=force,
        max_shard_size=options.max_shard_size,
    )
    return {"output": path, **results}


def _remap(old_to_new: dict[int, int], old_id: int) -> int:
    if old_id not in old_to_new:
        raise LctoolError(f"token id {old_id} is referenced but was trimmed")
    return old_to_new[old_id]
