"""PV-Tuning (Malinovskii et al., 2024, "Beyond Straight-Through Estimation for Extreme LLM
Compression") and the straight-through (STE) fine-tune it is compared against, for AQLM models.

Both fine-tune the whole quantized model against its fp teacher: the loss is the per-token
KL(teacher ‖ student) on calibration windows, with the teacher's logits computed batch by batch.
They run on the shared training loop (lctool.train: accelerate, resumable checkpoints, SIGTERM).

pv   P step: the loop's Adam on every continuous parameter (codebooks, scales, norms, embeddings,
     biases, unquantized layers) by backprop; codes stay fixed.
     V step (after the P step, every `code_every` steps): the gradient G of the loss with respect
     to each dequantized weight Ŵ gives the linearized update W' = Ŵ − lr_v · s_o · m̂/√v̂ (Adam's
     direction per weight; s_o the row's scale, so lr_v is relative to the weights). Only the
     `subspace` fraction of code groups with the largest change ‖W' − Ŵ‖ are re-encoded, by beam
     search against W' with the current codebooks (aqlm.beam_search with a mask). What a V step
     leaves of W' − Ŵ stays pending and adds to the next one (as the authors' straight-through
     buffer does): single steps rarely move a group across to another code, and re-encoding against
     a large one-step W' instead made the KL worse in our tests.
ste  Every quantized weight gets a full-precision shadow W trained by the loop's Adam through the
     straight-through estimator (the forward uses Ŵ, the gradient with respect to Ŵ goes to W);
     every `code_every` steps all codes are re-found by beam search against W. Codebooks, scales
     and the other continuous parameters train as in the P step.

The output is the stock `aqlm` checkpoint format, as written by `lctool quantize --method aqlm`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import Literal

import torch
from pydantic import ConfigDict, Field, field_validator
from torch import nn

from lctool.devices import TrainingComputeOptions
from lctool.errors import LctoolError, check
from lctool.io import Checkpoint, CheckpointWriter
from lctool.quant import aqlm
from lctool.quant.aqlm_job import AqlmLinear, load_aqlm_reference

KL_WINDOWS = 16  # calibration windows the before/after KL is measured on


class PvOptions(TrainingComputeOptions):
    """`dtype`: the autocast of the tuning steps (the student's parameters and the teacher stay float32)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["pv", "ste"]
    steps: int = Field(100, ge=1, le=1_000_000, description="optimizer steps")
    lr: float = Field(1e-4, gt=0, le=1, description="Adam lr of the continuous parameters (ste: and the shadows)")
    v_lr: float = Field(0.1, gt=0, le=100, description="pv: V step size relative to each row's scale")
    subspace: float = Field(0.01, gt=0, le=1, description="pv: fraction of code groups one V step may re-encode")
    code_every: int = Field(1, ge=1, le=1_000_000, description="pv: V step every K steps; ste: re-quantize every K")
    beam_size: int = Field(4, ge=1, le=64)
    batch: int = Field(4, ge=1, le=4096, description="calibration windows per step")
    calib: str = "wiki"
    calib_n: int = Field(128, ge=1, le=100_000)
    calib_len: int = Field(2048, ge=8, le=1_000_000)
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0, description="0: only when interrupted")
    resume: bool = False

    @field_validator("device")
    @classmethod
    def _cpu_only(cls, value: str) -> str:
        # The teacher, the code-update state and the KL windows live on the CPU; nothing moves them yet.
        check(value == "cpu", f"--pv-tune runs on cpu only (not {value})")
        return value


# ---- the tuned linear --------------------------------------------------------------------------------


