"""Which process of a launch (`accelerate launch`, torchrun) this is, for the steps only one of them does.

Training runs in every process; writing the output, and clearing the folder of an earlier run, happen in
the main one while the others wait, so two processes never race for one target.
"""

from __future__ import annotations

import os


def process_rank() -> int:
    # From the launcher's environment: touching accelerate's PartialState before the training loop
    # creates its Accelerator would fix a single-process state under torchrun on CPU-only machines.
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def wait_for_everyone() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def launched_with_fsdp() -> bool:
    """`accelerate launch --use_fsdp` (known before accelerate is set up, from the launcher's environment)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
