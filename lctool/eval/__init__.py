"""Evaluation: perplexity, bits-per-byte, perplexity versus length, passkey retrieval, KL to a reference.

Every function takes a loaded model (`load_for_eval`) or, for perplexity and KL, a `LayerwiseRunner`
that streams a checkpoint one decoder layer at a time. Exactly which tokens and bytes are scored is
documented in `lctool.eval.windows` and `lctool.eval.tokens`.
"""

from lctool.eval.loaders import (
    load_for_eval,
    load_model,
    register_loader,
    registered_loaders,
    unregister_loader,
)
from lctool.eval.passkey import passkey_accuracy
from lctool.eval.progress import Tracker
from lctool.eval.run import EvalOptions, evaluate
from lctool.eval.runners import InMemoryRunner, LayerwiseRunner
from lctool.eval.scoring import kl_divergence, kl_of_stream, perplexity, perplexity_of_stream, ppl_vs_length
from lctool.eval.tokens import TokenStream, tokenize_stream

__all__ = [
    "EvalOptions",
    "InMemoryRunner",
    "LayerwiseRunner",
    "TokenStream",
    "Tracker",
    "evaluate",
    "kl_divergence",
    "kl_of_stream",
    "load_for_eval",
    "load_model",
    "passkey_accuracy",
    "perplexity",
    "perplexity_of_stream",
    "ppl_vs_length",
    "register_loader",
    "registered_loaders",
    "tokenize_stream",
    "unregister_loader",
]
