"""RoPE settings in both config spellings.

transformers v5 writes one dict, `rope_parameters` = {rope_type, rope_theta, factor, ...}; v4 wrote a
top-level `rope_theta` plus an optional `rope_scaling` dict whose type key was `rope_type` or, older,
`type`. lctool reads either and writes the v5 form only (v5 still loads v4 configs, and converts them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lctool.errors import LctoolError

DEFAULT_THETA = 10000.0


@dataclass(frozen=True)
class RopeSettings:
    theta: float
    rope_type: str = "default"
    params: dict = field(default_factory=dict)  # every other key: factor, original_max_position_embeddings, ...
    partial_rotary_factor: float = 1.0

    @property
    def scaled(self) -> bool:
        return self.rope_type != "default"

    @property
    def factor(self) -> float | None:
        return self.params.get("factor")

    def as_v5(self) -> dict:
        out = {"rope_theta": self.theta, "rope_type": self.rope_type, **self.params}
        if self.partial_rotary_factor != 1.0:
            out["partial_rotary_factor"] = self.partial_rotary_factor
        return out


def read_rope(config: dict) -> RopeSettings:
    """RoPE settings of a config in either spelling; v5's `rope_parameters` wins when both exist."""
    params = config.get("rope_parameters")
    if params is None:
        params = config.get("rope_scaling") or {}
        if not isinstance(params, dict):
            raise LctoolError("config.json: rope_scaling must be an object")
        params = dict(params)
        if "rope_theta" in config:
            params.setdefault("rope_theta", config["rope_theta"])
    if not isinstance(params, dict):
        raise LctoolError("config.json: rope_parameters/rope_scaling must be an object")
    params = dict(params)
    theta = params.pop("rope_theta", config.get("rope_theta", DEFAULT_THETA))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    partial = params.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 1:
        raise LctoolError(f"config.json: rope_theta must be a number > 1, got {theta!r}")
    if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
        raise LctoolError(f"config.json: partial_rotary_factor must be a number in (0, 1], got {partial!r}")
    return RopeSettings(float(theta), str(rope_type), params, float(partial))


def write_rope(config: dict, rope: RopeSettings) -> dict:
    """A copy of `config` holding `rope` in the v5 spelling, with the v4 keys removed."""
    out = {k: v for k, v in config.items() if k not in ("rope_scaling", "rope_theta", "rope_parameters")}
    out["rope_parameters"] = rope.as_v5()
    return out
