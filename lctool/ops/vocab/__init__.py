"""Vocabulary surgery that keeps the model whole: BPE expansion and trimming (`lctool vocab`).

    expand(source, target, ExpandOptions(corpus=..., num_new=..., init="mean"))  -> results dict
    expand(source, target, ExpandOptions(tokens_file=...))
    trim(source, target, TrimOptions(corpus=...))                                -> results dict
    tokens_per_char(tokenizer_dir, text)                                         -> fertility
"""

from lctool.ops.vocab.bpe import ByteLevelBpe
from lctool.ops.vocab.expand import ExpandOptions, expand
from lctool.ops.vocab.init import INIT_METHODS
from lctool.ops.vocab.trim import TrimOptions, trim


def tokens_per_char(tokenizer_dir: str, text: str) -> float:
    """Tokens per character of `text` under the tokenizer in `tokenizer_dir` (no special tokens)."""
    from lctool.ops.vocab.expand import tokens_per_char as _measure

    return _measure(ByteLevelBpe.read(tokenizer_dir).backend(), text)


__all__ = ["INIT_METHODS", "ByteLevelBpe", "ExpandOptions", "TrimOptions", "expand", "tokens_per_char", "trim"]
