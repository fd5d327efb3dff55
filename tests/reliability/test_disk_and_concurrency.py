"""A full disk (a file-size limit, RLIMIT_FSIZE) ends in one clean error with nothing left behind; two
writers racing for one target never mix: exactly one wins, or (with --force) the target is wholly one
run's output."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess

import pytest

from tests.reliability.common import (
    SOAK,
    WRITING_COMMANDS,
    assert_clean_error,
    cases,
    check_output,
    cli,
    cli_command,
    cli_env,
    inputs_digest,
    leftovers,
    reset,
    spawn,
    tree_digest,
)

TIMEOUT = 1800


def _file_size_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a kill

    return apply


# Largest file each run may write: below the first shard of every command's output, then partway.
LIMITS = (1024, 60_000) if not SOAK else (1, 1024, 16_384, 60_000, 120_000, 180_000)


@pytest.mark.parametrize("name", WRITING_COMMANDS if SOAK else ("convert", "quantize"))
def test_disk_full_is_one_clean_error(workspace, tmp_path, tally, name):
    target = str(tmp_path / "out")
    before = inputs_digest(workspace.inputs(name))
    code, _, err = cli(*workspace.command(name, target))
    assert code == 0, err
    reference = tree_digest(target)
    reset(target)
    for limit in LIMITS:
        result = subprocess.run(cli_command(*workspace.command(name, target)), env=cli_env(), capture_output=True,
                                text=True, timeout=TIMEOUT, preexec_fn=_file_size_limit(limit))
        if result.returncode == 0:  # every file fitted under the limit
            check_output(name, target)
            assert tree_digest(target) == reference
            tally.add("fitted")
            reset(target)
        else:
            assert_clean_error(result.returncode, result.stderr, exit_code=1)
            assert "out of disk space" in result.stderr, result.stderr
            assert not os.path.exists(target)
            tally.add("refused")
        assert leftovers(str(tmp_path)) == []
        assert not os.path.exists(os.path.join(tmp_path, ".out.lctool-train"))
        assert inputs_digest(workspace.inputs(name)) == before


# quantize holds its writer (and the target's lock) while it works layer by layer, so two runs overlap.
RACERS = ("quantize", "convert", "merge") if SOAK else ("quantize",)


@pytest.mark.parametrize("name", RACERS)
def test_concurrent_writers_one_wins(workspace, tmp_path, tally, name):
    target = str(tmp_path / "out")
    code, _, err = cli(*workspace.command(name, target))
    assert code == 0, err
    reference = tree_digest(target)
    reset(target)
    for _ in range(cases(1, 10)):
        racers = [spawn(*workspace.command(name, target)) for _ in range(2)]
        results = [(p.communicate(timeout=TIMEOUT)[1], p.returncode)[::-1] for p in racers]
        codes = sorted(code for code, _ in results)
        assert codes == [0, 2], results
        loser = next(err for code, err in results if code == 2)
        assert_clean_error(2, loser)
        lock = "another lctool process is writing" in loser
        assert lock or "already exists" in loser, loser
        tally.add("lost to the lock" if lock else "lost to the finished target")
        check_output(name, target)
        assert tree_digest(target) == reference
        assert leftovers(str(tmp_path)) == []
        reset(target)


def test_concurrent_forced_writers_never_mix(workspace, tmp_path, tally):
    """Two --force runs with different options: the target ends wholly as one of them wrote it."""
    target = str(tmp_path / "out")
    for _ in range(cases(1, 10)):
        racers = {dtype: spawn("convert", workspace.src, target, "--dtype", dtype, "--max-shard-size", "100KB",
                               "--force") for dtype in ("float16", "bfloat16")}
        codes = {dtype: (p.communicate(timeout=TIMEOUT)[1], p.returncode)[::-1] for dtype, p in racers.items()}
        winners = [dtype for dtype, (code, _) in codes.items() if code == 0]
        for code, err in codes.values():
            if code != 0:
                assert_clean_error(code, err)
                assert "another lctool process is writing" in err, err
        assert winners, codes
        check_output("convert", target)
        manifest = json.load(open(os.path.join(target, "lctool.json")))
        written = manifest["parameters"]["dtype"]
        assert written in winners
        from lctool.io import Checkpoint

        checkpoint = Checkpoint(target)
        assert checkpoint.config["dtype"] == written
        assert set(checkpoint.dtypes()) == {"F16" if written == "float16" else "BF16"}
        tally.add("both won in turn" if len(winners) == 2 else "one won")
        assert leftovers(str(tmp_path)) == []
        reset(target)
