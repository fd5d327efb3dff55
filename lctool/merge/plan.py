"""From a validated config and lazily opened checkpoints to a list of tensor jobs.

Each job names one output tensor, the input tensors it is made from (model, name), which input is
the base, and the parameters already resolved for it (filters, gradients and precedence as mergekit
resolves them). Everything the merge could object to is found here, before any tensor is read.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from lctool.arch import ModelArch
from lctool.errors import LctoolError
from lctool.io import Checkpoint
from lctool.merge.config import InputSlice, MergeConfig, OutputSlice, evaluate_setting
from lctool.merge.methods import REQUIRED, MergeMethod, Param

VOCAB_ROLES = ("embed", "lm_head")


@dataclass
class TensorJob:
    out_name: str
    models: list[str]  # model references, in config order
    in_names: list[str]
    base: str | None  # the base's reference when it is one of `models`
    shared: dict
    per_input: dict  # model reference -> parameters
    vocab: bool

    @property
    def order_key(self) -> str:
        # mergekit runs tensors in sorted order of their (largest) input name; its random draws follow it.
        return max(self.in_names)


# ---- models -------------------------------------------------------------------------------------


def resolve_model_path(reference: str, config_dir: str | None) -> str:
    """A model reference must be a local checkpoint folder (lctool never downloads)."""
    if "+" in reference and not os.path.isdir(reference):
        raise LctoolError(f"model {reference!r}: LoRA references (model+lora) are not supported; merge the adapter first")
    candidates = [reference]
    if config_dir and not os.path.isabs(reference):
        candidates.append(os.path.join(config_dir, reference))
    for candidate in candidates:
        if os.path.isdir(candidate):
            return os.path.abspath(candidate)
    raise LctoolError(f"model {reference!r} not found: give a local checkpoint folder (lctool never downloads)")


def open_models(config: MergeConfig, config_dir: str | None) -> dict[str, Checkpoint]:
    checkpoints = {}
    for reference in config.referenced_models():
        checkpoint = Checkpoint(resolve_model_path(reference, config_dir))
        if checkpoint.is_quantized:
            raise LctoolError(f"model {reference!r} is quantized; merge full-precision checkpoints")
        checkpoints[reference] = checkpoint
    return checkpoints


def check_same_family(checkpoints: dict[str, Checkpoint], reference: str) -> None:
    first = checkpoints[reference].arch
    for name, checkpoint in checkpoints.items():
        arch = checkpoint.arch
        if arch.name != first.name:
            raise LctoolError(f"model {name!r} is a {arch.name} model but {reference!r} is {first.name}")
        if arch.tied != first.tied:
            raise LctoolError(f"models {reference!r} and {name!r} disagree on tie_word_embeddings")


# ---- parameters ---------------------------------------------------------------------------------


def _validator(param: Param, where: str):
    def validate(value):
        if param.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise LctoolError(f"{where}: parameter {param.name} must be true or false, got {value!r}")
        if isinstance(value, bool):
            raise LctoolError(f"{where}: parameter {param.name} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise LctoolError(f"{where}: parameter {param.name} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise LctoolError(f"{where}: parameter {param.name} must be finite, got {value!r}")
        return number

    return validate


def resolve(param: Param, scopes: list, tensor_name: str, t: float, where: str):
    """The first value any scope (highest precedence first) gives, else the default."""
    for scope in scopes:
        if scope and param.name in scope:
            value = evaluate_setting(tensor_name, scope[param.name], t, _validator(param, where))
            if value is not None:
                return value
    if param.default is REQUIRED:
        raise LctoolError(f"{where}: parameter {param.name} is required by this method")
    return param.default


def check_parameter_names(config: MergeConfig, method: MergeMethod) -> None:
    known = set(method.param_names)
    scopes = [("parameters", config.parameters)]
    for i, entry in enumerate(config.models or []):
        scopes.append((f"models[{i}] ({entry.model}).parameters", entry.parameters))
    for i, output_slice in enumerate(config.slices or []):
        scopes.append((f"slices[{i}].parameters", output_slice.parameters))
        for j, source in enumerate(output_slice.sources):
            scopes.append((f"slices[{i}].sources[{j}].parameters", source.parameters))
    for where, scope in scopes:
        for name in scope or {}:
            if name not in known:
                raise LctoolError(
                    f"{where}: unknown parameter {name!r} for {method.name} (known: {', '.join(method.param_names) or 'none'})"
                )


def check_values(job: TensorJob, method: MergeMethod) -> None:
    """Range checks on the resolved values of one tensor."""
    for model, params in job.per_input.items():
        where = f"{model}: {job.out_name}"
        density = params.get("density")
        if density is not None and not 0 < density <= 1:
            raise LctoolError(f"{where}: density must be in (0, 1], got {density}")
        gamma = params.get("gamma")
        if gamma is not None and not 0 <= gamma < 1:
            raise LctoolError(f"{where}: gamma must be in [0, 1), got {gamma}")
        epsilon = params.get("epsilon")
        if epsilon is not None and density is not None and density < 1:
            if epsilon < 0 or density - epsilon <= 0 or density + epsilon >= 1:
                raise LctoolError(f"{where}: epsilon {epsilon} must keep density ± epsilon inside (0, 1)")
    if job.shared.get("normalize"):
        weights = [p["weight"] for m, p in job.per_input.items() if "weight" in p]
        if weights and abs(math.fsum(weights)) < 1e-8:
            raise LctoolError(f"{job.out_name}: weights sum to 0 but normalize is true")
    t = job.shared.get("t")
    if t is not None and not 0 <= t <= 1:
        raise LctoolError(f"{job.out_name}: slerp t must be in [0, 1], got {t}")


# ---- layout: models or slices -> jobs -----------------------------------------------------------


@dataclass
class SliceLayout:
    definition: OutputSlice
    sources: list[InputSlice]
    base: str | None


def _normalized_slices(config: MergeConfig, checkpoints: dict[str, Checkpoint]) -> list[SliceLayout]:
    """`models:` becomes one slice over every layer, with the base appended when not listed."""
    if config.models:
        sources = [
            InputSlice(model=m.model, layer_range=(0, checkpoints[m.model].arch.num_layers), parameters=m.parameters)
            for m in config.models
        ]
        if config.base_model and config.base_model not in [m.model for m in config.models]:
            layers = checkpoints[config.base_model].arch.num_layers
            sources.append(InputSlice(model=config.base_model, layer_range=(0, layers)))
        definition = OutputSlice(sources=sources)
        return [SliceLayout(definition, sources, config.base_model)]
    layouts = []
    for output_slice in config.slices:
        base = output_slice.base_model or config.base_model
        layouts.append(SliceLayout(output_slice, list(output_slice.sources), base))
    return layouts


def _check_inputs(method: MergeMethod, layout: SliceLayout, label: str) -> None:
    models = [s.model for s in layout.sources]
    if len(set(models)) != len(models):
        raise LctoolError(f"{label}: a model is listed twice")
    base = layout.base if method.needs_base else None
    if method.needs_base and base is None:
        raise LctoolError(f"{method.name} needs a base_model")
    if base is not None and base not in models:
        raise LctoolError(f"{label}: base model {base!r} is not among the inputs")
    if len(models) < method.min_inputs:
        raise LctoolError(f"{method.name} needs at least {method.min_inputs} models (base included), got {len(models)}")
    if method.max_inputs is not None and len(models) > method.max_inputs:
        raise LctoolError(f"{method.name} takes at most {method.max_inputs} models (base included), got {len(models)}")


class Planner:
    def __init__(self, config: MergeConfig, method: MergeMethod, checkpoints: dict[str, Checkpoint]):
        self.config = config
        self.method = method
        self.checkpoints = checkpoints
        self.layouts = _normalized_slices(config, checkpoints)
        for index, layout in enumerate(self.layouts):
            _check_inputs(method, layout, f"slices[{index}]" if config.slices else "models")
            for source in layout.sources:
                layers = checkpoints[source.model].arch.num_layers
                if source.layer_range[1] > layers:
                    raise LctoolError(f"{source.model}: layer_range {list(source.layer_range)} exceeds its {layers} layers")
        self.out_layers = sum(
            layout.sources[0].layer_range[1] - layout.sources[0].layer_range[0] for layout in self.layouts
        )
        reference = self.reference_model
        out_config = dict(checkpoints[reference].config, num_hidden_layers=self.out_layers)
        self.out_arch = ModelArch(out_config)

    @property
    def reference_model(self) -> str:
        """Whose config the output takes: the base, else the first model (as mergekit)."""
        return self.config.base_model or self.config.referenced_models()[0]

    def _job(self, out_name, layout: SliceLayout, in_names, t: float, vocab: bool) -> TensorJob:
        models = [s.model for s in layout.sources]
        base = layout.base if self.method.needs_base else None
        slice_params = layout.definition.parameters
        global_params = self.config.parameters
        shared = {
            p.name: resolve(p, [slice_params, global_params], out_name, t, out_name)
            for p in self.method.params
            if not p.per_input
        }
        per_input = {}
        for source, in_name in zip(layout.sources, in_names, strict=True):
            scopes = [source.parameters, slice_params, global_params]
            per_input[source.model] = {
                p.name: resolve(p, scopes, in_name, t, f"{source.model}: {in_name}")
                for p in self.method.params
                if p.per_input and (source.model != base or not p.non_base)
            }
        job = TensorJob(out_name, models, list(in_names), base, shared, per_input, vocab)
        check_values(job, self.method)
        return job

    def _model_level_names(self, role: str) -> list[str]:
        arch = self.out_arch
        if role == "lm_head" and arch.tied:
            return []
        module = arch.module(role)
        return [n for n in (module + ".weight", module + ".bias") if all(n in c for c in self._layout_models(role))]

    def _layout_models(self, role: str) -> list[Checkpoint]:
        layout = self.layouts[0] if role == "embed" else self.layouts[-1]
        return [self.checkpoints[s.model] for s in layout.sources]

    def jobs(self) -> list[TensorJob]:
        jobs = []
        for name in self._model_level_names("embed"):
            sources = self.layouts[0].sources
            jobs.append(self._job(name, self.layouts[0], [name] * len(sources), 0.0, vocab=True))
        out_layer = 0
        for layout in self.layouts:
            count = layout.sources[0].layer_range[1] - layout.sources[0].layer_range[0]
            for offset in range(count):
                t = offset / (count - 1) if count > 1 else 1.0
                jobs.extend(self._layer_jobs(layout, out_layer, offset, t))
                out_layer += 1
        for role in ("final_norm", "lm_head"):
            for name in self._model_level_names(role):
                sources = self.layouts[-1].sources
                jobs.append(self._job(name, self.layouts[-1], [name] * len(sources), 0.0, vocab=role == "lm_head"))
        return sorted(jobs, key=lambda job: job.order_key)

    def _layer_jobs(self, layout: SliceLayout, out_layer: int, offset: int, t: float) -> list[TensorJob]:
        jobs = []
        for out_name in self.out_arch.layer_tensor_shapes(out_layer):
            role = self.out_arch.classify(out_name)
            in_names = []
            for source in layout.sources:
                arch = self.checkpoints[source.model].arch
                in_names.append(f"{arch.module(role.role, source.layer_range[0] + offset)}.{role.kind}")
            jobs.append(self._job(out_name, layout, in_names, t, vocab=False))
        return jobs

    def ignored_tensors(self, jobs: list[TensorJob]) -> list[str]:
        """Input tensors the architecture map does not know (mergekit ignores them too)."""
        used = {(m, n) for job in jobs for m, n in zip(job.models, job.in_names, strict=True)}
        ignored = set()
        for reference, checkpoint in self.checkpoints.items():
            for name in checkpoint.tensor_names():
                if (reference, name) not in used and checkpoint.arch.classify(name) is None:
                    ignored.add(name)
        return sorted(ignored)
