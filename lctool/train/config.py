"""What a training run is asked to do (TrainConfig) and what it reports back (TrainResult)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, field_validator, model_validator


class TrainConfig(BaseModel):
    """Options of one training run; hooks may be given here or as keyword arguments of `train`.

    `batch_size` is the number of sequences per micro-batch: `train` stacks 1-D examples into
    micro-batches of this size, and takes 2-D `input_ids` batches as they come. One optimizer step
    consumes `grad_accum` micro-batches per process.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    steps: int = Field(gt=0, description="optimizer steps to reach (counted from step 0, resumes included)")
    lr: float = Field(gt=0, le=1.0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of lr (cosine/linear)")
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_scales: dict[str, PositiveFloat] = Field(default_factory=dict, description="name fragment -> lr multiplier "
                                        "for the parameters whose name contains it (e.g. a small module's own lr)")
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = Field(1.0, ge=0, description="0 turns clipping off")
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    device: str = Field("auto", validate_default=True, description="auto: cuda if present (accelerate's device per process), else cpu; cpu forces accelerate's CPU mode; cuda/cuda:N/mps are accelerate's device")
    grad_checkpointing: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every: int = Field(0, ge=0, description="0: only when interrupted")
    keep_checkpoints: int = Field(1, ge=1)
    resume: bool = False
    log_path: str | None = None
    log_every: int = Field(1, ge=1, description="progress refresh interval (the JSONL log has every step)")
    eval_every: int = Field(0, ge=0)
    eval_fn: Callable | None = Field(None, exclude=True, description="eval_fn(model) -> dict or float")
    loss_fn: Callable | None = Field(None, exclude=True, description="loss_fn(model, batch) -> scalar loss")
    before_step: Callable | None = Field(None, exclude=True, description="before_step(step, model, batch) -> batch")
    after_step: Callable | None = Field(None, exclude=True, description="after_step(step, model) after each optimizer step")
    extra_state: Any = Field(None, exclude=True, description="state_dict()/load_state_dict() of tensors the run "
                                                             "changes outside the trainable parameters (checkpointed)")
    progress: bool = True
    description: str = "train"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        from lctool.devices import check_device

        return check_device(value)

    @model_validator(mode="after")
    def _checks(self) -> TrainConfig:
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume needs a checkpoint_dir")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every needs a checkpoint_dir")
        if self.mixed_precision == "fp16" and self.device == "cpu":
            from lctool.devices import mixed_precision

            mixed_precision("float16", "cpu")  # the one-line refusal: accelerate would train in float32
        return self


@dataclass
class TrainResult:
    """`losses[i]` is the mean loss of optimizer step i+1 (history restored on resume)."""

    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    start_step: int = 0
    steps: int = 0
    tokens: int = 0
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    trainable_parameters: int = 0
    num_processes: int = 1
    interrupted: bool = False
    checkpoint: str | None = None
    # Under FSDP: the trained weights gathered whole (on the main process; {} elsewhere). See trained_model.
    full_state_dict: dict | None = field(default=None, repr=False)

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def summary(self) -> dict:
        return {
            "steps": self.steps,
            "start_step": self.start_step,
            "first_loss": round(self.losses[0], 5) if self.losses else None,
            "final_loss": round(self.final_loss, 5) if self.losses else None,
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "wall_s": round(self.wall_s, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "trainable_parameters": self.trainable_parameters,
            "num_processes": self.num_processes,
            "evals": self.evals,
            "interrupted": self.interrupted,
        }
