"""Where lctool keeps what it builds once per machine (corpora, the testbed, hash memos).

`$LCTOOL_CACHE` is read here and nowhere else: `~` is expanded and a relative path is made absolute
(against the working directory when it is read), so a cache path recorded or passed on never depends
on where a later process runs.
"""

from __future__ import annotations

import os


def cache_root() -> str:
    """The absolute cache folder: `$LCTOOL_CACHE`, else ~/.cache/lctool (not created)."""
    configured = os.environ.get("LCTOOL_CACHE")
    path = os.path.expanduser(configured) if configured else os.path.join(os.path.expanduser("~"), ".cache", "lctool")
    return os.path.abspath(path)


def cache_dir(*parts: str) -> str:
    """`cache_root()/parts...`, created if missing."""
    path = os.path.join(cache_root(), *parts)
    os.makedirs(path, exist_ok=True)
    return path
