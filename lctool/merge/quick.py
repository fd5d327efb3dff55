"""`lctool merge --method ... --base BASE MODEL...`: the same MergeConfig, built from options."""

from __future__ import annotations

from lctool.errors import LctoolError
from lctool.merge.config import MergeConfig, parse_config


def _per_model(values: list[float] | None, count: int, option: str) -> list[float | None]:
    if not values:
        return [None] * count
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise LctoolError(f"{option}: give one value, or one per model ({count}), not {len(values)}")
    return list(values)


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return float(text)
    except ValueError:
        return text


def quick_config(
    method: str,
    models: list[str],
    base: str | None = None,
    weights: list[float] | None = None,
    densities: list[float] | None = None,
    params: list[str] | None = None,
    dtype: str | None = None,
    out_dtype: str | None = None,
    tokenizer_source: str | None = None,
) -> MergeConfig:
    """A config with per-model weight/density and global KEY=VALUE parameters."""
    if not models:
        raise LctoolError("give at least one MODEL to merge")
    entries = []
    for model, weight, density in zip(
        models, _per_model(weights, len(models), "--weight"), _per_model(densities, len(models), "--density"), strict=True
    ):
        parameters = {k: v for k, v in (("weight", weight), ("density", density)) if v is not None}
        entries.append({"model": model, **({"parameters": parameters} if parameters else {})})
    global_params = {}
    for item in params or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LctoolError(f"--param expects KEY=VALUE, got {item!r}")
        global_params[key.strip()] = _parse_value(value.strip())
    data = {
        "merge_method": method,
        "models": entries,
        "base_model": base,
        "parameters": global_params or None,
        "dtype": dtype,
        "out_dtype": out_dtype,
        "tokenizer_source": tokenizer_source,
    }
    return parse_config({k: v for k, v in data.items() if v is not None})
