"""`lctool testbed build|path`: the embedded model that tests, demo and benchmarks judge quality on."""

from __future__ import annotations

import typer

from lctool.cli.common import device_option, dtype_option, emit, kv_table, log

testbed_app = typer.Typer(help="Build or locate the embedded testbed model (trained here from real text).",
                          no_args_is_help=True)


@testbed_app.command("build")
def build_command(
    out: str = typer.Argument(None, help="Also copy the testbed to this folder."),
    preset: str = typer.Option("quick", "--preset", help="quick (tests, demo) or bench (benchmarks)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    device: str = device_option("cpu", "accelerate's device of the training run when the testbed is built "
                                       "(not part of its recipe): cpu, cuda, cuda:N or mps."),
    dtype: str = dtype_option("float32", "Mixed precision of that training run; another dtype than float32 is "
                                         "another testbed, cached in its own folder (float16 needs cuda)"),
) -> None:
    """Build the testbed once per machine (cached), report it, and optionally copy it to OUT."""
    from lctool.ops.convert import convert
    from lctool.ops.testbed import testbed_path, testbed_summary

    path = testbed_path(preset, build=True, log=log, device=device, dtype=dtype)
    if out:
        convert(path, out, force=force)
    summary = testbed_summary(path)
    if out:
        summary["copied_to"] = out
    emit(summary, _summary_table)


def _summary_table(summary: dict):
    keys = ("path", "preset", "parameters", "corpus_tokens", "training_tokens_seen", "final_loss", "train_wall_s",
            "copied_to")
    return kv_table("testbed", [(key, summary[key]) for key in keys if key in summary])


@testbed_app.command("path")
def path_command(
    preset: str = typer.Option("quick", "--preset"),
    build: bool = typer.Option(True, "--build/--no-build", help="Build it when missing (default) or fail."),
) -> None:
    """Print the cached testbed folder (building it first unless --no-build)."""
    from lctool.errors import LctoolError
    from lctool.ops.testbed import testbed_path

    path = testbed_path(preset, build=build, log=log)
    if path is None:
        raise LctoolError(f"the {preset} testbed is not built (run: lctool testbed build --preset {preset})")
    emit({"path": path, "preset": preset}, lambda result: result["path"])


def register(app: typer.Typer) -> None:
    app.add_typer(testbed_app, name="testbed")
