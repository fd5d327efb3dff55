"""The results table of an example: one row per artifact, from its lctool.json and its eval JSONs.

    python table.py OUT NAME...   # reads OUT/NAME/lctool.json and OUT/eval/NAME*.json; prints markdown
"""

from __future__ import annotations

import glob
import json
import os
import sys


def _load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _step(manifest: dict) -> str:
    """The operation that made the artifact, with its main option."""
    operation = manifest.get("operation") or "?"
    parameters = manifest.get("parameters") or {}
    detail = parameters.get("method") or parameters.get("preset")
    if operation == "quantize" and parameters.get("bits"):
        detail = f"{detail} {parameters['bits']}-bit"
    return f"{operation} {detail}" if detail else operation


def _scores(evaluation: dict) -> dict[str, float]:
    """Column -> perplexity: one per evaluated length, or one for the whole text."""
    source = evaluation.get("source", "")
    rows = evaluation.get("ppl_vs_length")
    if rows:
        return {f"ppl @ {row['length']} ({source})": row["ppl"] for row in rows}
    return {f"ppl ({source})": evaluation["perplexity"]["ppl"]}


def _weights_mb(folder: str) -> float:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(folder, "*.safetensors"))) / 1e6


def rows(out: str, names: list[str]) -> tuple[list[str], list[list[str]]]:
    columns: list[str] = []
    table = []
    for name in names:
        folder = os.path.join(out, name)
        manifest = _load(os.path.join(folder, "lctool.json"))
        scores: dict[str, float] = {}
        for path in sorted(glob.glob(os.path.join(out, "eval", f"{name}.json"))
                           + glob.glob(os.path.join(out, "eval", f"{name}.*.json"))):
            scores.update(_scores(_load(path)))
        columns += [c for c in scores if c not in columns]
        table.append((name, _step(manifest), scores, _weights_mb(folder)))
    header = ["artifact", "made by", *columns, "weights MB"]
    body = [[name, step, *(f"{scores[c]:.2f}" if c in scores else "-" for c in columns), f"{mb:.1f}"]
            for name, step, scores, mb in table]
    return header, body


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    sys.stdout.write(markdown(*rows(sys.argv[1], sys.argv[2:])))
