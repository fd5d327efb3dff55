"""Loading any checkpoint lctool writes for evaluation, and the hook for quantization formats.

Plain, rope-scaled, pruned, merged and vocab-expanded checkpoints, and quantized formats whose stock
loader runs here (GPTQ, AQLM, bitsandbytes, ...), load through stock `AutoModelForCausalLM`.
A quantization format whose stock loader cannot run (SpQR needs CUDA) registers its own:

    from lctool.eval.loaders import register_loader
    register_loader("spqr", load_spqr_reference)   # (path, dtype) -> model in eval mode

`config.json`'s `quantization_config.quant_method` picks the loader. Registered loaders win over the
stock one. Before looking one up, `load_model` imports the modules in `LOADER_MODULES`, so a
quantization package that calls `register_loader` at import time is found without any other wiring.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

import torch

from lctool.errors import LctoolError, check

Loader = Callable[[str, torch.dtype], torch.nn.Module]

# Imported (when present) before a quantized checkpoint is loaded; they may register loaders.
LOADER_MODULES = ("lctool.quant",)

_LOADERS: dict[str, Loader] = {}


def register_loader(quant_method: str, loader: Loader) -> None:
    """Load checkpoints whose `quantization_config.quant_method` is `quant_method` with `loader`."""
    check(isinstance(quant_method, str) and bool(quant_method), "quant_method must be a non-empty string")
    check(callable(loader), "loader must be callable as loader(path, dtype)")
    _LOADERS[quant_method] = loader


def unregister_loader(quant_method: str) -> None:
    _LOADERS.pop(quant_method, None)


def registered_loaders() -> dict[str, Loader]:
    return dict(_LOADERS)


def _import_loader_modules() -> None:
    for name in LOADER_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def quant_method_of(path: str) -> str | None:
    from lctool.io import Checkpoint

    config = Checkpoint(path, check_shapes=False).quantization_config
    if not config:
        return None
    method = config.get("quant_method") if isinstance(config, dict) else None
    check(isinstance(method, str), "config.json: quantization_config has no quant_method")
    return method


def load_model(
    path: str,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """The model of a checkpoint folder, in eval mode (validated by lctool before transformers sees it)."""
    from lctool.io import Checkpoint

    checkpoint = Checkpoint(path)  # one-line errors for missing/corrupt files and shape mismatches
    if checkpoint.config.get("auto_map") and not trust_remote_code:
        raise LctoolError(
            f"{path} runs its own model code (auto_map: {', '.join(sorted(checkpoint.config['auto_map']))}); "
            "pass --trust-remote-code if you trust it"
        )
    from lctool.io.hf import check_buildable

    check_buildable(checkpoint.config)
    method = quant_method_of(path)
    if method is not None:
        _import_loader_modules()
    if method in _LOADERS:
        model = _LOADERS[method](path, dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    if method is None:
        model.to(device)
    return model.eval()


def check_tokenizer_fits(tokenizer, vocab_size: int, what: str = "model") -> None:
    """Refuse a tokenizer with more tokens than the model has embedding rows."""
    size = len(tokenizer)
    if size > vocab_size:
        raise LctoolError(
            f"the tokenizer has {size} tokens but the {what} has vocab_size {vocab_size}: "
            "the tokenizer does not belong to this model"
        )


def same_tokenizer(first, second) -> bool:
    return first.get_vocab() == second.get_vocab() and first.all_special_tokens == second.all_special_tokens


def load_for_eval(
    path: str,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
):
    """(model, tokenizer) of anything lctool writes, checked to belong together."""
    from lctool.io.hf import load_tokenizer

    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code, device=device)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    check_tokenizer_fits(tokenizer, int(config.vocab_size))
    return model, tokenizer
