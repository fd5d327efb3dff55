"""The pruning methods `lctool prune --method NAME` knows: each one an options model and a run function.

A new method (e.g. EvoPress) adds a `PruneMethod` to `PRUNE_METHODS`; the CLI passes it the options
the user gave explicitly, so an option another method owns is refused with a one-line error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from lctool.errors import LctoolError
from lctool.prune.evopress.options import EvoPressPruneOptions
from lctool.prune.llm_pruner import run_llm_pruner
from lctool.prune.options import LlmPrunerOptions


@dataclass(frozen=True)
class PruneMethod:
    name: str
    options_class: type[BaseModel]
    run: Callable[..., dict]  # run(source, target, options, *, force, log) -> summary
    summary: str


def _run_evopress(source: str, target: str, options: EvoPressPruneOptions, **kwargs) -> dict:
    from lctool.prune.evopress import run_evopress_prune

    return run_evopress_prune(source, target, options, **kwargs)


PRUNE_METHODS: dict[str, PruneMethod] = {
    "llm-pruner": PruneMethod(
        "llm-pruner", LlmPrunerOptions, run_llm_pruner,
        "structured: attention heads and MLP channels by Taylor/second-order/magnitude importance, LoRA recovery",
    ),
    "evopress": PruneMethod(
        "evopress", EvoPressPruneOptions, _run_evopress,
        "evolutionary search of per-layer levels: dropped attention/MLP blocks or layers, unstructured sparsity",
    ),
}


def method_named(name: str) -> PruneMethod:
    if name not in PRUNE_METHODS:
        raise LctoolError(f"unknown pruning method {name!r} (methods: {', '.join(sorted(PRUNE_METHODS))})")
    return PRUNE_METHODS[name]


def options_for(method: PruneMethod, given: dict) -> BaseModel:
    """The method's validated options from the options given; one naming the first that does not apply."""
    fields = method.options_class.model_fields
    for key in given:
        if key not in fields:
            flag = "--recover-*" if key == "recovery" else f"--{key.replace('_', '-')}"
            raise LctoolError(f"{flag} does not apply to --method {method.name}")
    return method.options_class(**given)


def prune(source: str, target: str, options: BaseModel | dict, *, method: str = "llm-pruner", force: bool = False,
          log: Callable[[str], None] | None = None) -> dict:
    """Prune checkpoint `source` into `target` with `method`; returns the run's summary."""
    chosen = method_named(method)
    if isinstance(options, dict):
        options = options_for(chosen, options)
    elif not isinstance(options, chosen.options_class):
        raise LctoolError(f"--method {method} takes {chosen.options_class.__name__}, not {type(options).__name__}")
    from lctool.io import Checkpoint
    from lctool.io.hf import check_buildable

    check_buildable(Checkpoint(source, check_shapes=False).config)
    return chosen.run(source, target, options, force=force, log=log)
