"""`--device` / `--dtype`: one spelling, one validation and one resolution for every command and the Python API.

`device` is auto (the default: cuda when this machine has a CUDA device, else cpu; under `accelerate
launch` on GPUs each process then takes its own), cpu, cuda, cuda:N or mps, and must exist here; `dtype` is a
floating type by its torch name (aliases such as bf16 accepted). What the dtype means differs per
command (the calibration forward of quantize, the autocast of a training run, ...): docs/cli.md has
the table. Option models take both through `ComputeOptions`; the CLI through lctool.cli.common.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import ClassVar

from pydantic import BaseModel, Field, field_validator, model_validator

from lctool.errors import LctoolError

DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                 "fp64": "float64", "double": "float64"}
MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def check_device(name: str | None) -> str:
    """`name` (None: auto) if it is cpu, cuda, cuda:N or mps and present on this machine; auto
    resolves to cuda when a CUDA device is present, else cpu (so manifests record the real device)."""
    name = name or "auto"
    if not _DEVICE.match(name):
        raise LctoolError(f"{name!r} is not a device (auto, cpu, cuda, cuda:N or mps)")
    if name == "cpu":
        return name
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"

    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.split(":")[1]) if ":" in name else 0
        if count == 0:
            raise LctoolError(f"{name}: no CUDA device is available")
        if index >= count:
            raise LctoolError(f"{name}: this machine has {count} CUDA device(s)")
    elif not torch.backends.mps.is_available():
        raise LctoolError("mps: not available on this machine")
    return name


def check_dtype(name: str | None, allowed: Iterable[str] = DTYPES) -> str | None:
    """The canonical torch name of `name` (None stays None) if it is one of `allowed`."""
    if name is None:
        return None
    allowed = tuple(allowed)
    canonical = DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if canonical not in allowed:
        raise LctoolError(f"{name!r} is not one of {', '.join(allowed)}")
    return canonical


def torch_dtype(name: str):
    import torch

    return getattr(torch, check_dtype(name, (*DTYPES, "float64")))


def mixed_precision(dtype: str, device: str) -> str:
    """accelerate's mixed_precision for a training run computing in `dtype` on `device`."""
    if dtype == "float16" and device == "cpu":
        # accelerate silently trains in float32 then (it has no CPU fp16 autocast).
        raise LctoolError("--dtype float16 trains on cuda only; on cpu use bfloat16 or float32")
    if dtype not in MIXED_PRECISION:
        raise LctoolError(f"a training run computes in {', '.join(MIXED_PRECISION)}, not {dtype}")
    return MIXED_PRECISION[dtype]


def autocast(device: str, dtype: str):
    """Matrix products in `dtype` on `device` while parameters (and their gradients) stay float32."""
    import contextlib

    import torch

    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch_dtype(dtype))


class ComputeOptions(BaseModel):
    """Where (`device`) and in what precision (`dtype`) an operation computes; both checked on creation.

    Subclasses with other allowed dtypes override `ALLOWED_DTYPES`.
    """

    ALLOWED_DTYPES: ClassVar[tuple[str, ...]] = DTYPES

    device: str = Field("auto", validate_default=True, description="torch device of the computation: auto (cuda if present, else cpu), cpu, cuda, cuda:N or mps")
    dtype: str = Field("float32", description="compute dtype (what it means per command: docs/cli.md)")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device(value)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        return check_dtype(value, cls.ALLOWED_DTYPES)

    @property
    def torch_dtype(self):
        return torch_dtype(self.dtype)


class TrainingComputeOptions(ComputeOptions):
    """Options of a training run: `dtype` is accelerate's mixed precision (float16 only on a GPU)."""

    @model_validator(mode="after")
    def _trainable_dtype(self):
        mixed_precision(self.dtype, self.device)
        return self

    @property
    def mixed_precision(self) -> str:
        return mixed_precision(self.dtype, self.device)
