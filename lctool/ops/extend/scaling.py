"""From an input config and the options, the RoPE settings to write: pure functions, no I/O.

Where each method's parameters live (transformers v5 `rope_parameters`):

    linear    rope_type linear,   factor
    ntk       rope_type default,  rope_theta' = theta·F^(d/(d−2))   (v5 has no static "ntk" type)
    dynamic   rope_type dynamic,  factor; max_position_embeddings stays L0, because transformers'
              dynamic NTK reads it as the pre-training length (set it to L and nothing is scaled below L)
    yarn      rope_type yarn,     factor, original_max_position_embeddings, beta_fast, beta_slow, attention_factor
    llama3    rope_type llama3,   factor, original_max_position_embeddings, low_freq_factor, high_freq_factor
    longrope  rope_type longrope, factor, original_max_position_embeddings, short_factor, long_factor, attention_factor
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lctool.arch import ModelArch, RopeSettings
from lctool.errors import LctoolError, check
from lctool.ops.extend import frequencies
from lctool.ops.extend.options import ExtendOptions

# transformers' RoPE types that say which length the model was pre-trained at.
TYPES_WITH_ORIGINAL_LENGTH = ("yarn", "llama3", "longrope")


@dataclass(frozen=True)
class Lengths:
    original: int  # L0
    target: int  # L
    factor: float  # F

    @property
    def whole_factor(self) -> int:
        """ceil(L/L0): the integer scale E²-LLM and CLEX use at the target length."""
        return max(1, math.ceil(self.target / self.original))


@dataclass(frozen=True)
class OriginalRope:
    """The input's RoPE before any scaling: what a new scaling is applied to."""

    rope: RopeSettings
    length: int
    was_scaled: bool


def rotary_dim(arch: ModelArch) -> int:
    return int(arch.head_dim * arch.rope.partial_rotary_factor)


def _previous_extend(manifest: dict | None) -> dict | None:
    if isinstance(manifest, dict) and manifest.get("operation") == "extend":
        return manifest.get("results") or {}
    return None


def original_rope(config: dict, arch: ModelArch, manifest: dict | None) -> OriginalRope:
    """Undo an existing scaling (on paper) to find the pre-training theta and length L0."""
    rope = arch.rope
    max_positions = arch.max_positions
    previous = _previous_extend(manifest)
    if isinstance(previous, dict) and "original_theta" in previous and "original_length" in previous:
        theta, length = previous["original_theta"], previous["original_length"]
        if (isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 1
                or isinstance(length, bool) or not isinstance(length, int) or length <= 0):
            raise LctoolError(f"lctool.json: the previous extend recorded original_theta {theta!r} and "
                              f"original_length {length!r}; expected a number > 1 and a positive integer")
        unscaled = RopeSettings(float(theta), "default", {}, rope.partial_rotary_factor)
        return OriginalRope(unscaled, length, True)
    unscaled = RopeSettings(rope.theta, "default", {}, rope.partial_rotary_factor)
    was_scaled = rope.scaled or "clex" in config
    if rope.rope_type in TYPES_WITH_ORIGINAL_LENGTH and rope.params.get("original_max_position_embeddings"):
        length = int(rope.params["original_max_position_embeddings"])
    elif rope.rope_type == "linear" and rope.factor and max_positions:
        length = round(max_positions / float(rope.factor))
    elif "clex" in config:
        length = int(config["clex"].get("original_length") or max_positions or 0)
    else:
        length = max_positions or 0
    if rope.scaled and rope.rope_type not in ("linear", "dynamic", *TYPES_WITH_ORIGINAL_LENGTH):
        raise LctoolError(f"cannot undo the existing RoPE scaling of type {rope.rope_type!r}")
    return OriginalRope(unscaled, length, was_scaled)


def resolve_lengths(options: ExtendOptions, default_original: int) -> Lengths:
    """L0, L and F from whichever of them were given (F = L/L0, or L = ceil(F·L0))."""
    original = options.original_length or default_original
    check(original >= 2, "the input's config has no max_position_embeddings: pass --original-length")
    if options.target_length is not None:
        check(
            options.target_length > original,
            f"target length {options.target_length} is not longer than the original length {original}",
        )
    if options.factor is None:
        check(options.target_length is not None, "pass --factor or --target-length")
        factor = options.target_length / original
    else:
        factor = options.factor
    target = options.target_length or math.ceil(factor * original)
    return Lengths(original, target, float(factor))


