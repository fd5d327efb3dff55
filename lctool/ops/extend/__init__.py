"""`lctool extend`: longer context by RoPE scaling (training-free), E²-LLM or CLEX (short fine-tunes).

    from lctool.ops.extend import ExtendOptions, extend
    extend("model", "model-4x", ExtendOptions(method="yarn", factor=4))
"""

from __future__ import annotations

from lctool.ops.extend.api import extend, plan_extension
from lctool.ops.extend.options import (
    METHODS,
    TRAINED_METHODS,
    TRAINING_FREE_METHODS,
    ExtendOptions,
    TrainingOptions,
)

__all__ = [
    "METHODS",
    "TRAINED_METHODS",
    "TRAINING_FREE_METHODS",
    "ExtendOptions",
    "TrainingOptions",
    "extend",
    "plan_extension",
]
