"""Validated options of `lctool quantize` (shared by the CLI, the Python API and the manifest)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from lctool.devices import ComputeOptions

METHODS = ("rtn", "gptq", "spqr", "nf4", "int8", "aqlm")
DEFAULT_BITS = {"rtn": 4, "gptq": 4, "spqr": 3}
DEFAULT_GROUP = {"rtn": 128, "gptq": 128, "spqr": 16}


class QuantizeOptions(ComputeOptions):
    """`device`: where the calibration forward and the per-layer solves run; `dtype`: the calibration
    forward's weights and activations (Hessians stay float32, the GPTQ/SpQR solves float32/float64,
    weights are rounded from their float32 values; nf4: bitsandbytes' compute dtype). The output's
    format fixes its own dtypes."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["rtn", "gptq", "spqr", "nf4", "int8", "aqlm"]
    bits: int | None = Field(None, ge=2, le=8, description="weight bits (rtn/gptq default 4, spqr 3)")
    group_size: int | None = Field(None, description="input columns per grid (-1: one per row); spqr: beta1")
    sym: bool | None = Field(None, description="symmetric grid (rtn/gptq default True; spqr is asymmetric)")
    act_order: bool = False
    damp: float = Field(0.01, gt=0, le=1)
    calib: str = "wiki"
    calib_n: int = Field(128, ge=1, le=100_000)
    calib_len: int = Field(2048, ge=8, le=1_000_000)
    skip: list[str] = Field(default_factory=list, description="linear roles left unquantized (lm_head always is)")
    seed: int = 0
    # SpQR only
    stat_bits: int = Field(3, ge=2, le=8)
    stat_group_size: int = Field(16, ge=2, le=4096, description="beta2: rows sharing one second-order grid")
    outlier_threshold: float = Field(1.0, ge=0, description="tau, relative; inf disables outliers")
    batch_size: int = Field(8, ge=1, le=4096)
    # AQLM only
    codebooks: int = Field(1, ge=1, le=8, description="aqlm: M, codebooks summed per group")
    codebook_bits: int = Field(8, ge=1, le=16, description="aqlm: B, each codebook holds 2^B vectors")
    in_group_size: int = Field(8, ge=1, le=64, description="aqlm: g, consecutive inputs per vector")
    out_group_size: int = Field(1, ge=1, le=8, description="aqlm: outputs per vector (lctool supports 1)")
    beam_size: int = Field(4, ge=1, le=64, description="aqlm: hypotheses kept per row in the code search")
    aqlm_rounds: int = Field(3, ge=1, le=100, description="aqlm: code search + codebook refit alternations")
    finetune_steps: int = Field(50, ge=0, le=100_000, description="aqlm: Adam steps of the per-block fine-tune (0: off)")
    finetune_lr: float = Field(1e-4, gt=0, le=1)

    @field_validator("outlier_threshold")
    @classmethod
    def _not_nan(cls, value: float) -> float:
        if math.isnan(value):
            raise ValueError("must be a number")
        return value

    @property
    def weight_bits(self) -> int:
        return self.bits if self.bits is not None else DEFAULT_BITS.get(self.method, 4)

    @property
    def group(self) -> int:
        return self.group_size if self.group_size is not None else DEFAULT_GROUP.get(self.method, 128)

    @property
    def symmetric(self) -> bool:
        return True if self.sym is None else self.sym

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "spqr", "aqlm")
