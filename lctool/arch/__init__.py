"""The architecture map: every op asks this package, and nothing else, for tensor names and roles."""

from lctool.arch.families import ATTN_ROLES, FAMILIES, LINEAR_ROLES, MLP_ROLES, Family
from lctool.arch.model import (
    DROPPED_SUBLAYERS_KEY,
    LAYER_SIZES_KEY,
    SUBLAYER_KINDS,
    ModelArch,
    TensorRole,
    family_of,
    supported_families,
)
from lctool.arch.rope import RopeSettings, read_rope, write_rope

__all__ = [
    "ATTN_ROLES",
    "DROPPED_SUBLAYERS_KEY",
    "FAMILIES",
    "LAYER_SIZES_KEY",
    "LINEAR_ROLES",
    "MLP_ROLES",
    "Family",
    "ModelArch",
    "RopeSettings",
    "SUBLAYER_KINDS",
    "TensorRole",
    "family_of",
    "read_rope",
    "supported_families",
    "write_rope",
]
