"""What the reliability suite shares: case counts, the writing commands on tiny inputs, the CLI runners,
output checks and the soak log.

`make test` runs a few cases of each kind; `make soak` (LCTOOL_SOAK=1) runs thousands. Each test that
tries cases records its counts with `record()`; under `make soak` they go to $LCTOOL_RELIABILITY_LOG
(JSON lines) and `python -m tests.reliability.report` sums them for bench/results/reliability.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time

SOAK = bool(os.environ.get("LCTOOL_SOAK"))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TMP_MARK = ".lctool-tmp-"


def cases(quick: int, soak: int) -> int:
    return soak if SOAK else quick


# ---- the soak log ------------------------------------------------------------------------------------
def record(kind: str, name: str, **counts) -> None:
    """Append one test's counts (cases tried, outcomes, failures) to the soak log, if there is one."""
    path = os.environ.get("LCTOOL_RELIABILITY_LOG")
    if not path:
        return
    line = json.dumps({"kind": kind, "name": name, "soak": SOAK, **counts}) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # two xdist workers append to one file
        f.write(line)


class Tally:
    """Counts outcomes of one test's cases; written to the soak log when the test ends (failed or not)."""

    def __init__(self, kind: str, name: str):
        self.kind, self.name, self.counts, self.failed = kind, name, {}, False

    def add(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    def write(self) -> None:
        record(self.kind, self.name, cases=sum(self.counts.values()), failed=self.failed, outcomes=self.counts)


# ---- running the CLI ---------------------------------------------------------------------------------
def cli(*args) -> tuple[int, str, str]:
    """The CLI in-process (fast: no interpreter start): (exit code, stdout, stderr)."""
    from lctool.cli.main import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run(["--quiet", *(str(a) for a in args)])
    return code, out.getvalue(), err.getvalue()


def cli_command(*args) -> list[str]:
    """The argv of the CLI in its own process."""
    return [sys.executable, "-m", "lctool.cli.main", "--quiet", *(str(a) for a in args)]


def cli_env() -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def spawn(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(cli_command(*args), env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kwargs)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def assert_clean_error(code: int, err: str, exit_code: int = 2) -> None:
    """A failure the way users must see it: the given exit code, one `error:` line (the last), no traceback."""
    assert code == exit_code, (code, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(error_lines(err)) == 1 and lines[-1].startswith("error: "), err[-3000:]


def leftovers(parent: str) -> list[str]:
    """Temporary folders or files a writer left beside its target."""
    return sorted(e for e in os.listdir(parent) if TMP_MARK in e or e.endswith(".grown"))


# ---- hashing -----------------------------------------------------------------------------------------
# Manifest fields that measure the run rather than describe the artifact.
VOLATILE = {"created_utc", "wall_time_s", "peak_rss_mb", "wall_s", "time_s", "tokens_per_s", "cpu_minutes",
            "merge_seconds", "seconds", "elapsed_s", "samples_per_s"}


def _stable(value):
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE and not k.endswith("_seconds")}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _stable_log(raw: bytes) -> bytes:
    rows = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
    return json.dumps([_stable(row) for row in rows], sort_keys=True).encode()


def tree_digest(folder: str, stable: bool = True) -> str:
    """sha256 over every file's relative path and bytes; with `stable`, timings in lctool.json and the
    training log are left out so two runs of one command compare equal."""
    hasher = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                data = f.read()
            if stable and name == "lctool.json":
                data = json.dumps(_stable(json.loads(data)), sort_keys=True).encode()
            elif stable and name.endswith(".jsonl") and "log" in name:
                data = _stable_log(data)
            hasher.update(os.path.relpath(path, folder).encode() + b"\0" + hashlib.sha256(data).digest())
    return hasher.hexdigest()


def file_digest(path: str) -> str:
    return tree_digest(path, stable=False) if os.path.isdir(path) else hashlib.sha256(open(path, "rb").read()).hexdigest()


def inputs_digest(paths: list[str]) -> dict[str, str]:
    return {p: file_digest(p) for p in paths}


# ---- tiny inputs and the writing commands ------------------------------------------------------------
TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on in the warm afternoon sun. "


class Workspace:
    """Tiny inputs every writing command accepts, built once per test process."""

    def __init__(self, folder: str):
        import torch

        from tests.test_merge_support import save_finetunes, write_yaml
        from tests.tiny_models import save_tiny

        torch.set_num_threads(1)
        self.folder = folder
        self.src = save_tiny(os.path.join(folder, "src"))
        self.base, self.ft1, self.ft2 = save_finetunes(os.path.join(folder, "merge"), count=2)
        self.text = os.path.join(folder, "text.txt")
        with open(self.text, "w") as f:
            f.write((TEXT * 24 + "\n") * 12)
        self.merge_yaml = write_yaml(os.path.join(folder, "merge.yml"), {
            "merge_method": "dare_ties",
            "base_model": self.base,
            "models": [{"model": self.ft1, "parameters": {"weight": 1.0, "density": 0.5}},
                       {"model": self.ft2, "parameters": {"weight": 0.5, "density": 0.7}}],
            "dtype": "float32",
        })  # fmt: skip

    def command(self, name: str, out: str, src: str | None = None) -> list[str]:
        """The CLI arguments of writing command `name` from `src` (default the tiny model) to `out`."""
        src = src or self.src
        text = self.text
        table = {
            "convert": ["convert", src, out, "--max-shard-size", "200KB"],
            "extend": ["extend", src, out, "--method", "yarn", "--factor", "4"],
            "extend-e2llm": ["extend", src, out, "--method", "e2llm", "--factor", "2", "--steps", "2",
                             "--corpus", text, "--batch-size", "2", "--seed", "1"],
            "finetune": ["finetune", src, out, "--data", text, "--seq-len", "32", "--batch", "2", "--steps", "2",
                         "--lora-r", "4", "--seed", "3"],
            "finetune-merged": ["finetune", src, out, "--data", text, "--seq-len", "32", "--batch", "2",
                                "--steps", "2", "--lora-r", "4", "--seed", "3", "--merge"],
            "quantize": ["quantize", src, out, "--method", "gptq", "--group-size", "32", "--calib", text,
                         "--calib-n", "4", "--calib-len", "32", "--seed", "2"],
            "quantize-rtn": ["quantize", src, out, "--method", "rtn", "--group-size", "32"],
            "prune": ["prune", src, out, "--ratio", "0.2", "--calib", text, "--calib-n", "2", "--calib-len", "32",
                      "--seed", "4"],
            "merge": ["merge", self.merge_yaml, out, "--seed", "3"],
            "vocab": ["vocab", "expand", src, out, "--corpus", text, "--num-new", "8", "--seed", "5"],
            "vocab-trim": ["vocab", "trim", src, out, "--corpus", text],
        }
        return table[name]

    def inputs(self, name: str) -> list[str]:
        """Everything command `name` reads: must be byte-identical after any run, killed or not."""
        if name == "merge":
            return [self.base, self.ft1, self.ft2, self.merge_yaml]
        return [self.src, self.text]


WRITING_COMMANDS = ("convert", "extend", "finetune", "quantize", "prune", "merge", "vocab")
SOAK_VARIANTS = ("extend-e2llm", "finetune-merged", "quantize-rtn", "vocab-trim")


def check_output(name: str, path: str) -> None:
    """A complete, valid output of command `name`: its manifest, and every tensor readable."""
    from lctool.io import Checkpoint
    from lctool.io.safetensors_format import read_header

    with open(os.path.join(path, "lctool.json")) as f:
        manifest = json.load(f)
    assert manifest["operation"].startswith(name.split("-")[0]), manifest["operation"]
    if name == "finetune":  # a peft adapter folder, not a checkpoint
        assert json.load(open(os.path.join(path, "adapter_config.json")))["peft_type"] == "LORA"
        header = read_header(os.path.join(path, "adapter_model.safetensors"))
        assert header.entries
        return
    checkpoint = Checkpoint(path, check_shapes=not name.startswith("quantize"))
    for _, tensor in checkpoint.iter_tensors():
        assert tensor.numel() >= 0


def reset(path: str) -> None:
    """Remove `path` and anything a writer left beside it."""
    parent, name = os.path.split(os.path.abspath(path))
    for entry in os.listdir(parent):
        if entry == name or entry.startswith(f".{name}"):
            full = os.path.join(parent, entry)
            shutil.rmtree(full) if os.path.isdir(full) and not os.path.islink(full) else os.remove(full)


def wait_for(predicate, timeout: float, interval: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
