"""Validated options of `lctool extend` (one model for every method; training knobs only for the trained ones)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lctool.devices import TrainingComputeOptions

TRAINING_FREE_METHODS = ("linear", "ntk", "dynamic", "yarn", "llama3", "longrope")
TRAINED_METHODS = ("e2llm", "clex")
METHODS = TRAINING_FREE_METHODS + TRAINED_METHODS

Method = Literal["linear", "ntk", "dynamic", "yarn", "llama3", "longrope", "e2llm", "clex"]


class TrainingOptions(TrainingComputeOptions):
    """The short fine-tune behind E²-LLM and CLEX (always at the original length L0).

    `device`/`dtype`: accelerate's device and mixed precision of the run (weights and optimizer state
    stay float32; the output is written in the input's dtypes)."""

    model_config = ConfigDict(extra="forbid")
    corpus: str = Field("wiki", description="text source: corpus name, name:split, or a .txt file")
    steps: int = Field(200, ge=1, le=1_000_000)
    lr: float = Field(2e-4, gt=0, le=1.0)
    warmup_steps: int = Field(10, ge=0)
    batch_size: int = Field(4, ge=1, le=4096)
    grad_accum: int = Field(1, ge=1, le=4096)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    lora_rank: int | None = Field(None, ge=1, le=4096, description="train LoRA on attention instead of all weights")
    lora_alpha: float | None = Field(None, gt=0)
    grad_checkpointing: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = Field(None, ge=1)
    resume: bool = False
    log_path: str | None = None


class ExtendOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Method
    factor: float | None = Field(None, gt=1, description="scale F; derived from target_length / original_length if absent")
    original_length: int | None = Field(None, ge=2, description="L0; read from the input's config if absent")
    target_length: int | None = Field(None, ge=2, description="L; ceil(F·L0) if absent")
    # YaRN
    beta_fast: float = Field(32.0, gt=0)
    beta_slow: float = Field(1.0, gt=0)
    attention_factor: float | None = Field(None, gt=0, description="YaRN/LongRoPE temperature (paper default if absent)")
    # Llama 3.1
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    # LongRoPE: searched rescale factors, one per rotary frequency (dim/2 of them)
    short_factor: list[float] | None = None
    long_factor: list[float] | None = None
    # Trained methods
    training: TrainingOptions = Field(default_factory=TrainingOptions)
    g_max: int | None = Field(None, ge=1, le=1024, description="E²-LLM: largest sampled scale (default ceil(L/L0))")
    t_max: int | None = Field(None, ge=1, le=1024, description="CLEX: largest sampled ODE time (default ceil(L/L0))")
    clex_hidden_factor: int = Field(4, ge=1, le=64, description="CLEX: MLP width as a multiple of the rotary dim")
    clex_step_size: float = Field(0.1, gt=0, le=1.0, description="CLEX: RK4 step in t")
    clex_positions: Literal["consecutive", "runs", "sampled"] = Field(
        "consecutive", description="CLEX: positions of the L0 training tokens in [0, t·L0) (see lctool.ops.clex.train)")
    clex_ode_lr_scale: float = Field(0.001, gt=0, le=1, description="CLEX: the ODE's learning rate as a fraction of lr (0.001: bench/results/extend.md)")
    clex_long_text: bool = Field(False, description="CLEX: read the training tokens at their positions of t·L0-token text")
    clex_run_length: int = Field(32, ge=1, description="CLEX: consecutive positions per run (clex_positions='runs')")

    @model_validator(mode="after")
    def _check(self) -> ExtendOptions:
        if self.beta_fast <= self.beta_slow:
            raise ValueError(f"beta_fast ({self.beta_fast}) must be greater than beta_slow ({self.beta_slow})")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"high_freq_factor ({self.high_freq_factor}) must be greater than low_freq_factor ({self.low_freq_factor})"
            )
        for name in ("short_factor", "long_factor"):
            values = getattr(self, name)
            if values is not None and (not values or any(not v > 0 for v in values)):
                raise ValueError(f"{name} must be a non-empty list of positive numbers")
        if (self.short_factor or self.long_factor) and self.method != "longrope":
            raise ValueError("short_factor/long_factor apply only to --method longrope")
        return self

    @property
    def trained(self) -> bool:
        return self.method in TRAINED_METHODS
