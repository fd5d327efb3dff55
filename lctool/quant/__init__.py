"""Quantization: the math (grid, gptq, spqr, packing, formats) apart from the model plumbing
(engine: layer streaming + Hessians; api: the `quantize` operation; modules: CPU reference readers).

Importing this package registers lctool's reference loaders with `lctool eval` for the formats it
writes whose stock loaders cannot run here: spqr (needs CUDA), lctool_spqr (lctool's own), and gptq
(stock needs optimum + GPTQModel, which live in a side environment).
"""

from lctool.quant.options import METHODS, QuantizeOptions


def quantize(source: str, target: str, options: QuantizeOptions, **kwargs) -> dict:
    from lctool.quant.api import quantize as run

    return run(source, target, options, **kwargs)


def load_reference(path: str, dtype=None):
    import torch

    from lctool.quant.modules import load_reference as load

    return load(path, dtype or torch.float32)


def _register_eval_loaders() -> None:
    try:
        from lctool.eval.loaders import register_loader
    except ImportError:  # eval not installed in this build
        return
    for method in ("spqr", "lctool_spqr", "gptq"):
        register_loader(method, load_reference)
    register_loader("aqlm", _load_aqlm)


def _load_aqlm(path: str, dtype=None):
    from lctool.quant.aqlm_job import load_aqlm_reference

    return load_aqlm_reference(path, dtype)


_register_eval_loaders()

__all__ = ["METHODS", "QuantizeOptions", "load_reference", "quantize"]
