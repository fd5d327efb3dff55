"""Structural pruning: `prune(source, target, options, method="llm-pruner")`.

    from lctool.prune import LlmPrunerOptions, prune
    summary = prune("model", "model-pruned", LlmPrunerOptions(ratio=0.2, importance="taylor-element"))

Methods live in `PRUNE_METHODS` (lctool.prune.methods); see lctool.prune.groups for the coupled
structures and the GQA choice, lctool.prune.importance for the estimators, lctool.prune.plan for
the ranking, lctool.prune.surgery for the output format.
"""

from lctool.prune.methods import PRUNE_METHODS, PruneMethod, method_named, options_for, prune
from lctool.prune.options import IMPORTANCE_KINDS, LlmPrunerOptions, RecoveryOptions

__all__ = ["IMPORTANCE_KINDS", "PRUNE_METHODS", "LlmPrunerOptions", "PruneMethod", "RecoveryOptions",
           "method_named", "options_for", "prune"]
