"""`lctool.json`: what made an artifact, from what, with which options, and at what cost."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time

from lctool import __version__
from lctool.io.cache import cache_dir

HASH_CHUNK = 8 * 1024 * 1024


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sha256_file(path: str) -> str:
    """Streamed sha256, memoised on (path, inode, size, mtime) so reruns skip the hashing."""
    stat = os.stat(path)
    key = f"{os.path.realpath(path)}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_path = os.path.join(cache_dir("sha256"), hashlib.sha256(key.encode()).hexdigest())
    try:
        with open(memo_path) as f:
            digest = f.read().strip()
            if len(digest) == 64:
                return digest
    except OSError:
        pass
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            hasher.update(chunk)
    digest = hasher.hexdigest()
    try:
        tmp = f"{memo_path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(digest)
        os.replace(tmp, memo_path)
    except OSError:
        pass  # the memo is only an optimisation
    return digest


def describe_input(checkpoint) -> dict:
    """An input's identity: its path, the sha256 of every shard, and its own manifest (lineage)."""
    return {
        "path": checkpoint.path,
        "shards": {f: sha256_file(checkpoint.shard_path(f)) for f in checkpoint.shard_files},
        "manifest": checkpoint.manifest,
    }


def build_manifest(
    operation: str,
    parameters: dict,
    inputs: list[dict],
    started: float,
    seed: int | None = None,
    results: dict | None = None,
) -> dict:
    return {
        "lctool_version": __version__,
        "operation": operation,
        "parameters": parameters,
        "seed": seed,
        "inputs": inputs,
        "results": results or {},
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_time_s": round(time.time() - started, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def dumps(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
