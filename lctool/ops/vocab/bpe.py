"""A byte-level BPE tokenizer as tokenizer.json stores it: vocab, ranked merges, added tokens.

`vocab` expansion and trimming edit exactly these three things and nothing else, so the tokenizer
keeps its normalizer, pre-tokenizer, post-processor and decoder, and stock `AutoTokenizer` reads it.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise

from lctool.errors import LctoolError

TOKENIZER_FILE = "tokenizer.json"
# Cut long texts into pieces of about this many characters before pre-tokenizing (bounded memory;
# the tokenizers library is also fastest on pieces of this order).
PRETOKENIZE_CHUNK_CHARS = 1 << 14
# A newline right after a letter or digit: no byte-level split pattern (GPT-2, Llama 3, Qwen2) joins
# anything across that point, so cutting there leaves the pre-tokenization unchanged.
_SAFE_CUT = re.compile(r"(?<=[^\W_])\n")

Merge = tuple[str, str]


@dataclass
class ByteLevelBpe:
    """The parts of a tokenizer.json that vocabulary surgery touches, plus the rest verbatim."""

    document: dict  # the whole tokenizer.json
    vocab: dict[str, int]  # model.vocab
    merges: list[Merge]  # model.merges in rank order
    added: dict[str, int]  # added_tokens content -> id
    # The normalizer and pre-tokenizer stock transformers actually runs: a tokenizer class (Qwen2Tokenizer...)
    # may impose its own over tokenizer.json's. Words are counted and checked with these.
    stock_splitting: dict | None = None

    @classmethod
    def read(cls, folder: str) -> ByteLevelBpe:
        path = os.path.join(folder, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise LctoolError(f"no {TOKENIZER_FILE} in {folder}: vocab needs a fast byte-level BPE tokenizer")
        from lctool.io.hf import check_tokenizer_json

        check_tokenizer_json(folder)  # size cap, then types and structure as the tokenizers library reads them
        try:
            with open(path, encoding="utf-8") as f:
                document = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise LctoolError(f"{TOKENIZER_FILE} is not valid JSON: {type(e).__name__}") from None
        bpe = cls.from_document(document)
        bpe.stock_splitting = stock_splitting(folder)
        return bpe

    @classmethod
    def from_document(cls, document: dict) -> ByteLevelBpe:
        model = document.get("model") if isinstance(document, dict) else None
        if not isinstance(model, dict):
            raise LctoolError(f"{TOKENIZER_FILE} has no model section")
        kind = model.get("type")
        if kind != "BPE":
            raise LctoolError(f"the tokenizer is {kind or 'not BPE'}, not BPE: vocab works on byte-level BPE only")
        if not _has_byte_level(document.get("pre_tokenizer")):
            raise LctoolError("the tokenizer is BPE but not byte-level (no ByteLevel pre-tokenizer)")
        for option in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(option):
                raise LctoolError(f"BPE with {option} {model[option]!r} is not supported")
        if model.get("dropout"):
            raise LctoolError("BPE dropout is set in tokenizer.json: segmentation would not be deterministic")
        vocab = model.get("vocab")
        if not isinstance(vocab, dict) or not vocab:
            raise LctoolError(f"{TOKENIZER_FILE}: model.vocab is missing or empty")
        merges = [_parse_merge(m) for m in model.get("merges") or []]
        added = {t["content"]: int(t["id"]) for t in document.get("added_tokens") or []}
        return cls(document=document, vocab=dict(vocab), merges=merges, added=added)

    # ---- facts -------------------------------------------------------------------------------------
    @property
    def merges_as_strings(self) -> bool:
        stored = self.document["model"].get("merges") or []
        return bool(stored) and isinstance(stored[0], str)

    @property
    def size(self) -> int:
        """Number of ids in use: one past the largest id of the vocab and the added tokens."""
        return max([*self.vocab.values(), *self.added.values()]) + 1

    def token_strings(self) -> set[str]:
        return set(self.vocab) | set(self.added)

    def id_to_token(self) -> dict[int, str]:
        return {i: t for t, i in {**self.vocab, **self.added}.items()}

    def producers(self) -> dict[str, list[Merge]]:
        """Token -> the merges whose result it is (normally one)."""
        made: dict[str, list[Merge]] = {}
        for a, b in self.merges:
            made.setdefault(a + b, []).append((a, b))
        return made

    # ---- the tokenizers library's view -------------------------------------------------------------
    def backend(self):
        """The `tokenizers.Tokenizer` stock transformers runs for this file (the exact segmentation oracle)."""
        from tokenizers import Tokenizer

        document = self.to_document()
        document.update(self.stock_splitting or {})
        try:
            return Tokenizer.from_str(json.dumps(document))
        except Exception as e:  # noqa: BLE001 - the library's message is the one line worth showing
            raise LctoolError(f"the tokenizers library rejects {TOKENIZER_FILE}: {e}") from None

    def to_document(self) -> dict:
        document = copy.deepcopy(self.document)
        document["model"]["vocab"] = dict(sorted(self.vocab.items(), key=lambda item: item[1]))
        document["model"]["merges"] = [f"{a} {b}" if self.merges_as_strings else [a, b] for a, b in self.merges]
        return document

    def replaced(self, *, vocab: dict[str, int], merges: list[Merge], added: dict[str, int] | None = None) -> ByteLevelBpe:
        """A copy with a new vocab and merges (and remapped added-token ids)."""
        document = copy.deepcopy(self.document)
        added = dict(self.added) if added is None else added
        for entry in document.get("added_tokens") or []:
            entry["id"] = added[entry["content"]]
        return ByteLevelBpe(document=document, vocab=vocab, merges=merges, added=added,
                            stock_splitting=self.stock_splitting)


def stock_splitting(folder: str) -> dict | None:
    """The normalizer and pre-tokenizer of the tokenizer `AutoTokenizer` builds for `folder` (None if it cannot)."""
    try:
        from transformers import AutoTokenizer

        backend = AutoTokenizer.from_pretrained(folder, trust_remote_code=False).backend_tokenizer
    except Exception:  # noqa: BLE001 - without transformers' view, tokenizer.json's own pipeline is the truth
        return None
    pipeline = json.loads(backend.to_str())
    return {"normalizer": pipeline.get("normalizer"), "pre_tokenizer": pipeline.get("pre_tokenizer")}


def _has_byte_level(pre_tokenizer) -> bool:
    if not isinstance(pre_tokenizer, dict):
        return False
    if pre_tokenizer.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in pre_tokenizer.get("pretokenizers") or [])


def _parse_merge(entry) -> Merge:
    if isinstance(entry, str):
        parts = entry.split(" ")
    elif isinstance(entry, list):
        parts = entry
    else:
        parts = []
    if len(parts) != 2 or not all(isinstance(p, str) for p in parts):
        raise LctoolError(f"{TOKENIZER_FILE}: cannot read merge {entry!r}")
    return parts[0], parts[1]


# ---- text -> words -------------------------------------------------------------------------------

def text_chunks(text: str, size: int = PRETOKENIZE_CHUNK_CHARS) -> Iterable[str]:
    """Pieces of about `size` characters, cut only where pre-tokenizers never join across."""
    start = 0
    while start < len(text):
        if len(text) - start <= size:
            yield text[start:]
            return
        cut = _SAFE_CUT.search(text, start + size)
        end = cut.start() if cut else len(text)
        yield text[start:end]
        start = end


def word_counts(backend, text: str) -> Counter:
    """How often each pre-tokenized word (in byte-level form) occurs in `text`."""
    counts: Counter = Counter()
    normalizer, pre_tokenizer = backend.normalizer, backend.pre_tokenizer
    for chunk in text_chunks(text):
        if normalizer is not None:
            chunk = normalizer.normalize_str(chunk)
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(chunk))
    return counts


def segment_words(backend, words: Iterable[str]) -> list[list[str]]:
    """Each word as the tokenizer's model segments it (exact: the library does it)."""
    model = backend.model
    return [[token.value for token in model.tokenize(word)] for word in words]


def apply_merge(tokens: list[str], pair: Merge, merged: str) -> list[str]:
    """Merge every left-to-right, non-overlapping occurrence of `pair`."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        if i + 1 < len(tokens) and tokens[i] == pair[0] and tokens[i + 1] == pair[1]:
            out.append(merged)
            i += 2
        else:
            out.append(tokens[i])
            i += 1
    return out


def apply_ranked_merges(tokens: list[str], ranks: dict[Merge, int]) -> list[str]:
    """BPE on an already segmented word with extra merges of lower priority than all its own.

    Repeatedly merges the lowest-ranked adjacent pair, as the tokenizers library does. Merging every
    occurrence of that pair at once gives the same result, because a merge never re-creates its own
    pair (the merged token differs from both of its parts).
    """
    while len(tokens) > 1:
        candidates = [(ranks[p], p) for p in pairwise(tokens) if p in ranks]
        if not candidates:
            break
        _, pair = min(candidates)
        tokens = apply_merge(tokens, pair, pair[0] + pair[1])
    return tokens


def byte_level_text(token: str) -> str:
    """A byte-level token string as readable text (for reports)."""
    from tokenizers import decoders

    return decoders.ByteLevel().decode([token])
