"""The shared training loop: `train(model, batches, TrainConfig(...)) -> TrainResult`.

Used by `lctool finetune`, context extension, pruning recovery and PV-Tuning, and to pretrain the
testbed. See `lctool.train.loop.train` for the hooks and `lctool.train.batches` for the data contract;
`lctool.train.lora` wires LoRA / QLoRA (peft) for the ops that train adapters.
"""

from lctool.train.batches import ShuffledWindows, micro_batches
from lctool.train.config import TrainConfig, TrainResult
from lctool.train.loop import TrainingInterrupted, causal_lm_loss, train, trained_model

__all__ = ["ShuffledWindows", "TrainConfig", "TrainResult", "TrainingInterrupted", "causal_lm_loss",
           "micro_batches", "train", "trained_model"]