class TunedAqlmLinear(AqlmLinear):
    """An AqlmLinear whose codes (int64, in [0, 2^B)) the V step or the STE re-quantization may change.

    pv: with `capture` on, the backward adds dL/dŴ into `grad_sum` (the V step's input).
    ste: `shadow` holds the full-precision weight; the forward's value is Ŵ and its gradient reaches
    both the shadow (straight through) and the codebooks and scales (through the decoding).
    """

    def __init__(self, codes, codebooks, scales, bias=None, shadow: bool = False):
        super().__init__(codes.long() % codebooks.shape[1], codebooks, scales, bias)
        self.shadow = nn.Parameter(self.weight_hat().detach().clone()) if shadow else None
        self.capture = False
        self.grad_sum: torch.Tensor | None = None

    @classmethod
    def from_aqlm(cls, module: AqlmLinear, shadow: bool) -> TunedAqlmLinear:
        bias = None if module.bias is None else module.bias.detach()
        return cls(module.codes, module.codebooks.detach(), module.scales.detach(), bias, shadow)

    def _accumulate(self, grad: torch.Tensor) -> None:
        grad = grad.detach().float()
        self.grad_sum = grad.clone() if self.grad_sum is None else self.grad_sum.add_(grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_hat()
        if self.shadow is not None:
            weight = weight + (self.shadow - self.shadow.detach())
        elif self.capture and weight.requires_grad:
            weight.register_hook(self._accumulate)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, weight.to(x.dtype), bias)


def tuned_modules(model: nn.Module) -> dict[str, TunedAqlmLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TunedAqlmLinear)}


def load_student(path: str, method: str) -> nn.Module:
    """The aqlm checkpoint as a float32 model whose quantized linears are TunedAqlmLinear; every
    floating-point parameter trains (codes are buffers)."""
    model = load_aqlm_reference(path, torch.float32)
    for name, module in list(model.named_modules()):
        if isinstance(module, AqlmLinear):
            model.set_submodule(name, TunedAqlmLinear.from_aqlm(module, shadow=method == "ste"))
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


# ---- V step and STE re-quantization ---------------------------------------------------------------


def subspace_size(groups: int, fraction: float) -> int:
    return min(groups, max(1, round(fraction * groups)))


def new_v_state(module: TunedAqlmLinear) -> dict[str, torch.Tensor]:
    shape = (module.out_features, module.in_features)
    return {"pending": torch.zeros(shape), "m": torch.zeros(shape), "v": torch.zeros(shape), "t": torch.zeros(())}


