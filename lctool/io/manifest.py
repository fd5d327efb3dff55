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
    """An input's identity: its path, the sha256 of every shard, and its own manifest with that file's
    sha256 (so each artifact carries the whole chain that made it, checkable against the files)."""
    from lctool.io.reader import MANIFEST_FILE

    manifest_path = os.path.join(checkpoint.path, MANIFEST_FILE)
    return {
        "path": checkpoint.path,
        "shards": {f: sha256_file(checkpoint.shard_path(f)) for f in checkpoint.shard_files},
        "manifest_sha256": sha256_file(manifest_path) if checkpoint.manifest is not None else None,
        "manifest": checkpoint.manifest,
    }


def lineage(manifest: dict | None) -> list[dict]:
    """The operations behind an artifact, oldest first: every input's chain (a merge has several)
    comes before the step that used it; a step reached twice is listed once."""
    chain: list[dict] = []
    seen: set[str] = set()

    def visit(node: dict) -> None:
        inputs = [i for i in node.get("inputs") or [] if isinstance(i, dict)]
        for source in inputs:
            if isinstance(source.get("manifest"), dict):
                visit(source["manifest"])
        key = json.dumps(node, sort_keys=True, default=str)
        if key in seen:
            return
        seen.add(key)
        chain.append({
            "operation": node.get("operation"),
            "parameters": node.get("parameters") or {},
            "seed": node.get("seed"),
            "inputs": [source.get("path") for source in inputs],
            "created_utc": node.get("created_utc"),
            "lctool_version": node.get("lctool_version"),
        })

    if isinstance(manifest, dict):
        visit(manifest)
    return chain


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
