"""mergekit YAML configurations, read unchanged and validated strictly.

The schema follows mergekit 0.1.5's `MergeConfiguration` (models or slices, base_model, merge_method,
parameters with gradients and filters, dtype, out_dtype, tokenizer_source / tokenizer). Every model
forbids unknown keys, so a typo is an error naming the key rather than a silently ignored setting.
"""

from __future__ import annotations

import os
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from lctool.errors import LctoolError, validation_message

Scalar = bool | int | float | str
ScalarOrGradient = Scalar | list[Scalar]
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
MAX_CONFIG_BYTES = 1024 * 1024


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConditionalParameter(Strict):
    """`{value: ..., filter: self_attn}`: applies to tensors whose name contains `filter`."""

    value: ScalarOrGradient
    filter: str | None = None


ParameterSetting = ConditionalParameter | list[ConditionalParameter] | ScalarOrGradient
Parameters = dict[str, ParameterSetting]


class InputModel(Strict):
    model: str
    parameters: Parameters | None = None


class InputSlice(Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _range_is_ordered(self):
        start, end = self.layer_range
        if not 0 <= start < end:
            raise ValueError(f"layer_range {list(self.layer_range)} must satisfy 0 <= start < end")
        return self


class OutputSlice(Strict):
    sources: list[InputSlice]
    base_model: str | None = None
    residual_weight: float | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _sources_agree(self):
        if not self.sources:
            raise ValueError("a slice needs at least one source")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) != 1:
            raise ValueError("all sources of a slice must span the same number of layers")
        if self.residual_weight is not None:
            raise ValueError("residual_weight is not supported")
        return self


class TokenizerConfig(Strict):
    source: str = "union"
    tokens: dict | None = None
    pad_to_multiple_of: int | None = None

    @model_validator(mode="after")
    def _supported(self):
        if self.tokens:
            raise ValueError("tokenizer.tokens (per-token embedding sources) is not supported")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of <= 0:
            raise ValueError("pad_to_multiple_of must be positive")
        return self


class MergeConfig(Strict):
    """One merge, as a mergekit YAML file spells it."""

    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict | None = None
    base_model: str | None = None
    parameters: Parameters | None = None
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    out_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None

    @model_validator(mode="after")
    def _one_layout(self):
        if self.modules is not None:
            raise ValueError("modules (multi-module architectures) is not supported; use models or slices")
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of models or slices")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give tokenizer_source or tokenizer, not both")
        if self.chat_template is not None:
            raise ValueError("chat_template is not supported; the tokenizer is carried with its own template")
        return self

    @property
    def tokenizer_choice(self) -> str | None:
        """'base', 'union', a model path, or None (inputs must share one tokenizer)."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    @property
    def pad_vocab_to(self) -> int | None:
        return self.tokenizer.pad_to_multiple_of if self.tokenizer is not None else None

    def referenced_models(self) -> list[str]:
        """Every model the config names, base first, without repeats, in config order."""
        names: list[str] = [self.base_model] if self.base_model else []
        for entry in self.models or []:
            names.append(entry.model)
        for output_slice in self.slices or []:
            if output_slice.base_model:
                names.append(output_slice.base_model)
            names.extend(source.model for source in output_slice.sources)
        return list(dict.fromkeys(names))


def parse_config(data: object) -> MergeConfig:
    if not isinstance(data, dict):
        raise LctoolError("merge config must be a YAML mapping")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as e:
        raise LctoolError(f"merge config: {validation_message(e)}") from None


def load_config(path: str) -> MergeConfig:
    """Read and validate a mergekit YAML file (one-line errors for anything wrong)."""
    try:
        size = os.path.getsize(path)
        if size > MAX_CONFIG_BYTES:
            raise LctoolError(f"{path} is {size} bytes, too large for a merge config")
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise LctoolError(f"merge config not found: {path}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise LctoolError(f"{path} is not valid YAML{where}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LctoolError(f"cannot read {path}: {e}") from None
    return parse_config(data)


# ---- parameter settings: filters and gradients --------------------------------------------------


def evaluate_setting(tensor_name: str, setting: ParameterSetting, t: float, validate) -> object:
    """The value a setting gives one tensor at layer position t in [0, 1] (mergekit's rules).

    A list of numbers is a gradient, interpolated piecewise-linearly across the layers; a list of
    conditional values picks the first whose filter is absent, `*`, or a substring of the name.
    """
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return validate(setting)
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        values = [validate(e) for e in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        lower = int(scaled)
        upper = min(len(values) - 1, lower + 1)
        fraction = scaled - lower
        return validate((1 - fraction) * values[lower] + fraction * values[upper])
    for condition in setting:
        if condition.filter in (None, "*") or (tensor_name and condition.filter in tensor_name):
            return evaluate_setting(tensor_name, condition.value, t, validate)
    return None