@torch.no_grad()
def v_step(module: TunedAqlmLinear, grad: torch.Tensor, state: dict[str, torch.Tensor], lr: float,
           subspace: float, beam_size: int, betas: tuple[float, float] = (0.9, 0.999)) -> torch.Tensor:
    """One V step on `module`'s codes from the loss gradient `grad` [O, I] with respect to Ŵ.

    W' = Ŵ + P − lr · s_o · m̂/√v̂ (Adam's direction, s_o the row's scale), where P is the update
    earlier V steps left pending: a group's code moves once the pull on it has added up, and P is
    kept relative to Ŵ, so P-step changes of the codebooks and scales carry over. Returns the
    [O, I/g] mask of the re-encoded groups: exactly subspace_size(O·I/g, subspace) of them, those
    with the largest ‖W' − Ŵ‖; codes outside it are unchanged.
    """
    beta1, beta2 = betas
    state["t"] += 1
    t = float(state["t"])
    state["m"].mul_(beta1).add_(grad, alpha=1 - beta1)
    state["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    direction = (state["m"] / (1 - beta1**t)) / ((state["v"] / (1 - beta2**t)).sqrt() + 1e-12)
    rows, groups, _ = module.codes.shape
    g = module.codebooks.shape[-1]
    scales = module.scales.detach().reshape(rows, 1)
    w_hat = module.weight_hat().detach()
    target = w_hat + state["pending"] - lr * scales.abs() * direction
    change = (target - w_hat).reshape(rows, groups, g).norm(dim=-1)
    mask = torch.zeros(rows * groups, dtype=torch.bool)
    mask[change.flatten().topk(subspace_size(rows * groups, subspace)).indices] = True
    mask = mask.reshape(rows, groups)
    codes = aqlm.beam_search(target / scales, None, module.codes, module.codebooks.detach(), beam_size, mask)
    module.codes.copy_(codes)
    state["pending"].copy_(target - module.weight_hat().detach())
    return mask


@torch.no_grad()
def requantize(module: TunedAqlmLinear, beam_size: int) -> int:
    """STE: every code re-found by beam search against the shadow weight; returns how many groups changed."""
    scales = module.scales.detach().reshape(-1, 1)
    codes = aqlm.beam_search(module.shadow.detach() / scales, None, module.codes, module.codebooks.detach(), beam_size)
    changed = int((codes != module.codes).any(-1).sum())
    module.codes.copy_(codes)
    return changed


def _mean_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    from accelerate import PartialState
    from accelerate.utils import reduce

    return reduce(tensor, reduction="mean") if PartialState().num_processes > 1 else tensor


class CodeUpdates:
    """The non-differentiable half of a run: the loop's before_step/after_step hooks and the state
    it checkpoints beside the trainable parameters (codes, V-step moments, change counters)."""

    def __init__(self, model: nn.Module, options: PvOptions):
        self.options = options
        self.modules = tuned_modules(model)
        self.v_states = {n: new_v_state(m) for n, m in self.modules.items()} if options.method == "pv" else {}
        self.changed = torch.zeros((), dtype=torch.float64)  # groups re-encoded to a different code, all steps
        self.updates = torch.zeros((), dtype=torch.float64)  # code update rounds done

    def is_code_step(self, step: int) -> bool:
        return (step + 1) % self.options.code_every == 0

    def before_step(self, step: int, model, batch: dict) -> dict:
        capture = self.options.method == "pv" and self.is_code_step(step)
        for module in self.modules.values():
            module.capture = capture
        return batch

    def after_step(self, step: int, model) -> None:
        if not self.is_code_step(step):
            return
        o = self.options
        for name, module in self.modules.items():
            if o.method == "ste":
                self.changed += requantize(module, o.beam_size)
                continue
            grad = module.grad_sum if module.grad_sum is not None else torch.zeros(module.out_features, module.in_features)
            module.grad_sum, module.capture = None, False
            before = module.codes.clone()
            v_step(module, _mean_over_processes(grad), self.v_states[name], o.v_lr, o.subspace, o.beam_size)
            self.changed += int((module.codes != before).any(-1).sum())
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"{n}.codes": m.codes for n, m in self.modules.items()}
        for name, v_state in self.v_states.items():
            state.update({f"{name}.v_step.{k}": t for k, t in v_state.items()})
        return {**state, "changed": self.changed, "updates": self.updates}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise LctoolError("cannot resume: the checkpoint's code state does not match this model")
        for name, module in self.modules.items():
            module.codes.copy_(state[f"{name}.codes"])
        for name, v_state in self.v_states.items():
            for key, tensor in v_state.items():
                tensor.copy_(state[f"{name}.v_step.{key}"])
        self.changed.copy_(state["changed"])
        self.updates.copy_(state["updates"])

    def changed_fraction(self) -> float:
        groups = sum(m.codes.shape[0] * m.codes.shape[1] for m in self.modules.values())
        return float(self.changed) / max(groups, 1)