def scaled_rope(method: str, base: RopeSettings, dim: int, lengths: Lengths, options: ExtendOptions) -> tuple[RopeSettings, int]:
    """The RoPE settings a training-free method writes, and the config's new max_position_embeddings."""
    factor, original, target = lengths.factor, lengths.original, lengths.target
    partial = base.partial_rotary_factor
    if method == "linear":
        return RopeSettings(base.theta, "linear", {"factor": factor}, partial), target
    if method == "ntk":
        return RopeSettings(frequencies.ntk_theta(base.theta, dim, factor), "default", {}, partial), target
    if method == "dynamic":
        return RopeSettings(base.theta, "dynamic", {"factor": factor}, partial), original
    if method == "yarn":
        attention = options.attention_factor or frequencies.yarn_attention_factor(factor)
        params = {
            "factor": factor,
            "original_max_position_embeddings": original,
            "beta_fast": float(options.beta_fast),
            "beta_slow": float(options.beta_slow),
            "attention_factor": float(attention),
        }
        return RopeSettings(base.theta, "yarn", params, partial), target
    if method == "llama3":
        params = {
            "factor": factor,
            "original_max_position_embeddings": original,
            "low_freq_factor": float(options.low_freq_factor),
            "high_freq_factor": float(options.high_freq_factor),
        }
        return RopeSettings(base.theta, "llama3", params, partial), target
    if method == "longrope":
        return RopeSettings(base.theta, "longrope", _longrope_params(base, dim, lengths, options), partial), target
    raise LctoolError(f"{method} is not a training-free method")


def _longrope_params(base: RopeSettings, dim: int, lengths: Lengths, options: ExtendOptions) -> dict:
    """LongRoPE's searched factors when given; otherwise short = 1 (the model as trained) and
    long = YaRN's NTK-by-parts divisors, a training-free starting point for the search."""
    count = dim // 2
    short = options.short_factor or [1.0] * count
    long = options.long_factor or frequencies.yarn_rescale_factors(
        base.theta, dim, lengths.factor, lengths.original, options.beta_fast, options.beta_slow
    )
    for name, values in (("short_factor", short), ("long_factor", long)):
        check(len(values) == count, f"{name} needs {count} values (one per rotary frequency), got {len(values)}")
    attention = options.attention_factor or frequencies.longrope_attention_factor(lengths.factor, lengths.original)
    return {
        "factor": lengths.factor,
        "original_max_position_embeddings": lengths.original,
        "short_factor": [float(v) for v in short],
        "long_factor": [float(v) for v in long],
        "attention_factor": float(attention),
    }


def expected_frequencies(rope: RopeSettings, dim: int, original_length: int, seq_len: int | None = None):
    """(inv_freq, attention_scaling) lctool's own formulas give for written settings at `seq_len`."""
    p = rope.params
    kind = rope.rope_type
    if kind == "default":
        return frequencies.base_inv_freq(rope.theta, dim), 1.0
    if kind == "linear":
        return frequencies.linear_inv_freq(rope.theta, dim, p["factor"])
    if kind == "dynamic":
        return frequencies.dynamic_inv_freq(rope.theta, dim, p["factor"], original_length, seq_len or original_length)
    if kind == "yarn":
        return frequencies.yarn_inv_freq(
            rope.theta, dim, p["factor"], p["original_max_position_embeddings"], p.get("beta_fast", 32.0),
            p.get("beta_slow", 1.0), p.get("attention_factor"),
        )
    if kind == "llama3":
        return frequencies.llama3_inv_freq(
            rope.theta, dim, p["factor"], p["original_max_position_embeddings"], p["low_freq_factor"], p["high_freq_factor"]
        )
    if kind == "longrope":
        original = p["original_max_position_embeddings"]
        rescale = p["long_factor"] if seq_len and seq_len > original else p["short_factor"]
        return frequencies.longrope_inv_freq(rope.theta, dim, rescale, p["factor"], original, p.get("attention_factor"))
    raise LctoolError(f"unknown rope type {kind!r}")
