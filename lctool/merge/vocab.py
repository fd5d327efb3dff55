"""Tokenizers of the inputs: the compatibility check, and mergekit's embedding-row alignment.

Without `tokenizer_source` every input must share one vocabulary (same tokens, same ids, same row
count). With it, the output vocabulary comes from the base (`base`), one model (a path), or the
union of all (`union`), and every input's embedding/lm_head rows are permuted into it the way
mergekit does: a token missing from some inputs takes the row of the only model that has it, else
the base's, else the mean of the models that have it, else zeros; padding rows take the mean row.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch

from lctool.errors import LctoolError
from lctool.io import Checkpoint


def _tokenizer(checkpoint: Checkpoint):
    from lctool.io.hf import load_tokenizer

    if not any(os.path.exists(os.path.join(checkpoint.path, f)) for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    return load_tokenizer(checkpoint.path)


def _same_tokenizer_files(a: Checkpoint, b: Checkpoint) -> bool:
    """Byte-identical tokenizer files (the usual case) need no tokenizer loading."""
    names = [f for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
             if os.path.exists(os.path.join(a.path, f)) or os.path.exists(os.path.join(b.path, f))]
    if not names:
        return True
    for file in names:
        paths = [os.path.join(c.path, file) for c in (a, b)]
        if not all(os.path.exists(p) for p in paths):
            return False
        with open(paths[0], "rb") as x, open(paths[1], "rb") as y:
            if x.read() != y.read():
                return False
    return True


def check_shared_vocabulary(checkpoints: dict[str, Checkpoint], reference: str) -> None:
    """Inputs merged row-by-row must agree on their vocabulary, or the user must say how to align."""
    first = checkpoints[reference]
    first_tokens = None
    for name, checkpoint in checkpoints.items():
        rows, first_rows = checkpoint.arch.vocab_size, first.arch.vocab_size
        if rows != first_rows:
            raise LctoolError(
                f"embedding rows differ ({reference}: {first_rows}, {name}: {rows}); "
                "set tokenizer_source (base, union or a model) to align them"
            )
    for name, checkpoint in checkpoints.items():
        if name == reference or _same_tokenizer_files(first, checkpoint):
            continue
        if first_tokens is None:
            first_tokenizer = _tokenizer(first)
            if first_tokenizer is None:
                return
            first_tokens = first_tokenizer.get_vocab()
        tokenizer = _tokenizer(checkpoint)
        if tokenizer is not None and tokenizer.get_vocab() != first_tokens:
            raise LctoolError(
                f"tokenizers of {reference} and {name} differ; set tokenizer_source (base, union or a model)"
            )


@dataclass
class VocabAlignment:
    tokenizer: object  # the output tokenizer
    vocab: dict[str, int]
    rows: int  # output embedding rows (vocab padded)
    permutations: dict[str, torch.Tensor]  # model -> source row per output id (-1 when absent)

    def align(self, models: list[str], tensors: list[torch.Tensor], base: str | None) -> list[torch.Tensor]:
        """Every input's rows moved to the output ids (mergekit's PermutedVocabulary)."""
        dtype = tensors[0].dtype
        for tensor in tensors[1:]:
            dtype = torch.promote_types(dtype, tensor.dtype)
        maps = torch.stack([self.permutations[m] for m in models])  # [models, vocab]
        present = maps >= 0
        count = present.sum(dim=0)
        incomplete = (count < len(models)).nonzero().flatten().tolist()
        defaults = {i: self._default_row(i, models, tensors, maps, base, dtype) for i in incomplete}
        aligned = []
        for index, tensor in enumerate(tensors):
            out = torch.zeros((self.rows, *tensor.shape[1:]), dtype=dtype)
            source = maps[index]
            have = (source >= 0).nonzero().flatten()
            out[have] = tensor[source[have]].to(dtype)
            for token_id, row in defaults.items():
                if source[token_id] < 0 and row is not None:
                    out[token_id] = row
            if self.rows > len(self.vocab):
                out[len(self.vocab) :] = out[: len(self.vocab)].mean(dim=0)
            aligned.append(out)
        return aligned

    def _default_row(self, token_id, models, tensors, maps, base, dtype):
        holders = [i for i in range(len(models)) if maps[i, token_id] >= 0]
        if len(holders) == 1:
            return tensors[holders[0]][maps[holders[0], token_id]].to(dtype)
        if not holders:
            return torch.zeros(tensors[0].shape[1:], dtype=dtype)
        if base in models and maps[models.index(base), token_id] >= 0:
            i = models.index(base)
            return tensors[i][maps[i, token_id]].to(dtype)
        row = torch.zeros(tensors[0].shape[1:], dtype=dtype)
        for i in holders:
            row = row + tensors[i][maps[i, token_id]].to(dtype)
        return row / len(holders)


def _usable_vocab(tokenizer, rows: int) -> dict[str, int]:
    return {token: index for token, index in tokenizer.get_vocab().items() if index < rows}


def _union_tokenizer(base_tokenizer, tokenizers: dict[str, object], rows: dict[str, int]):
    """The base tokenizer plus every other model's tokens it lacks (mergekit's build_union_tokenizer)."""
    from transformers import AutoTokenizer

    ordinary: dict[str, None] = {}
    added: dict[str, object] = {}
    for model, tokenizer in tokenizers.items():
        added_here = tokenizer.added_tokens_decoder
        added_text = {info.content for info in added_here.values()}
        for token, index in tokenizer.get_vocab().items():
            if index < rows[model] and token not in added_text:
                ordinary.setdefault(token)
        for index, info in added_here.items():
            if index < rows[model]:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as folder:
        base_tokenizer.save_pretrained(folder)
        union = AutoTokenizer.from_pretrained(folder)
    base_vocab = base_tokenizer.get_vocab()
    for token in ordinary:
        if token not in added and token not in base_vocab:
            union.add_tokens(token)
    for info in added.values():
        union.add_tokens(info)
    return union


def build_alignment(checkpoints: dict[str, Checkpoint], base: str, source: str, pad_to: int | None, resolve) -> VocabAlignment:
    """Output tokenizer and per-model row maps for tokenizer_source `base`, `union` or a model."""
    tokenizers = {}
    for name, checkpoint in checkpoints.items():
        tokenizer = _tokenizer(checkpoint)
        if tokenizer is None:
            raise LctoolError(f"model {name!r} has no tokenizer files; tokenizer_source needs every model's tokenizer")
        tokenizers[name] = tokenizer
    rows = {name: c.arch.vocab_size for name, c in checkpoints.items()}
    if source == "base":
        output = tokenizers[base]
        vocab = _usable_vocab(output, rows[base])
    elif source == "union":
        output = _union_tokenizer(tokenizers[base], tokenizers, rows)
        vocab = output.get_vocab()
    else:
        from lctool.io.hf import load_tokenizer

        output = load_tokenizer(resolve(source))
        vocab = output.get_vocab()
    size = len(vocab)
    if pad_to and size % pad_to:
        size += pad_to - size % pad_to
    permutations = {}
    for name, tokenizer in tokenizers.items():
        own = _usable_vocab(tokenizer, rows[name])
        mapping = torch.full((len(vocab),), -1, dtype=torch.long)
        for token, new_id in vocab.items():
            if token in own and new_id < len(vocab):
                mapping[new_id] = own[token]
        permutations[name] = mapping
    return VocabAlignment(output, vocab, size, permutations)