# ---- loss ------------------------------------------------------------------------------------------


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) in nats."""
    teacher = teacher_logits.float().log_softmax(-1).flatten(0, -2)
    student = student_logits.float().log_softmax(-1).flatten(0, -2)
    return nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")


def kl_loss(teacher: nn.Module):
    """loss_fn for the loop: the teacher's logits are computed per batch, without a graph."""

    def loss(model, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        with torch.no_grad():
            expected = teacher(input_ids=ids, use_cache=False).logits
        return token_kl(expected, model(input_ids=ids, use_cache=False).logits)

    return loss


@torch.no_grad()
def mean_kl(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, batch: int) -> float:
    was_training = student.training
    student.eval()
    total = 0.0
    for start in range(0, ids.shape[0], batch):
        chunk = ids[start : start + batch]
        kl = token_kl(teacher(input_ids=chunk, use_cache=False).logits, student(input_ids=chunk, use_cache=False).logits)
        total += float(kl) * chunk.numel()
    student.train(was_training)
    return total / ids.numel()


# ---- checks ----------------------------------------------------------------------------------------


def check_reference(student_checkpoint: Checkpoint, reference: Checkpoint) -> None:
    """The teacher must be the unquantized model the aqlm checkpoint was made from (same shapes)."""
    check(not reference.is_quantized, f"--reference {reference.path} is quantized; give the fp model")
    quantized = set(aqlm_module_names(student_checkpoint))
    for name in student_checkpoint.tensor_names():
        module, _, key = name.rpartition(".")
        if module in quantized:
            if key == "codes":
                rows, groups, _ = student_checkpoint.entry(name).shape
                g = student_checkpoint.entry(f"{module}.codebooks").shape[-1]
                _expect_shape(reference, f"{module}.weight", [rows, groups * g])
            continue
        _expect_shape(reference, name, list(student_checkpoint.entry(name).shape))


def _expect_shape(reference: Checkpoint, name: str, shape: list[int]) -> None:
    check(name in reference, f"--reference {reference.path} has no {name}: not the model the aqlm checkpoint was made from")
    found = list(reference.entry(name).shape)
    check(found == shape, f"--reference {reference.path}: {name} is {found}, the aqlm checkpoint needs {shape}")


def aqlm_module_names(checkpoint: Checkpoint) -> list[str]:
    return sorted(n[: -len(".codes")] for n in checkpoint.tensor_names() if n.endswith(".codes"))


def is_aqlm(checkpoint: Checkpoint) -> bool:
    return (checkpoint.quantization_config or {}).get("quant_method") == "aqlm"


# ---- run -------------------------------------------------------------------------------------------


def side_folder(target: str, kind: str) -> str:
    parent, name = os.path.split(os.path.abspath(target))
    return os.path.join(parent, f".{name}.lctool-{kind}")


def check_output(target: str, force: bool) -> None:
    parent = os.path.dirname(os.path.abspath(target))
    check(os.path.isdir(parent), f"output folder's parent {parent} does not exist")
    check(not os.path.lexists(target) or force, f"{target} already exists (pass --force to replace it)")


def prepare_side_folder(folder: str, resume: bool, force: bool) -> None:
    if os.path.isdir(folder) and not resume:
        check(force, f"an interrupted run left {folder}: pass --resume to continue it or --force to start over")
        shutil.rmtree(folder)


def calibration_windows(checkpoint: Checkpoint, options: PvOptions) -> torch.Tensor:
    from lctool.data import calibration_batches
    from lctool.io.hf import load_tokenizer

    ids = calibration_batches(load_tokenizer(checkpoint.path), options.calib, options.calib_n, options.calib_len,
                              seed=options.seed)
    check(tuple(ids.shape) == (options.calib_n, options.calib_len),
          f"calibration gave {tuple(ids.shape)} tokens, not the requested {options.calib_n} x {options.calib_len}")
    return ids


def run_tag(aqlm_checkpoint: Checkpoint, reference: Checkpoint, options: PvOptions, ids: torch.Tensor) -> dict:
    """What a resumed run must share with the interrupted one."""
    import hashlib

    from lctool.io.manifest import describe_input

    fixed = {k: getattr(options, k) for k in ("method", "v_lr", "subspace", "code_every", "beam_size")}
    return {"aqlm": describe_input(aqlm_checkpoint)["shards"], "reference": describe_input(reference)["shards"],
            "pv": fixed, "data_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()}


def tune(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, options: PvOptions, *,
         checkpoint_dir: str | None = None, tag: dict | None = None, log_path: str | None = None,
         progress: bool = True) -> dict:
    """PV-tune (or STE-tune) `student` in place against `teacher` on the windows `ids` [N, T].

    Codebooks, scales and every other parameter are rounded to what the output stores (fp16 for
    codebooks and scales) at the end; returns the results recorded in the manifest.
    """
    from lctool.train import ShuffledWindows, TrainConfig, train

    teacher.eval().requires_grad_(False)
    kl_ids = ids[:KL_WINDOWS]
    before = mean_kl(student, teacher, kl_ids, options.batch)
    codes = CodeUpdates(student, options)
    config = TrainConfig(steps=options.steps, lr=options.lr, schedule="constant", batch_size=options.batch,
                         weight_decay=0.0, seed=options.seed, checkpoint_dir=checkpoint_dir, device=options.device,
                         mixed_precision=options.mixed_precision,
                         checkpoint_every=options.checkpoint_every, resume=options.resume, log_path=log_path,
                         progress=progress, description=f"{options.method}-tune")
    data = ShuffledWindows({"input_ids": ids}, options.batch, seed=options.seed)
    started_cpu = time.process_time()
    result = train(student, data, config, loss_fn=kl_loss(teacher), before_step=codes.before_step,
                   after_step=codes.after_step, extra_state=codes, tag=tag)
    cpu_s = time.process_time() - started_cpu
    round_stored(student)
    after = mean_kl(student, teacher, kl_ids, options.batch)
    steps_run = max(result.steps - result.start_step, 1)
    return {"method": options.method, "kl_before": round(before, 6), "kl_after": round(after, 6),
            "kl_windows": int(kl_ids.shape[0]), "code_updates": int(codes.updates),
            "codes_changed_fraction": round(codes.changed_fraction(), 6),
            "cpu_s": round(cpu_s, 2), "cpu_s_per_step": round(cpu_s / steps_run, 3), **result.summary()}


@torch.no_grad()
def round_stored(model: nn.Module) -> None:
    """Codebooks and scales as stored (fp16)."""
    for module in tuned_modules(model).values():
        module.codebooks.copy_(module.codebooks.half().float())
        module.scales.copy_(module.scales.half().float())


def write_tuned(student: nn.Module, source: Checkpoint, target: str, *, parameters: dict, inputs: list[Checkpoint],
                results: dict, seed: int, force: bool, log_path: str | None = None) -> None:
    """The aqlm checkpoint `source` with the tuned tensors, in its own names and dtypes."""
    modules = tuned_modules(student)
    nbits = source.quantization_config["nbits_per_codebook"]
    state = student.state_dict()
    with CheckpointWriter(target, operation="quantize", parameters=parameters, inputs=inputs, seed=seed,
                          force=force) as writer:
        for name in source.tensor_names():
            module_name, _, key = name.rpartition(".")
            if module_name in modules and key == "codes":
                tensor = aqlm.stored_codes(modules[module_name].codes, nbits)
            else:
                tensor = state[name].detach().to(source.entry(name).torch_dtype).contiguous()
            writer.add_tensor(name, tensor)
        writer.write_config(dict(source.config))
        writer.carry_files(source)
        if log_path and os.path.exists(log_path):
            writer.copy_file(log_path, "train_log.jsonl")
        writer.results.update(results)


def pv_tune(aqlm_path: str, target: str, reference_path: str, options: PvOptions, *, force: bool = False,
            progress: bool = True, parameters: dict | None = None, inputs: list[Checkpoint] | None = None,
            results: dict | None = None) -> dict:
    """PV- or STE-tune the aqlm checkpoint `aqlm_path` against the fp model `reference_path` into `target`."""
    from lctool.io.hf import load_causal_lm

    source = Checkpoint(aqlm_path, check_shapes=False)
    check(is_aqlm(source), f"{aqlm_path} is not an aqlm checkpoint: --pv-tune needs one, or an unquantized model "
                           "quantized in the same run with --method aqlm")
    reference = Checkpoint(reference_path)
    check_reference(source, reference)
    check_output(target, force)
    ids = calibration_windows(source, options)
    folder = side_folder(target, "train")
    prepare_side_folder(folder, options.resume, force)
    student = load_student(aqlm_path, options.method)
    teacher = load_causal_lm(reference_path, dtype=torch.float32)
    log_path = os.path.join(folder, "train_log.jsonl")
    started = time.time()
    pv_results = tune(student, teacher, ids, options, checkpoint_dir=folder, tag=run_tag(source, reference, options, ids),
                      log_path=log_path, progress=progress)
    del teacher
    pv_results["wall_s"] = round(time.time() - started, 2)
    summary = {**(results or {}), "pv_tune": pv_results}
    params = {**(parameters or {"aqlm": source.quantization_config}), "pv_tune": options.model_dump()}
    write_tuned(student, source, target, parameters=params, inputs=inputs or [source, reference],
                results=summary, seed=options.seed, force=force, log_path=log_path)
    shutil.rmtree(folder, ignore_errors=True)
    return {**summary, "output": os.path.abspath(target)}


def quantize_and_tune(source_path: str, target: str, quantize_options, options: PvOptions, *, force: bool = False,
                      progress: bool = True, on_layer=None) -> dict:
    """`lctool quantize FP OUT --method aqlm --pv-tune ...`: AQLM into a side folder, then PV/STE into `target`.

    The side folder (`.<name>.lctool-aqlm`) survives an interruption, so `--resume` does not quantize again.
    """
    from lctool.quant import quantize
    from lctool.quant.api import validate

    check(quantize_options.method == "aqlm", f"--pv-tune tunes aqlm models; --method {quantize_options.method} "
                                             "cannot be PV-tuned (use --method aqlm)")
    source = Checkpoint(source_path)
    validate(source, quantize_options)
    check_output(target, force)
    stage = side_folder(target, "aqlm")
    prepare_side_folder(stage, options.resume, force)
    summary = _finished_stage(stage, source, quantize_options) if options.resume else None
    if summary is None:
        summary = quantize(source_path, stage, quantize_options, force=True, on_layer=on_layer)
    summary = {k: v for k, v in summary.items() if k != "output"}
    tuned = pv_tune(stage, target, source_path, options, force=force, progress=progress,
                    parameters=quantize_options.model_dump(), inputs=[source], results=summary)
    shutil.rmtree(stage, ignore_errors=True)
    return tuned


def _finished_stage(stage: str, source: Checkpoint, quantize_options) -> dict | None:
    """The quantize summary of a complete side folder made from `source` with the same options, else None."""
    from lctool.io.manifest import describe_input

    manifest_path = os.path.join(stage, "lctool.json")
    if not os.path.isfile(manifest_path):
        return None
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    same_options = manifest.get("parameters") == json.loads(json.dumps(quantize_options.model_dump()))
    inputs = manifest.get("inputs") or [{}]
    same_source = inputs[0].get("shards") == describe_input(source)["shards"]
    if not (same_options and same_source):
        raise LctoolError(f"cannot resume: {stage} was quantized from another model or with other options "
                          "(pass --force to start over)")
    return manifest.get("results") or {}


def describe(summary: dict) -> str:
    """One line on the tune for the CLI."""
    pv = summary["pv_tune"]
    change = pv["kl_after"] / pv["kl_before"] if pv["kl_before"] > 0 else math.nan
    return (f"{pv['method']}: KL to the fp model on {pv['kl_windows']} calibration windows {pv['kl_before']:.5f} → "
            f"{pv['kl_after']:.5f} (×{change:.3f}); {pv['steps']} steps, {pv['code_updates']} code updates re-encoding "
            f"{pv['codes_changed_fraction']:.2%} of the groups in all, {pv['cpu_s_per_step']:.2f} CPU s/step, "
            f"{pv['wall_s']:.1f} s")


def pv_quantize(model_path: str, target: str, quantize_options, options: PvOptions, reference: str | None, *,
                force: bool = False, progress: bool = True) -> dict:
    """The CLI's entry: with `quantize_options` (an explicit --method) quantize the fp `model_path` with
    AQLM and tune it against itself; without, tune the aqlm `model_path` against `reference`."""
    checkpoint = Checkpoint(model_path, check_shapes=False)
    if quantize_options is None:
        method = (checkpoint.quantization_config or {}).get("quant_method")
        check(is_aqlm(checkpoint), f"{model_path} is not an aqlm model ({'quant_method ' + method if method else 'unquantized'}):"
                                   " --pv-tune needs one, or --method aqlm to quantize it first")
        check(reference is not None, "--pv-tune of an aqlm model needs --reference, the fp model it was made from")
        return pv_tune(model_path, target, reference, options, force=force, progress=progress)
    check(not is_aqlm(checkpoint), f"{model_path} is already an aqlm model: drop --method to PV-tune it (with --reference)")
    check(reference is None, "--reference is for an aqlm input; with --method aqlm the input itself is the fp reference")
    return quantize_and_tune(model_path, target, quantize_options, options, force=force, progress=progress)
