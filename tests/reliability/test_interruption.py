"""SIGKILL at random moments, for every writing command: the target is then absent, or complete and
identical to an uninterrupted run's; the inputs are byte-identical; the next run cleans what the
killed one left and succeeds.

Each kill either lands while the command writes (a temporary folder or training folder has appeared
beside the target, plus a random few milliseconds) or at a random moment of a whole run.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import time

import pytest

from tests.reliability.common import (
    SOAK,
    SOAK_VARIANTS,
    TMP_MARK,
    WRITING_COMMANDS,
    cases,
    check_output,
    inputs_digest,
    leftovers,
    reset,
    spawn,
    tree_digest,
    wait_for,
)

KILLS = cases(1, 20)  # per command and variant, counted when the kill lands
PROCESS_TIMEOUT = 1800  # the machine may be very busy; a hang still fails


def _work_started(target: str) -> bool:
    parent, name = os.path.split(target)
    return any(e.startswith(f".{name}") and (TMP_MARK in e or e.endswith(".lctool-train")) for e in os.listdir(parent))


def _timed_run(args: list[str]) -> float:
    """A whole run in its own process; returns its wall time (the span kills are drawn from)."""
    began = time.monotonic()
    process = spawn(*args)
    _, err = process.communicate(timeout=PROCESS_TIMEOUT)
    assert process.returncode == 0, err[-3000:]
    return time.monotonic() - began


def _kill_once(args: list[str], target: str, rng: random.Random, span: float | None, delay: float) -> str:
    """Start the command and SIGKILL it: `delay` (at most) after its writing starts, or, if `span` is given, at a
    random moment of a run that long. Returns when the kill landed."""
    process = spawn(*args)
    try:
        if span is None:
            started = wait_for(lambda: _work_started(target) or process.poll() is not None, PROCESS_TIMEOUT, 0.001)
            assert started
            time.sleep(rng.uniform(0, delay))
            moment = "during work"
        else:
            time.sleep(rng.uniform(0, span))
            moment = "at a random moment"
        with contextlib.suppress(ProcessLookupError):  # the run may have ended just now
            os.killpg(process.pid, signal.SIGKILL)
        _, err = process.communicate(timeout=PROCESS_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode != -signal.SIGKILL:
        assert process.returncode == 0, f"exit {process.returncode} before the kill: {err[-2000:]}"
        return "finished before the kill"
    return moment


@pytest.mark.parametrize("name", WRITING_COMMANDS + (SOAK_VARIANTS if SOAK else ()))
def test_sigkill_leaves_absent_or_complete(workspace, tmp_path, tally, name):
    rng = random.Random(None if SOAK else name)
    target = str(tmp_path / "out")
    before = inputs_digest(workspace.inputs(name))
    args = [*workspace.command(name, target), "--force"]

    # The uninterrupted reference, at the same path, made as the killed runs are: in a fresh process (an
    # in-process run inherits this worker's state; in a full suite run its manifest once differed).
    span = _timed_run(args)
    reference = tree_digest(target)
    reset(target)

    # A fast command's writing can take less than a millisecond on a quick machine, so a kill aimed at it may
    # come too late. Each miss halves the delay aimed after the writing starts; after two misses in a row the
    # next kill comes at a random moment of the run's first 80% instead, which lands.
    kills = attempts = misses = 0
    delay = 0.05
    while kills < KILLS:  # KILLS kills that landed: a run that ends before its kill does not count
        attempts += 1
        assert attempts <= 4 * KILLS + 2, f"only {kills} of {attempts} runs were still going when killed"
        aim_at_writing = misses < 2 and (not SOAK or rng.random() < 0.5)
        moment = _kill_once(args, target, rng, None if aim_at_writing else 0.8 * span, delay)
        landed = moment != "finished before the kill"
        kills += landed
        misses = 0 if landed else misses + 1
        delay = delay if landed else delay / 2
        if os.path.exists(target):
            check_output(name, target)
            assert tree_digest(target) == reference, "a killed run left a target unlike a whole run's"
            tally.add(f"complete ({moment})")
        else:
            tally.add(f"absent ({moment})")
        assert inputs_digest(workspace.inputs(name)) == before
        if rng.random() < 0.5 and os.path.exists(target):
            shutil.rmtree(target)  # the next kill writes a new target rather than replacing one

    _timed_run(args)  # the next run cleans up after the killed ones
    check_output(name, target)
    assert tree_digest(target) == reference
    assert leftovers(str(tmp_path)) == []
    assert not os.path.exists(os.path.join(tmp_path, ".out.lctool-train"))
    assert inputs_digest(workspace.inputs(name)) == before
