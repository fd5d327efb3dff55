"""Where lctool keeps what it builds once per machine (corpora, the testbed, hash memos)."""

from __future__ import annotations

import os


def cache_root() -> str:
    return os.environ.get("LCTOOL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lctool")


def cache_dir(*parts: str) -> str:
    path = os.path.join(cache_root(), *parts)
    os.makedirs(path, exist_ok=True)
    return path
