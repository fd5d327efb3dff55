"""Reference modules and loaders for the quantized checkpoints lctool writes, runnable on CPU.

`SpqrLinear` holds a SpQR weight exactly as stored and defines its meaning (formats.spqr_parts);
`load_reference(path)` builds the stock model class from config.json and puts the decoded weights
in. `lctool eval` uses it for `spqr` / `lctool_spqr` (whose stock loader needs CUDA) and for `gptq`
(whose stock loader needs optimum + GPTQModel, kept out of lctool's own dependencies).
"""

from __future__ import annotations

import torch
from torch import nn

from lctool.errors import LctoolError
from lctool.io import Checkpoint
from lctool.quant import formats

SPQR_METHODS = ("spqr", "lctool_spqr")
STORED_KEYS = {
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "spqr": ("dense_weights", "row_offsets", "col_vals", "in_perm"),
    "lctool_spqr": ("dense_codes", "stat_codes", "second_order", "row_offsets", "col_vals", "in_perm"),
}


class SpqrLinear(nn.Module):
    """y = x W_hatᵀ + b for a stored SpQR weight; the dequantized weight is cached on first use (CPU path)."""

    def __init__(self, stored: dict[str, torch.Tensor], qconfig: dict, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qconfig = dict(qconfig)
        for key, tensor in stored.items():
            self.register_buffer(key, tensor)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self._stored_keys = tuple(stored)
        self._weight: torch.Tensor | None = None

    def stored(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key) for key in self._stored_keys}

    def dequantized_weight(self) -> torch.Tensor:
        parts = formats.spqr_parts({k: v.cpu() for k, v in self.stored().items()}, self.qconfig,
                                   self.out_features, self.in_features)
        return parts.weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_kernel(x):
            from lctool.kernels.spqr import spqr_matmul

            y = spqr_matmul(x.reshape(-1, self.in_features), self.dense_weights, self.row_offsets, self.col_vals,
                            self.out_features, self.in_features).reshape(*x.shape[:-1], self.out_features).to(x.dtype)
            return y + self.bias if self.bias is not None else y
        if self._weight is None or self._weight.device != x.device:
            self._weight = self.dequantized_weight().to(x.device)
        return nn.functional.linear(x, self._weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _use_kernel(self, x: torch.Tensor) -> bool:
        return x.is_cuda and self.qconfig.get("quant_method") == "spqr"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant_method={self.qconfig.get('quant_method')}"


def quantized_modules(checkpoint: Checkpoint, method: str) -> list[str]:
    """Module names holding this method's packed tensors."""
    first_key = STORED_KEYS[method][0]
    suffix = "." + first_key
    return sorted(n[: -len(suffix)] for n in checkpoint.tensor_names() if n.endswith(suffix))


def load_reference(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The stock model class holding lctool's CPU reading of a gptq / spqr / lctool_spqr checkpoint."""
    from lctool.quant.engine import hf_config_for, skeleton

    checkpoint = Checkpoint(path, check_shapes=False)
    qconfig = checkpoint.quantization_config or {}
    method = qconfig.get("quant_method")
    if method not in STORED_KEYS:
        raise LctoolError(f"lctool's reference loader reads gptq, spqr and lctool_spqr, not {method!r}")
    hf_config = hf_config_for(checkpoint)
    model = skeleton(hf_config, checkpoint.arch)
    consumed: set[str] = set()
    for module_name in quantized_modules(checkpoint, method):
        linear = model.get_submodule(module_name)
        replacement, names = _reference_module(checkpoint, method, qconfig, module_name, linear, dtype)
        model.set_submodule(module_name, replacement)
        consumed.update(names)
    state = {n: t.to(dtype) if t.is_floating_point() else t for n, t in checkpoint.iter_tensors()
             if n not in consumed}
    model.load_state_dict(state, strict=False, assign=True)
    rotary = checkpoint.arch.family.rotary
    model.set_submodule(rotary, type(model.get_submodule(rotary))(config=hf_config))
    if checkpoint.arch.tied:
        model.tie_weights()
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise LctoolError(f"{path}: tensors missing from the checkpoint: {', '.join(leftover[:3])}")
    return model.eval()


def _reference_module(checkpoint, method, qconfig, module_name, linear, dtype):
    keys = [k for k in (*STORED_KEYS[method], "bias") if f"{module_name}.{k}" in checkpoint]
    stored = {k: checkpoint.get(f"{module_name}.{k}") for k in keys}
    bias = stored.pop("bias", None)
    names = {f"{module_name}.{k}" for k in keys}
    out_f, in_f = linear.out_features, linear.in_features
    if method == "gptq":
        replacement = nn.Linear(in_f, out_f, bias=bias is not None, dtype=dtype)
        weight = formats.gptq_dequantize(stored, formats.gptq_module_bits(qconfig, module_name), in_f, out_f)
        replacement.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if bias is not None:
            replacement.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        return replacement, names
    return SpqrLinear(stored, qconfig, in_f, out_f, None if bias is None else bias.to(dtype)), names
