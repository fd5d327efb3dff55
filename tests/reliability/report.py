"""Sum reliability logs (JSON lines written by the suite under $LCTOOL_RELIABILITY_LOG) into the Markdown
tables of bench/results/reliability.md: corrupt-input cases per reader, SIGKILLs per writing command, the
other checks, and whether the soak targets of issue 13 were met.

    python -m tests.reliability.report logs/soak-reliability.jsonl [more.jsonl ...]

Several logs (a full soak and a rerun of some tests) are summed test by test; a test in a later log
replaces its row from an earlier one, so a rerun after a fix counts once.
"""

from __future__ import annotations

import json
import re
import sys

CORRUPT_TARGET = 2000  # corrupt-input cases in `make soak` (issue 13)
KILL_TARGET = 20  # SIGKILLs per writing command in `make soak`
READERS = {  # corrupt-input test -> the reader it damages
    "test_safetensors_header": "safetensors header",
    "test_safetensors_data": "safetensors tensor bytes",
    "test_index_json": "model.safetensors.index.json",
    "test_config_json": "config.json",
    "test_tokenizer_json": "tokenizer.json",
    "test_merge_yaml": "mergekit YAML",
    "test_manifest": "lctool.json manifest",
    "test_data_files": "data files (text, JSONL, JSON lists)",
    "test_header_length_is_capped_before_reading": "safetensors header-size cap (sparse multi-GB files)",
    "test_json_files_are_capped": "JSON size cap (config, manifest, tokenizer)",
    "test_damaged_inputs_in_a_real_process": "damaged inputs in a real process (stderr = one line)",
}
OTHER_TITLES = {
    "disk_and_concurrency": "disk full / concurrent writers",
    "determinism": "determinism (runs compared)",
    "untrusted": "untrusted code and paths",
}
NOT_A_KILL = "finished before the kill"


def _param(name: str) -> str:
    match = re.search(r"\[(.*)\]$", name)
    return match.group(1) if match else ""


def _outcomes(entry: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(entry["outcomes"].items())) or "-"


def _failed(entry: dict) -> int:
    return 1 if entry["failed"] else 0


def load(paths: list[str]) -> list[dict]:
    """The entries of all logs, one per test: a later log's entry replaces an earlier one of the same test."""
    entries: dict[tuple[str, str], dict] = {}
    for index, path in enumerate(paths):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    entry = json.loads(line)
                    entries[(entry["kind"], entry["name"])] = {**entry, "log": index + 1}
    return list(entries.values())


def corrupt_table(entries: list[dict], several_logs: bool) -> tuple[list[str], int, int]:
    rows, total, failed = [], 0, 0
    for entry in sorted(entries, key=lambda e: list(READERS).index(e["name"].split("[")[0])
                        if e["name"].split("[")[0] in READERS else len(READERS)):
        base = entry["name"].split("[")[0]
        reader = READERS.get(base, base) + (f" ({_param(entry['name'])})" if _param(entry["name"]) else "")
        accepted, refused = entry["outcomes"].get("accepted", 0), entry["outcomes"].get("refused", 0)
        log = f" | {entry['log']}" if several_logs else ""
        rows.append(f"| {reader} | `{base}` | {entry['cases']} | {accepted} | {refused} | {_failed(entry)}{log} |")
        total += entry["cases"]
        failed += _failed(entry)
    log = " | log" if several_logs else ""
    head = [f"| reader | test | cases tried | correct result | one-line error (exit 2) | failures{log} |",
            "| --- | --- | ---: | ---: | ---: | ---:" + (" | ---:" if several_logs else "") + " |"]
    return head + rows + [f"| **all readers** | | **{total}** | | | **{failed}** |" + (" |" if several_logs else "")], total, failed


