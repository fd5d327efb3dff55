"""Checkpoint I/O: lazy, validated reading and streamed, sharded, atomic writing with a manifest."""

from lctool.io.reader import (
    CARRIED_FILES,
    INDEX_FILE,
    MANIFEST_FILE,
    SINGLE_FILE,
    Checkpoint,
    open_checkpoint,
)
from lctool.io.writer import CheckpointWriter, parse_size

__all__ = [
    "CARRIED_FILES",
    "INDEX_FILE",
    "MANIFEST_FILE",
    "SINGLE_FILE",
    "Checkpoint",
    "CheckpointWriter",
    "open_checkpoint",
    "parse_size",
]
