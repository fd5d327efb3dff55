"""Every command run twice with one seed gives identical output: the same bytes in every file, and the
same manifest apart from the run's timings (wall time, peak RSS, tokens/s)."""

from __future__ import annotations

import json

import pytest

from tests.reliability.common import (
    SOAK,
    SOAK_VARIANTS,
    VOLATILE,
    WRITING_COMMANDS,
    cases,
    cli,
    spawn,
    tree_digest,
)

RUNS = cases(2, 3)


@pytest.mark.parametrize("name", WRITING_COMMANDS + (SOAK_VARIANTS if SOAK else ()))
def test_same_seed_same_bytes(workspace, tmp_path, tally, name):
    target = str(tmp_path / "out")
    digests = []
    for run in range(RUNS):
        code, _, err = cli(*workspace.command(name, target), *(["--force"] if run else []))
        assert code == 0, err
        digests.append(tree_digest(target))
        tally.add("run")
    if SOAK:  # and in a fresh interpreter, whose global random state owes nothing to the runs before
        process = spawn(*workspace.command(name, target), "--force")
        _, err = process.communicate(timeout=1800)
        assert process.returncode == 0, err[-3000:]
        digests.append(tree_digest(target))
        tally.add("run")
    assert len(set(digests)) == 1, digests


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


@pytest.mark.parametrize("args", [
    ["eval", "{src}", "--text", "{text}", "--ctx", "32", "--max-tokens", "256", "--passkey",
     "--passkey-lengths", "320", "--passkey-trials", "1", "--seed", "7", "--json"],
    ["inspect", "{src}", "--json"],
    ["vocab", "fertility", "{src}", "--corpus", "{text}", "--json"],
])  # fmt: skip
def test_reporting_commands_repeat_exactly(workspace, tally, args):
    args = [a.format(src=workspace.src, text=workspace.text) for a in args]
    outputs = []
    for _ in range(RUNS):
        code, out, err = cli(*args)
        assert code == 0, err
        outputs.append(_without_timings(json.loads(out)))
        tally.add("run")
    assert all(o == outputs[0] for o in outputs)
