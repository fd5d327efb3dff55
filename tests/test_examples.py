"""The example pipelines (examples/*/Makefile): what make runs, in which order, and what it reruns.

`make test` runs the dry runs and a real two-step slice of long-context-4bit (testbed copy -> E2-LLM);
`make soak` (LCTOOL_SOAK=1) also runs both examples end to end with `make -j2` and tiny budgets.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
BIN = os.path.dirname(sys.executable)
TOOLS = [f"LCTOOL={os.path.join(BIN, 'lctool')}", f"PYTHON={sys.executable}"]
SOAK = bool(os.environ.get("LCTOOL_SOAK"))
TINY = {  # budgets small enough for a test, large enough that every step does real work
    "long-context-4bit": ["EXTEND_STEPS=1", "TUNE_STEPS=1", "CALIB_N=2", "EVAL_TOKENS=1024"],
    "merge-then-quantize": ["TUNE_STEPS=1", "CALIB_N=2", "EVAL_TOKENS=512"],
}

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def _copy(tmp_path, name: str) -> str:
    shutil.copytree(EXAMPLES, tmp_path / "examples", ignore=shutil.ignore_patterns("out"))
    return str(tmp_path / "examples" / name)


def _make(folder: str, *args: str, check: bool = True, timeout: float = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MAKEFLAGS": ""}
    done = subprocess.run(["make", "-C", folder, "--no-print-directory", *TOOLS, *args], capture_output=True,
                          text=True, env=env, timeout=timeout)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def _dry(folder: str, *args: str) -> str:
    """What `make -n` would run, one command a line (continuation lines joined)."""
    return _make(folder, "-n", *args).stdout.replace("\\\n", " ")


def _steps(dry_run: str) -> list[str]:
    """The lctool sub-command of each lctool line `make -n` prints (eval, extend, quantize, ...)."""
    return [m.group(1) for m in re.finditer(r"/lctool --quiet ((?:testbed )?[a-z]+)", dry_run)]


def _mtimes(folder: str) -> dict[str, int]:
    out = os.path.join(folder, "out")
    found = {}
    for root, _, files in os.walk(out):
        for file in files:
            if file == "lctool.json" or root.endswith("eval") or file == "results.md":
                path = os.path.join(root, file)
                found[os.path.relpath(path, out)] = os.stat(path).st_mtime_ns
    return found


def test_long_context_dry_run(tmp_path):
    folder = _copy(tmp_path, "long-context-4bit")
    dry = _dry(folder, *TINY["long-context-4bit"])
    steps = _steps(dry)
    assert steps[:1] == ["testbed build"] and steps.count("eval") == 5
    writers = [s for s in steps if s != "eval"]
    assert writers == ["testbed build", "extend", "finetune", "quantize", "quantize"]
    assert "--method e2llm" in dry and "--seq-len 1024" in dry and "--method spqr" in dry
    assert "--lengths 256,1024" in dry and "table.py" in dry
    for line in dry.splitlines():
        if "/lctool " in line and " eval " not in line:
            assert "--force" in line  # a rerun replaces the artifact (make decided it is stale)
    assert _make(folder, "-q", *TINY["long-context-4bit"], check=False).returncode == 1  # nothing is built yet

    # Option stamps: rewritten only when a step's options change.
    stamps = os.path.join(folder, "out", ".options")
    before = {f: os.stat(os.path.join(stamps, f)).st_mtime_ns for f in os.listdir(stamps)}
    assert open(os.path.join(stamps, "SPQR_OPTS")).read().strip().startswith("--method spqr --bits 4")
    _make(folder, "-n", *TINY["long-context-4bit"])
    assert before == {f: os.stat(os.path.join(stamps, f)).st_mtime_ns for f in os.listdir(stamps)}
    _make(folder, "-n", *TINY["long-context-4bit"], "SPQR_BITS=3")
    after = {f: os.stat(os.path.join(stamps, f)).st_mtime_ns for f in os.listdir(stamps)}
    assert [f for f in after if after[f] != before[f]] == ["SPQR_OPTS"]


def test_merge_then_quantize_dry_run(tmp_path):
    folder = _copy(tmp_path, "merge-then-quantize")
    dry = _dry(folder, *TINY["merge-then-quantize"])
    writers = [s for s in _steps(dry) if s != "eval"]
    assert writers == ["testbed build", "finetune", "finetune", "merge", "quantize"]
    assert _steps(dry).count("eval") == 10
    assert "--config finetune.yml --data shakespeare --steps 1" in dry  # the flag overrides the recipe
    assert "--config finetune.yml --data pydoc --steps 1" in dry
    # The recipe is a prerequisite of both fine-tunes (and only of them).
    database = _make(folder, "-pn", *TINY["merge-then-quantize"]).stdout
    rules = [line for line in database.splitlines() if re.match(r"^out/[^ ]+/lctool\.json:", line)]
    with_recipe = {line.split(":")[0] for line in rules if "finetune.yml" in line}
    assert "out/ft-%/lctool.json" in with_recipe
    assert with_recipe <= {"out/ft-%/lctool.json", "out/ft-pydoc/lctool.json", "out/ft-shakespeare/lctool.json"}


@pytest.mark.testbed
def test_long_context_reruns_only_what_changed(tmp_path, testbed_dir):
    """A real slice of the pipeline: the testbed copy and the E²-LLM step, built, left alone, rebuilt."""
    folder = _copy(tmp_path, "long-context-4bit")
    tiny = TINY["long-context-4bit"]
    extended = "out/extended/lctool.json"
    _make(folder, *tiny, extended)
    built = _mtimes(folder)
    assert set(built) == {"base/lctool.json", "extended/lctool.json"}
    assert _make(folder, "-q", *tiny, extended, check=False).returncode == 0  # up to date

    # Changing a later step's options leaves this slice alone; the rest of the pipeline is what remains.
    remaining = _steps(_dry(folder, *tiny, "RTN_OPTS=--method rtn --bits 8"))
    assert "testbed build" not in remaining and "extend" not in remaining and "finetune" in remaining
    assert _make(folder, "-q", *tiny, "RTN_OPTS=--method rtn --bits 8", extended, check=False).returncode == 0

    # Changing the extend options reruns extend only (not the testbed copy), and the manifest shows it.
    changed = [*tiny[1:], "EXTEND_STEPS=2"]
    assert _steps(_dry(folder, *changed, extended)) == ["extend"]
    _make(folder, *changed, extended)
    rebuilt = _mtimes(folder)
    assert rebuilt["base/lctool.json"] == built["base/lctool.json"]
    assert rebuilt["extended/lctool.json"] > built["extended/lctool.json"]
    import json

    with open(os.path.join(folder, extended)) as f:
        manifest = json.load(f)
    assert manifest["parameters"]["training"]["steps"] == 2
    assert _make(folder, "-q", *changed, extended, check=False).returncode == 0
    assert _make(folder, "-q", *tiny, extended, check=False).returncode == 1  # going back is a change too


@pytest.mark.testbed
@pytest.mark.slow
@pytest.mark.skipif(not SOAK, reason="end to end in make soak (minutes on 2 cores); make test runs the slice above")
@pytest.mark.parametrize("name", ["long-context-4bit", "merge-then-quantize"])
def test_example_end_to_end(tmp_path, testbed_dir, name):
    folder = _copy(tmp_path, name)
    tiny = TINY[name]
    done = _make(folder, "-j2", *tiny)
    table = open(os.path.join(folder, "out", "results.md")).read()
    assert table in done.stdout and table.count("\n") == 2 + (5 if name == "long-context-4bit" else 5)
    first = _mtimes(folder)

    # A second make rebuilds nothing.
    assert _make(folder, "-q", *tiny, check=False).returncode == 0
    again = _make(folder, "-j2", *tiny)
    assert _steps(again.stdout) == [] and _mtimes(folder) == first

    # One option changed: only the steps that depend on it rerun.
    option, affected = {
        "long-context-4bit": ("RTN_OPTS=--method rtn --bits 8 --group-size 32", {"rtn/lctool.json", "eval/rtn.json"}),
        "merge-then-quantize": ("MERGE_DENSITY=0.7", {"merged/lctool.json", "gptq/lctool.json",
                                                      "eval/merged.shakespeare.json", "eval/merged.pydoc.json",
                                                      "eval/gptq.shakespeare.json", "eval/gptq.pydoc.json"}),
    }[name]
    _make(folder, "-j2", *tiny, option)
    last = _mtimes(folder)
    changed = {path for path in first if last[path] != first[path]}
    assert changed == affected | {"results.md"}
