"""`lctool inspect DIR`: what a checkpoint holds, read from config and headers only."""

from __future__ import annotations

import json

import typer

from lctool.cli.common import emit_json, stdout


def _table(info: dict):
    from rich.table import Table

    from lctool.io.reader import human_bytes, parameter_count_str

    table = Table(title=info["path"], show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("family", info["family"]),
        ("parameters", f"{parameter_count_str(info['parameters'])} ({info['parameters']:,})"),
        ("dtypes", ", ".join(f"{k}×{v}" for k, v in info["dtypes"].items())),
        ("size", f"{info['size_human']} in {len(info['shards'])} shard(s)"),
        ("layers", str(info["layers"])),
        ("hidden / intermediate", f"{info['hidden_size']} / {info['intermediate_size']}"),
        ("heads / kv heads / head_dim", f"{info['heads']} / {info['kv_heads']} / {info['head_dim']}"),
        ("vocab", str(info["vocab_size"])),
        ("tied embeddings", "yes" if info["tied_embeddings"] else "no"),
        ("context length", str(info["context_length"])),
        ("rope", json.dumps(info["rope"])),
        ("quantization", json.dumps(info["quantization"]) if info["quantization"] else "none"),
        ("tokenizer", ", ".join(info["tokenizer_files"]) or "none"),
    ]
    if info["auto_map"]:
        rows.append(("auto_map (needs trust_remote_code)", json.dumps(info["auto_map"])))
    for shard in info["shards"]:
        rows.append((f"  {shard['file']}", f"{human_bytes(shard['bytes'])}, {shard['tensors']} tensors"))
    lct = info["lctool"]
    if lct:
        rows.append(("made by", f"lctool {lct['version']} {lct['operation']} ({lct['created_utc']}, "
                                f"{lct['wall_time_s']} s, peak RSS {lct['peak_rss_mb']} MB)"))
        for step, link in enumerate(lct["lineage"], start=1):
            params = ", ".join(f"{k}={v}" for k, v in (link["parameters"] or {}).items())
            rows.append((f"  lineage {step}", f"{link['operation']} {params}"))
    else:
        rows.append(("made by", "not lctool (no lctool.json)"))
    for key, value in rows:
        table.add_row(key, value)
    return table


def inspect_command(
    path: str = typer.Argument(..., help="Checkpoint folder."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """Show what a checkpoint holds: family, size, dtypes, RoPE, quantization, lineage."""
    from lctool.io.describe import describe

    info = describe(path)
    if as_json:
        emit_json(info)
    else:
        stdout.print(_table(info))


def convert_command(
    source: str = typer.Argument(..., help="Input checkpoint folder."),
    target: str = typer.Argument(..., help="Output folder (must not exist unless --force)."),
    dtype: str = typer.Option(None, "--dtype", help="Cast floating tensors: float32, float16, bfloat16."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest shard, e.g. 5GB, 500MB."),
    check_finite: bool = typer.Option(False, "--check-finite", help="Refuse inputs holding NaN/Inf."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """Copy a checkpoint through lctool: re-shard, re-type, validate, add a manifest."""
    from lctool.ops.convert import ConvertOptions, convert

    options = ConvertOptions(dtype=dtype, max_shard_size=max_shard_size, check_finite=check_finite)
    out = convert(source, target, options, force=force)
    if as_json:
        emit_json({"output": out})
    else:
        stdout.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)
    app.command("convert")(convert_command)
