"""Resolving file names that come from inside a checkpoint (index JSON, configs) safely."""

from __future__ import annotations

import os

from lctool.errors import LctoolError


def inside(folder: str, relative: str, what: str) -> str:
    """The real path of `relative` under `folder`, refusing anything that leaves it.

    Catches `../` segments, absolute paths and symlinks (at any depth) that point outside.
    """
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise LctoolError(f"{what}: invalid file name {relative!r}")
    if os.path.isabs(relative):
        raise LctoolError(f"{what}: absolute path {relative!r} is not allowed inside a checkpoint")
    root = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(root, relative))
    if os.path.commonpath([root, target]) != root:
        raise LctoolError(f"{what}: {relative!r} points outside the checkpoint folder")
    return target
