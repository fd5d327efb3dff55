"""The architecture map: every op asks this package, and nothing else, for tensor names and roles."""

from lctool.arch.families import ATTN_ROLES, FAMILIES, LINEAR_ROLES, MLP_ROLES, Family
from lctool.arch.model import LAYER_SIZES_KEY, ModelArch, TensorRole, family_of, supported_families
from lctool.arch.rope import RopeSettings, read_rope, write_rope

__all__ = [
    "ATTN_ROLES",
    "FAMILIES",
    "LAYER_SIZES_KEY",
    "LINEAR_ROLES",
    "MLP_ROLES",
    "Family",
    "ModelArch",
    "RopeSettings",
    "TensorRole",
    "family_of",
    "read_rope",
    "supported_families",
    "write_rope",
]
