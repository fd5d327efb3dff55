"""Validated options of EvoPress: `lctool prune --method evopress` and `lctool quantize --search evopress`."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from lctool.devices import ComputeOptions

DEFAULT_SPARSITY_LEVELS = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"


def _numbers(value, what: str) -> list[str]:
    """'0,0.1,0.2' or [0, 0.1] -> the decimal strings, as written (they are read exactly later)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = [str(item).strip() for item in items if str(item).strip()]
    for item in out:
        try:
            float(item)
        except ValueError:
            raise ValueError(f"{what}: {item!r} is not a number") from None
    return out


class SearchOptions(ComputeOptions):
    """The evolutionary search and its calibration data (shared by every space).

    `device`/`dtype`: where and in what precision the level database's calibration forward (its
    Hessians stay float32) and every fitness forward of the search run."""

    model_config = ConfigDict(extra="forbid")

    database: str | None = Field(None, description="level database folder: built there when absent, reused when present")
    state: str | None = Field(None, description="JSON state file of the search (default: beside the database)")
    generations: int = Field(50, ge=0, le=100_000)
    offspring: int = Field(16, ge=1, le=4096, description="offspring per generation")
    selection_tokens: list[int] = Field(default_factory=lambda: [1024, 4096, 16384],
                                        description="calibration tokens of each selection step (few, then more)")
    survivors: list[int] = Field(default_factory=lambda: [4, 2, 1], description="candidates kept after each step")
    max_switches: int = Field(3, ge=1, le=64, description="most level switches in one mutation")
    initial_candidates: int = Field(8, ge=1, le=4096, description="random target-meeting starts; the fittest is the first parent")
    calib: str = "wiki"
    calib_n: int = Field(64, ge=1, le=100_000, description="calibration windows (database Hessians and fitness)")
    calib_len: int = Field(256, ge=8, le=1_000_000)
    batch_size: int = Field(8, ge=1, le=4096)
    seed: int = 0

    @field_validator("selection_tokens", "survivors", mode="before")
    @classmethod
    def _int_list(cls, value):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return value

    @model_validator(mode="after")
    def _stages(self):
        if not self.selection_tokens or len(self.selection_tokens) != len(self.survivors):
            raise ValueError("--selection-tokens and --survivors need one entry per selection step")
        if any(t < 1 for t in self.selection_tokens) or any(s < 1 for s in self.survivors):
            raise ValueError("selection tokens and survivors must be positive")
        if self.survivors[-1] != 1:
            raise ValueError("the last selection step keeps exactly one survivor (the next parent)")
        if any(b > a for a, b in zip(self.survivors, self.survivors[1:], strict=False)):
            raise ValueError("--survivors must not grow from one step to the next")
        return self

    def stage_windows(self) -> list[int]:
        """Calibration windows of each selection step (tokens rounded up to whole windows)."""
        return [-(-tokens // self.calib_len) for tokens in self.selection_tokens]


class EvoPressPruneOptions(SearchOptions):
    """`lctool prune --method evopress --space blocks|sparsity --target T`."""

    space: Literal["blocks", "sparsity"]
    target: float = Field(gt=0, description="blocks: fraction of layers (or a count >= 1) dropped; sparsity: average")
    block_unit: Literal["sublayer", "layer"] = Field(
        "sublayer", description="blocks: drop attention and MLP sub-blocks separately, or whole layers")
    sparsity_method: Literal["sparsegpt", "magnitude"] = "sparsegpt"
    levels: list[str] | None = Field(None, description="sparsity levels, evenly spaced (default 0,0.1,...,0.9)")
    damp: float = Field(0.01, gt=0, le=1)

    @field_validator("levels", mode="before")
    @classmethod
    def _levels(cls, value):
        return None if value is None else _numbers(value, "levels")

    @model_validator(mode="after")
    def _space_options(self):
        if self.space == "blocks":
            if self.levels is not None or self.database is not None:
                raise ValueError("--levels and --database do not apply to --space blocks (no weights are stored)")
        else:
            levels = [float(v) for v in self.level_strings()]
            if not all(0 <= v < 1 for v in levels):
                raise ValueError("sparsity levels must lie in [0, 1)")
        return self

    def level_strings(self) -> list[str]:
        if self.space == "blocks":
            return ["0", "1"]
        return self.levels if self.levels is not None else DEFAULT_SPARSITY_LEVELS.split(",")


class EvoPressQuantOptions(SearchOptions):
    """`lctool quantize --search evopress --bits-choices 2,3,4 --target-bits 3` (GPTQ at each bitwidth)."""

    bits_choices: list[str] = Field(default_factory=lambda: ["2", "3", "4"])
    target_bits: float = Field(gt=0)
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    damp: float = Field(0.01, gt=0, le=1)

    @field_validator("bits_choices", mode="before")
    @classmethod
    def _bits(cls, value):
        out = _numbers(value, "bits choices")
        if any(not item.isdigit() for item in out):
            raise ValueError("bits choices must be whole numbers")
        return out

    def level_strings(self) -> list[str]:
        return sorted(self.bits_choices, key=int)
