"""AQLM model plumbing: the layer-by-layer quantization run, the per-block fine-tune, and lctool's
CPU reference reader of `aqlm` checkpoints (for `lctool eval` without the aqlm package).

The run reuses api._Job (streaming, true-sequential stages, writing); per decoder layer it
1. records the fp layer's outputs on the calibration inputs (when fine-tuning),
2. quantizes each linear with aqlm.aqlm_quantize on its stage's Hessian,
3. fine-tunes the block's codebooks, scales and norms (codes fixed) so its outputs match the fp ones,
4. writes codes/codebooks/scales and the tuned norms, and passes the quantized outputs on.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from lctool.errors import LctoolError
from lctool.io import Checkpoint
from lctool.quant import aqlm
from lctool.quant.api import _Job
from lctool.quant.engine import LayerStream
from lctool.quant.gptq import hessian_error

STORED_KEYS = ("codes", "codebooks", "scales")


class AqlmLinear(nn.Module):
    """y = x Ŵᵀ + b with Ŵ = aqlm.dequantize(codes, codebooks, scales); codebooks and scales are trainable."""

    def __init__(self, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("codes", codes)
        self.codebooks = nn.Parameter(codebooks, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.out_features = codes.shape[0]
        self.in_features = codes.shape[1] * codebooks.shape[-1]

    def weight_hat(self) -> torch.Tensor:
        return aqlm.dequantize(self.codes, self.codebooks, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_hat().to(x.dtype)
        return nn.functional.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        m, k, _, g = self.codebooks.shape
        return f"in_features={self.in_features}, out_features={self.out_features}, codebooks={m}x{k}, group={g}"


def settings_from(options) -> aqlm.AqlmSettings:
    return aqlm.AqlmSettings(num_codebooks=options.codebooks, nbits=options.codebook_bits,
                             in_group_size=options.in_group_size, out_group_size=options.out_group_size,
                             beam_size=options.beam_size, rounds=options.aqlm_rounds)


def validate_aqlm(arch, roles: list[str], options) -> None:
    g = options.in_group_size
    if options.bits is not None or options.group_size is not None or options.act_order:
        raise LctoolError("--bits/--group-size/--act-order do not apply to aqlm (use --codebooks, --codebook-bits, --in-group-size)")
    if options.out_group_size != 1:
        raise LctoolError(f"--out-group-size {options.out_group_size}: lctool's AQLM supports only 1")
    for role in roles:
        _, in_f = arch.linear_shape(role)
        if in_f % g:
            raise LctoolError(f"--in-group-size {g} does not divide in_features {in_f} of {role}")


class AqlmJob(_Job):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.aqlm_settings = settings_from(self.options)
        self.generator = torch.Generator(device=self.options.device).manual_seed(self.options.seed)
        self.true_bits = 0

    def quant_method(self) -> str:
        return "aqlm"

    def quantization_config(self) -> dict:
        return aqlm.quantization_config(self.aqlm_settings, self.not_converted())

    def _summary(self, layers: list[dict]) -> dict:
        summary = super()._summary(layers)
        s = self.aqlm_settings
        params = max(self.totals["params"], 1)
        summary.update(bits=None, group_size=None, codebooks=s.num_codebooks, codebook_bits=s.nbits,
                       in_group_size=s.in_group_size, out_group_size=s.out_group_size,
                       bits_per_param_true=round(self.true_bits / params, 4),
                       finetune_steps=self.options.finetune_steps)
        return summary

    def _layer_with_stream(self, stream: LayerStream, index: int) -> dict:
        tensors = self.checkpoint.layer_tensors(index)
        layer = stream.load_layer(index, tensors)
        fp_outputs = stream.run(layer) if self.options.finetune_steps else None
        records, quantized, weights = {}, {}, {}
        for role, _, weight, hessian, bias in self._sequential_linears(stream, layer, tensors, index):
            started = time.time()
            result = aqlm.aqlm_quantize(weight, hessian, self.aqlm_settings, self.generator)
            records[role] = {"error": round(hessian_error(weight, result.w_hat, hessian), 6),
                             "time_s": round(time.time() - started, 3)}
            replacement = AqlmLinear(result.codes, result.codebooks, result.scales,
                                     None if bias is None else bias.float())
            layer.set_submodule(self.arch.family.layer_modules[role], replacement)
            quantized[role], weights[role] = replacement, weight
        if fp_outputs is not None and quantized:
            before, after = finetune_block(stream, layer, fp_outputs, self.options.finetune_steps, self.options.finetune_lr)
            for record in records.values():
                record.update(block_mse_before=before, block_mse_after=after)
        for role, module in quantized.items():
            self._write_aqlm(role, index, module, weights[role], records[role])
        self._write_rest(_tuned_rest(tensors, layer, self.arch.layer_prefix(index)))
        stream.advance(layer)
        return records

    def _write_aqlm(self, role: str, index: int, module: AqlmLinear, weight: torch.Tensor, record: dict) -> None:
        result = aqlm.AqlmResult(codes=module.codes, codebooks=module.codebooks.detach(),
                                 scales=module.scales.detach(), w_hat=module.weight_hat().detach(), errors=[])
        tensors = aqlm.aqlm_tensors(result, self.aqlm_settings.nbits, module.bias)
        module_name = self.arch.module(role, index)
        for key, tensor in tensors.items():
            self.writer.add_tensor(f"{module_name}.{key}", tensor.cpu())
        out_f, in_f = weight.shape
        bits = aqlm.true_bits(out_f, in_f, self.aqlm_settings)
        self.totals["params"] += weight.numel()
        self.totals["stored_bits"] += sum(t.numel() * t.element_size() * 8 for k, t in tensors.items() if k != "bias")
        self.true_bits += bits
        record["bits"] = round(bits / weight.numel(), 4)


def finetune_block(stream: LayerStream, layer: nn.Module, targets: torch.Tensor, steps: int, lr: float):
    """Adam on the block's codebooks, scales and norms (codes fixed) to match the fp block outputs.

    Returns the mean squared error relative to the targets' mean square, before and after. Codebooks
    and scales are rounded to fp16 (as stored) at the end.
    """
    trainable = _trainable_parameters(layer)
    before = _block_mse(stream, layer, targets)
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(trainable, lr=lr)
    batches = list(range(0, stream.hidden.shape[0], stream.batch_size))
    scale = targets.square().mean().clamp_min(1e-30)
    for step in range(steps):
        start = batches[step % len(batches)]
        inputs = stream.hidden[start : start + stream.batch_size]
        expected = targets[start : start + stream.batch_size]
        optimizer.zero_grad()
        out = layer(inputs, position_ids=stream.position_ids, position_embeddings=stream.position_embeddings)
        out = out[0] if isinstance(out, tuple) else out
        loss = (out - expected).square().mean() / scale
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        for parameter in trainable:
            parameter.requires_grad_(False)
        for module in layer.modules():
            if isinstance(module, AqlmLinear):
                module.codebooks.copy_(module.codebooks.half().float())
                module.scales.copy_(module.scales.half().float())
    return before, _block_mse(stream, layer, targets)


def _trainable_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """Codebooks and scales of the AQLM modules plus every non-Linear parameter (the norms)."""
    params = []
    for module in layer.modules():
        if isinstance(module, AqlmLinear):
            params += [module.codebooks, module.scales]
        elif not isinstance(module, nn.Linear):
            params += list(module.parameters(recurse=False))
    return params


def _block_mse(stream: LayerStream, layer: nn.Module, targets: torch.Tensor) -> float:
    outputs = stream.run(layer)
    return round(float((outputs - targets).square().mean() / targets.square().mean().clamp_min(1e-30)), 8)


def _tuned_rest(tensors: dict[str, torch.Tensor], layer: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The layer's remaining tensors (norms, skipped linears) with the values the fine-tune left, in their dtype."""
    state = layer.state_dict()
    out = {}
    for name, tensor in tensors.items():
        local = name[len(prefix) + 1:]
        out[name] = state[local].detach().to("cpu", tensor.dtype) if local in state else tensor
    return out


