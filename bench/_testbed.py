"""Which testbed a benchmark runs on: the bench preset when it is built (or asked for), else quick.

Every bench script takes `--testbed auto|quick|bench` and names the testbed it used in its table, so a
results file always says which model produced it (issue: benchmark-grade testbed).
"""

from __future__ import annotations

import argparse


def add_testbed_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--testbed",
        choices=["auto", "quick", "bench"],
        default="auto",
        help="testbed preset: bench (built on request), quick, or auto = bench when already built, else quick",
    )


def resolve_testbed(choice: str, log=print) -> tuple[str, str]:
    """(folder, preset) of the testbed to use; builds it when `choice` names a preset not yet built."""
    from lctool.ops.testbed import testbed_path

    if choice == "auto":
        built = testbed_path("bench", build=False)
        if built:
            return built, "bench"
        choice = "quick"
    return testbed_path(choice, build=True, log=log), choice


def testbed_line(preset: str, path: str) -> str:
    """The sentence every results table carries about its model."""
    return f"Testbed: `{preset}` preset (`lctool testbed build --preset {preset}`; {path})."
