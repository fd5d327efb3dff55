"""Sum a reliability log (JSON lines written by the suite under $LCTOOL_RELIABILITY_LOG) into the
Markdown table of bench/results/reliability.md.

    python -m tests.reliability.report soak.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

TITLES = {
    "corrupt_input": "corrupt input (CLI, hypothesis)",
    "interruption": "SIGKILL at random moments",
    "disk_and_concurrency": "disk full / concurrent writers",
    "determinism": "determinism (runs compared)",
    "untrusted": "untrusted code and paths",
}


def summarize(lines: list[dict]) -> str:
    rows = []
    totals: dict[str, int] = defaultdict(int)
    for entry in lines:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(entry["outcomes"].items())) or "-"
        failed = 1 if entry["failed"] else 0
        rows.append(f"| {TITLES.get(entry['kind'], entry['kind'])} | `{entry['name']}` | {entry['cases']} | "
                    f"{outcomes} | {failed} |")
        totals["cases"] += entry["cases"]
        totals["failed"] += failed
        if entry["kind"] == "corrupt_input":
            totals["corrupt"] += entry["cases"]
        if entry["kind"] == "interruption":
            totals["kills"] += sum(v for k, v in entry["outcomes"].items() if not k.startswith("finished"))
            totals["kill runs"] += entry["cases"]
    header = ["| area | test | cases | outcomes | failed tests |", "| --- | --- | ---: | --- | ---: |"]
    summary = (f"\nTotal: {totals['cases']} cases in {len(lines)} tests; {totals['corrupt']} corrupt-input cases; "
               f"{totals['kills']} SIGKILLs landed in {totals['kill runs']} interrupted runs (the rest finished "
               f"first); {totals['failed']} failed tests.")
    return "\n".join(header + rows) + "\n" + summary


def main(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    print(summarize(lines))


if __name__ == "__main__":
    main(sys.argv[1])