# ---- reference reader ---------------------------------------------------------------------------


def aqlm_modules(checkpoint: Checkpoint) -> list[str]:
    return sorted(n[: -len(".codes")] for n in checkpoint.tensor_names() if n.endswith(".codes"))


def load_aqlm_reference(path: str, dtype: torch.dtype | None = None) -> nn.Module:
    """The stock model class with AqlmLinear modules decoding the stored codes (no aqlm package needed)."""
    from lctool.quant.engine import hf_config_for, skeleton

    dtype = dtype or torch.float32
    checkpoint = Checkpoint(path, check_shapes=False)
    qconfig = checkpoint.quantization_config or {}
    if qconfig.get("quant_method") != "aqlm":
        raise LctoolError(f"{path} is not an aqlm checkpoint (quant_method {qconfig.get('quant_method')!r})")
    if qconfig.get("out_group_size", 1) != 1:
        raise LctoolError("lctool's aqlm reader supports out_group_size 1 only")
    hf_config = hf_config_for(checkpoint)
    model = skeleton(hf_config, checkpoint.arch)
    consumed: set[str] = set()
    for name in aqlm_modules(checkpoint):
        keys = [k for k in (*STORED_KEYS, "bias") if f"{name}.{k}" in checkpoint]
        stored = {k: checkpoint.get(f"{name}.{k}") for k in keys}
        bias = stored.get("bias")
        module = AqlmLinear(stored["codes"], stored["codebooks"].to(dtype), stored["scales"].to(dtype),
                            None if bias is None else bias.to(dtype))
        model.set_submodule(name, module)
        consumed.update(f"{name}.{k}" for k in keys)
    state = {n: t.to(dtype) if t.is_floating_point() else t for n, t in checkpoint.iter_tensors() if n not in consumed}
    model.load_state_dict(state, strict=False, assign=True)
    rotary = checkpoint.arch.family.rotary
    model.set_submodule(rotary, type(model.get_submodule(rotary))(config=hf_config))
    if checkpoint.arch.tied:
        model.tie_weights()
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise LctoolError(f"{path}: tensors missing from the checkpoint: {', '.join(leftover[:3])}")
    return model.eval()
