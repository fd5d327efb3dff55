"""`align` initialisation: new rows as sparse mixes of old rows, chosen by an auxiliary embedding.

In the spirit of FOCUS (Dobler & de Melo, 2023): an auxiliary static embedding is trained on the target
text tokenized with the *new* tokenizer, so old and new tokens share one space; each new token's row is
a sparsemax-weighted mix of the model rows of its most similar old tokens. The auxiliary model here is
small and built on the spot: positive PMI of windowed co-occurrences, reduced by a truncated SVD.
"""

from __future__ import annotations

import numpy as np
import torch

from lctool.ops.vocab.bpe import text_chunks

AUX_WINDOW = 5
AUX_DIM = 64
AUX_CONTEXTS = 2048  # co-occurrence columns: the most frequent tokens
AUX_MAX_TOKENS = 2_000_000
TOP_K = 10
CONTEXT_SMOOTHING = 0.75


def encode_ids(backend, text: str, max_tokens: int = AUX_MAX_TOKENS) -> np.ndarray:
    ids: list[int] = []
    for chunk in text_chunks(text):
        ids.extend(backend.encode(chunk, add_special_tokens=False).ids)
        if len(ids) >= max_tokens:
            break
    return np.asarray(ids[:max_tokens], dtype=np.int64)


def cooccurrence(ids: np.ndarray, vocab_size: int, window: int, contexts: int) -> tuple[torch.Tensor, np.ndarray]:
    """Sparse [vocab_size, C] counts of context tokens within `window` either side; and the C context ids."""
    frequency = np.bincount(ids, minlength=vocab_size)
    context_ids = np.argsort(-frequency, kind="stable")[: min(contexts, vocab_size)]
    column = np.full(vocab_size, -1, dtype=np.int64)
    column[context_ids] = np.arange(len(context_ids))
    keys = []
    for offset in range(1, window + 1):
        for rows, cols in ((ids[:-offset], ids[offset:]), (ids[offset:], ids[:-offset])):
            where = column[cols]
            keep = where >= 0
            keys.append(rows[keep] * len(context_ids) + where[keep])
    unique, counts = np.unique(np.concatenate(keys), return_counts=True)
    index = torch.from_numpy(np.stack([unique // len(context_ids), unique % len(context_ids)]))
    matrix = torch.sparse_coo_tensor(index, torch.from_numpy(counts.astype(np.float32)),
                                     (vocab_size, len(context_ids)), check_invariants=True).coalesce()
    return matrix, context_ids


def positive_pmi(counts: torch.Tensor) -> torch.Tensor:
    """PPMI with the usual context-distribution smoothing (counts ** 0.75)."""
    index, values = counts.indices(), counts.values()
    total = values.sum()
    row_sum = torch.zeros(counts.shape[0]).index_add_(0, index[0], values)
    col_sum = torch.zeros(counts.shape[1]).index_add_(0, index[1], values) ** CONTEXT_SMOOTHING
    col_prob = col_sum / col_sum.sum()
    pmi = torch.log(values / total) - torch.log(row_sum[index[0]] / total) - torch.log(col_prob[index[1]])
    return torch.sparse_coo_tensor(index, pmi.clamp(min=0), counts.shape, check_invariants=True).coalesce()


def auxiliary_vectors(backend, text: str, vocab_size: int, seed: int) -> torch.Tensor:
    """Unit-length [vocab_size, d] vectors (zero rows for tokens the text never uses)."""
    ids = encode_ids(backend, text)
    matrix = positive_pmi(cooccurrence(ids, vocab_size, AUX_WINDOW, AUX_CONTEXTS)[0])
    rank = min(AUX_DIM, min(matrix.shape) - 1)
    torch.manual_seed(seed)  # svd_lowrank draws its random projection from the global generator
    u, s, _ = torch.svd_lowrank(matrix, q=rank, niter=4)
    vectors = u * s.sqrt()
    return torch.nn.functional.normalize(vectors, dim=1)


def sparsemax(scores: torch.Tensor) -> torch.Tensor:
    """Projection of `scores` onto the probability simplex (Martins & Astudillo, 2016)."""
    ordered, _ = torch.sort(scores, descending=True)
    cumulative = ordered.cumsum(0)
    k = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    support = int((1 + k * ordered > cumulative).sum())
    threshold = (cumulative[support - 1] - 1) / support
    return (scores - threshold).clamp(min=0)


def align_weights(
    backend, text: str, vocab_size: int, new_ids: list[int], old_candidates: list[int], seed: int
) -> list[dict[int, float] | None]:
    """For each new id, {old id: weight} (weights sum to 1), or None where the text gives no evidence."""
    vectors = auxiliary_vectors(backend, text, vocab_size, seed)
    candidates = torch.tensor([i for i in old_candidates if vectors[i].any()], dtype=torch.long)
    if len(candidates) == 0:
        return [None] * len(new_ids)
    candidate_vectors = vectors[candidates]
    weights: list[dict[int, float] | None] = []
    for new_id in new_ids:
        if not vectors[new_id].any():
            weights.append(None)
            continue
        similarity = candidate_vectors @ vectors[new_id]
        top = torch.topk(similarity, min(TOP_K, len(candidates)))
        mix = sparsemax(top.values)
        weights.append({int(candidates[j]): float(w) for j, w in zip(top.indices, mix, strict=True) if w > 0})
    return weights