def kill_table(entries: list[dict], several_logs: bool) -> tuple[list[str], dict[str, int], int]:
    rows, per_command, failed = [], {}, 0
    for entry in entries:
        variant = _param(entry["name"])
        outcomes = entry["outcomes"]
        kills = sum(v for k, v in outcomes.items() if NOT_A_KILL not in k)
        absent = sum(v for k, v in outcomes.items() if k.startswith("absent"))
        complete = sum(v for k, v in outcomes.items() if k.startswith("complete") and NOT_A_KILL not in k)
        finished = sum(v for k, v in outcomes.items() if NOT_A_KILL in k)
        during = sum(v for k, v in outcomes.items() if "during work" in k)
        command = variant.split("-")[0]
        per_command[command] = per_command.get(command, 0) + kills
        log = f" | {entry['log']}" if several_logs else ""
        rows.append(f"| {command} | `{variant}` | {entry['cases']} | {kills} | {during} | {absent} | {complete} | "
                    f"{finished} | {_failed(entry)}{log} |")
        failed += _failed(entry)
    log = " | log" if several_logs else ""
    head = [f"| command | variant | runs started | kills survived | of them while writing | target absent | "
            f"target complete | run ended before its kill | failures{log} |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---:" + (" | ---:" if several_logs else "") + " |"]
    return head + sorted(rows), per_command, failed


def other_table(entries: list[dict], several_logs: bool) -> tuple[list[str], int, int]:
    log = " | log" if several_logs else ""
    rows = [f"| area | test | cases | outcomes | failures{log} |",
            "| --- | --- | ---: | --- | ---:" + (" | ---:" if several_logs else "") + " |"]
    total = failed = 0
    for entry in sorted(entries, key=lambda e: (e["kind"], e["name"])):
        extra = f" | {entry['log']}" if several_logs else ""
        rows.append(f"| {OTHER_TITLES.get(entry['kind'], entry['kind'])} | `{entry['name']}` | {entry['cases']} | "
                    f"{_outcomes(entry)} | {_failed(entry)}{extra} |")
        total += entry["cases"]
        failed += _failed(entry)
    return rows, total, failed


def summarize(entries: list[dict], several_logs: bool = False) -> str:
    corrupt = [e for e in entries if e["kind"] == "corrupt_input"]
    kills = [e for e in entries if e["kind"] == "interruption"]
    others = [e for e in entries if e["kind"] not in ("corrupt_input", "interruption")]
    corrupt_rows, corrupt_total, corrupt_failed = corrupt_table(corrupt, several_logs)
    kill_rows, per_command, kill_failed = kill_table(kills, several_logs)
    other_rows, other_total, other_failed = other_table(others, several_logs)
    soak = all(e.get("soak") for e in entries)
    fewest = min(per_command.items(), key=lambda item: item[1]) if per_command else ("-", 0)
    kill_counts = ", ".join(f"{c} {n}" for c, n in sorted(per_command.items()))
    lines = [
        "### Corrupt input, per reader", "", *corrupt_rows, "",
        "### SIGKILL at random moments, per writing command", "", *kill_rows, "",
        f"Kills survived per writing command (variants summed): {kill_counts or '-'}.", "",
        "### Disk full, concurrent writers, determinism, untrusted input", "", *other_rows, "",
        "### Totals", "",
        f"- Logs: {'`make soak` (LCTOOL_SOAK=1)' if soak else 'quick runs (`make test` counts)'}; "
        f"{len(entries)} tests recorded.",
        f"- Corrupt-input cases tried: {corrupt_total} (target ≥ {CORRUPT_TARGET}: "
        f"{'met' if corrupt_total >= CORRUPT_TARGET else 'NOT met'}); failed tests {corrupt_failed}.",
        f"- SIGKILLs survived: {sum(per_command.values())}; fewest for one command: {fewest[0]} {fewest[1]} "
        f"(target ≥ {KILL_TARGET} per command: {'met' if fewest[1] >= KILL_TARGET else 'NOT met'}); "
        f"failed tests {kill_failed}.",
        f"- Other cases: {other_total}; failed tests {other_failed}.",
        f"- Failed tests in all: {corrupt_failed + kill_failed + other_failed}.",
    ]
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    print(summarize(load(paths), several_logs=len(paths) > 1))


if __name__ == "__main__":
    main(sys.argv[1:])
