"""`quantize(source, target, options)`: the operation behind `lctool quantize`.

RTN and GPTQ write the GPTQ checkpoint format (stock transformers + optimum + GPTQModel load it),
SpQR writes Hugging Face's `spqr` format when the configuration allows and `lctool_spqr` otherwise
(formats.py documents both), nf4/int8 go through bitsandbytes' own serialization.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from lctool.errors import LctoolError, check
from lctool.io import Checkpoint, CheckpointWriter
from lctool.io.manifest import peak_rss_mb
from lctool.quant import formats
from lctool.quant.engine import SEQUENTIAL_STAGES, LayerStream
from lctool.quant.gptq import gptq_quantize, hessian_error, rtn_quantize
from lctool.quant.options import QuantizeOptions
from lctool.quant.spqr import SpqrSettings, paper_bits, spqr_quantize

LayerCallback = Callable[[int, int, dict], None]


def spqr_settings(options: QuantizeOptions) -> SpqrSettings:
    return SpqrSettings(
        bits=options.weight_bits,
        beta1=options.group,
        beta2=options.stat_group_size,
        stat_bits=options.stat_bits,
        outlier_threshold=options.outlier_threshold,
        act_order=options.act_order,
        damp=options.damp,
    )


def validate(checkpoint: Checkpoint, options: QuantizeOptions) -> list[str]:
    """One-line errors for everything knowable before work starts; returns the roles to quantize."""
    arch = checkpoint.arch
    if checkpoint.is_quantized:
        method = checkpoint.quantization_config.get("quant_method")
        raise LctoolError(f"{checkpoint.path} is already quantized ({method}); quantize the original model")
    skip = [s for s in options.skip if s != "lm_head"]
    skip_roles = arch.linear_roles(skip) if skip else []
    roles = [r for r in arch.linear_roles("all") if r not in skip_roles]
    check(bool(roles) or options.method in ("nf4", "int8"), "--skip leaves nothing to quantize")
    method, bits, group = options.method, options.weight_bits, options.group
    if method in ("rtn", "gptq"):
        check(bits in formats.GPTQ_BITS, f"--bits {bits}: the GPTQ format stores 2, 3, 4 or 8 bits")
        check(group == -1 or group >= 8, f"--group-size must be -1 (per row) or at least 8, got {group}")
        for role in roles:
            out_f, in_f = arch.linear_shape(role)
            check(group == -1 or in_f % group == 0,
                  f"--group-size {group} does not divide in_features {in_f} of {role} (try a divisor, or -1)")
            check((in_f * bits) % 32 == 0 and (out_f * bits) % 32 == 0,
                  f"{role} ({out_f}x{in_f}) cannot be packed into 32-bit words at {bits} bits")
    if method == "spqr":
        check(options.sym is not True, "spqr uses asymmetric grids (its zero points are quantized); drop --sym")
        check(2 <= group <= 1024, f"--group-size (beta1) for spqr must be 2..1024, got {group}")
        check(all(arch.linear_shape(r)[1] <= 65536 for r in roles), "spqr stores outlier columns in 16 bits: in_features must be ≤ 65536")
    if method == "aqlm":
        from lctool.quant.aqlm_job import validate_aqlm

        validate_aqlm(arch, roles, options)
    if method in ("nf4", "int8"):
        check(options.bits is None and options.group_size is None and not options.act_order,
              f"--bits/--group-size/--act-order do not apply to {method}")
    return roles


def quantize(source: str, target: str, options: QuantizeOptions, *, force: bool = False,
             on_layer: LayerCallback | None = None) -> dict:
    """Quantize `source` into `target`; returns the summary also recorded in the manifest."""
    checkpoint = Checkpoint(source)
    roles = validate(checkpoint, options)
    from lctool.io.hf import check_buildable

    check_buildable(checkpoint.config)
    if options.method in ("nf4", "int8"):
        from lctool.quant.bnb import quantize_bnb

        return quantize_bnb(checkpoint, target, options, force=force)
    started = time.time()
    calibration = calibration_ids(checkpoint, options) if options.needs_calibration else None
    with CheckpointWriter(target, operation="quantize", parameters=options.model_dump(), inputs=[checkpoint],
                          seed=options.seed, force=force) as writer:
        job_class = _Job
        if options.method == "aqlm":
            from lctool.quant.aqlm_job import AqlmJob as job_class
        job = job_class(checkpoint, writer, options, roles, calibration, on_layer)
        with compute_device(options.device):
            summary = job.run()
        summary.update(output=writer.target, wall_s=round(time.time() - started, 3), peak_rss_mb=round(peak_rss_mb(), 1))
        writer.results.update(summary)
    return summary


def compute_device(device: str):
    """New tensors of the per-layer math on `device` (the quantizers allocate without naming one)."""
    import contextlib

    return contextlib.nullcontext() if device == "cpu" else torch.device(device)


def calibration_ids(checkpoint: Checkpoint, options: QuantizeOptions) -> torch.Tensor:
    from lctool.data import calibration_batches
    from lctool.io.hf import load_tokenizer

    tokenizer = load_tokenizer(checkpoint.path)
    ids = calibration_batches(tokenizer, options.calib, options.calib_n, options.calib_len, seed=options.seed)
    check(tuple(ids.shape) == (options.calib_n, options.calib_len),
          f"calibration gave {tuple(ids.shape)} tokens, not the requested {options.calib_n} x {options.calib_len}")
    return ids


class _Job:
    """One quantization run: streams layers, quantizes their linears, writes packed tensors."""

    def __init__(self, checkpoint, writer, options, roles, calibration, on_layer):
        self.checkpoint, self.writer, self.options, self.roles = checkpoint, writer, options, roles
        self.arch = checkpoint.arch
        self.calibration = calibration
        self.on_layer = on_layer
        self.method = options.method
        self.bits = options.weight_bits
        self.settings = spqr_settings(options) if self.method == "spqr" else None
        shapes = [self.arch.linear_shape(r) for r in roles]
        self.hf_spqr = self.method == "spqr" and formats.hf_spqr_allowed(self.settings, shapes) and not any(
            self.arch.has_bias(r) for r in roles)
        self.spqr_shapes: dict[str, int] = {}
        self.totals = {"params": 0, "stored_bits": 0, "outliers": 0}

    # ---- config ------------------------------------------------------------------------------------
    def quant_method(self) -> str:
        if self.method == "spqr":
            return "spqr" if self.hf_spqr else "lctool_spqr"
        return "gptq"

    def not_converted(self) -> list[str]:
        skipped = [self.arch.module(r, i) for i in range(self.arch.num_layers)
                   for r in self.arch.linear_roles("all") if r not in self.roles]
        return [self.arch.module("lm_head"), *skipped]

    def quantization_config(self) -> dict:
        o = self.options
        if self.method in ("rtn", "gptq"):
            config = formats.gptq_quantization_config(self.bits, o.group, self.symmetric, o.act_order, o.damp, [])
            if len(self.roles) < len(self.arch.linear_roles("all")):
                config["modules_in_block_to_quantize"] = [[self.arch.family.layer_modules[r] for r in self.roles]]
            return config
        s = self.settings
        config = {"quant_method": self.quant_method(), "bits": s.bits, "beta1": s.beta1, "beta2": s.beta2,
                  "shapes": self.spqr_shapes, "modules_to_not_convert": self.not_converted()}
        if not self.hf_spqr:
            config.update(stat_bits=s.stat_bits, act_order=s.act_order, outlier_threshold=_finite(s.outlier_threshold),
                          format_version=1)
        return config

    @property
    def symmetric(self) -> bool:
        return self.options.symmetric

    @property
    def float_dtype(self):
        """HF's spqr format is fp16 throughout; the others keep the source dtype."""
        return torch.float16 if self.hf_spqr else None

    # ---- run ---------------------------------------------------------------------------------------
    def run(self) -> dict:
        layers = []
        self._write_model_tensors()
        stream = None
        if self.calibration is not None:
            stream = LayerStream(self.checkpoint, self.calibration, self.options.batch_size,
                                 device=self.options.device, dtype=self.options.torch_dtype)
        for index in range(self.arch.num_layers):
            started = time.time()
            modules = self._layer_with_stream(stream, index) if stream else self._layer_rtn(index)
            record = {"layer": index, "time_s": round(time.time() - started, 3), "modules": modules}
            layers.append(record)
            if self.on_layer:
                self.on_layer(index, self.arch.num_layers, record)
        config = dict(self.checkpoint.config)
        config["quantization_config"] = self.quantization_config()
        if self.float_dtype is not None:
            config["dtype"] = "float16"
            config.pop("torch_dtype", None)
        self.writer.write_config(config)
        self.writer.carry_files(self.checkpoint)
        return self._summary(layers)

    def _summary(self, layers: list[dict]) -> dict:
        params = max(self.totals["params"], 1)
        summary = {
            "method": self.method,
            "quant_method": self.quant_method(),
            "bits": self.bits,
            "group_size": self.options.group,
            "quantized_params": self.totals["params"],
            "bits_per_param_stored": round(self.totals["stored_bits"] / params, 4),
            "mean_error": round(sum(m["error"] for rec in layers for m in rec["modules"].values())
                                / max(sum(len(rec["modules"]) for rec in layers), 1), 6),
            "layers": layers,
        }
        if self.method == "spqr":
            rate = self.totals["outliers"] / params
            summary.update(outlier_rate=round(rate, 6), bits_per_param_paper=round(paper_bits(self.settings, rate), 4),
                           beta1=self.settings.beta1, beta2=self.settings.beta2, stat_bits=self.settings.stat_bits)
        return summary

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.float_dtype is not None and tensor.is_floating_point():
            return tensor.to(self.float_dtype)
        return tensor

    def _write_model_tensors(self) -> None:
        """Everything outside the decoder layers (embeddings, final norm, lm_head), unchanged."""
        names = [n for n in self.checkpoint.tensor_names() if self.arch.layer_of(n) is None]
        for name, tensor in self.checkpoint.iter_tensors(names):
            self.writer.add_tensor(name, self._cast(tensor))

    def _layer_rtn(self, index: int) -> dict:
        tensors = self.checkpoint.layer_tensors(index)
        results = {}
        for role in self.roles:
            weight = tensors.pop(self.arch.weight(role, index)).to(self.options.device, torch.float32)
            bias = tensors.pop(self.arch.module(role, index) + ".bias", None)
            result = rtn_quantize(weight, bits=self.bits, group_size=self.options.group, sym=self.symmetric,
                                  min_zero=0 if self.symmetric else 1)
            results[role] = self._write_grouped(role, index, weight, result, bias, None)
        self._write_rest(tensors)
        return results

    def _sequential_linears(self, stream: LayerStream, layer, tensors: dict, index: int):
        """The layer's roles to quantize, true-sequentially: (role, linear, weight, hessian, bias) each.

        Their tensors are taken out of `tensors` (what remains is written unchanged). The caller must
        put the quantized weight (or module) in place before asking for the next role: a stage's
        Hessians are collected from inputs that already went through the quantized earlier stages.
        """
        for stage in SEQUENTIAL_STAGES:
            stage_roles = tuple(r for r in stage if r in self.roles)
            if not stage_roles:
                continue
            hessians = stream.collect_hessians(layer, stage_roles)
            for role in stage_roles:
                linear = stream.linear(layer, role)
                # Rounded from the checkpoint's values, not from the layer's copy in the stream's dtype.
                weight = tensors.pop(self.arch.weight(role, index)).to(linear.weight.device, torch.float32)
                bias = tensors.pop(self.arch.module(role, index) + ".bias", None)
                yield role, linear, weight, hessians[role], bias
            del hessians

    def _layer_with_stream(self, stream: LayerStream, index: int) -> dict:
        tensors = self.checkpoint.layer_tensors(index)
        layer = stream.load_layer(index, tensors)
        results = {}
        for role, linear, weight, hessian, bias in self._sequential_linears(stream, layer, tensors, index):
            results[role], w_hat = self._quantize_one(role, index, weight, hessian, bias)
            linear.weight.data.copy_(w_hat)  # later stages and the next layer see the quantized weight
        self._write_rest(tensors)
        stream.advance(layer)
        del layer
        return results

    def _quantize_one(self, role, index, weight, hessian, bias) -> tuple[dict, torch.Tensor]:
        o = self.options
        started = time.time()
        if self.method == "gptq":
            result = gptq_quantize(weight, hessian, bits=self.bits, group_size=o.group, sym=self.symmetric,
                                   act_order=o.act_order, damp=o.damp, min_zero=0 if self.symmetric else 1)
            record = self._write_grouped(role, index, weight, result, bias, hessian)
        else:
            result = spqr_quantize(weight, hessian, self.settings)
            record = self._write_spqr(role, index, weight, result, bias, hessian)
        record["time_s"] = round(time.time() - started, 3)
        return record, result.w_hat

    def _write_grouped(self, role, index, weight, result, bias, hessian) -> dict:
        tensors = formats.gptq_tensors(result, self.bits, bias)
        return self._emit(role, index, weight, result.w_hat, tensors, hessian, outliers=0)

    def _write_spqr(self, role, index, weight, result, bias, hessian) -> dict:
        out_f, in_f = weight.shape
        if self.hf_spqr:
            tensors = formats.spqr_hf_tensors(result, out_f, in_f)
            module = self.arch.module(role, index)
            for key, tensor in tensors.items():
                self.spqr_shapes[f"{module}.{key}.shape"] = tensor.shape[0]
        else:
            tensors = formats.spqr_lctool_tensors(result, self.settings, out_f)
        if bias is not None:
            tensors["bias"] = bias
        return self._emit(role, index, weight, result.w_hat, tensors, hessian, outliers=result.outlier_count)

    def _emit(self, role, index, weight, w_hat, tensors, hessian, outliers: int) -> dict:
        module = self.arch.module(role, index)
        stored = formats.stored_bits({k: v for k, v in tensors.items() if k != "bias"})
        for key, tensor in tensors.items():
            self.writer.add_tensor(f"{module}.{key}", tensor.cpu())
        self.totals["params"] += weight.numel()
        self.totals["stored_bits"] += stored
        self.totals["outliers"] += outliers
        record = {"error": round(hessian_error(weight, w_hat, hessian), 6), "bits": round(stored / weight.numel(), 4)}
        if self.method == "spqr":
            record["outlier_rate"] = round(outliers / weight.numel(), 6)
        return record

    def _write_rest(self, tensors: dict[str, torch.Tensor]) -> None:
        """A layer's tensors that stay as they are (norms, skipped linears)."""
        for name, tensor in tensors.items():
            self.writer.add_tensor(name, self._cast(tensor))


def _finite(value: float):
    return value if value != float("inf") else "inf"


