"""`lctool inspect DIR`: what a checkpoint holds, read from config and headers only."""

from __future__ import annotations

import json

import typer

from lctool.cli.common import dtype_option, emit, kv_table


def _table(info: dict):
    from lctool.io.reader import human_bytes, parameter_count_str

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
        rows += [(f"  lineage {step}", _step(link)) for step, link in enumerate(lct["lineage"], start=1)]
    else:
        rows.append(("made by", "not lctool (no lctool.json)"))
    return kv_table(info["path"], rows)


def _step(link: dict) -> str:
    """One operation of the lineage: its parameters that were set, and what it read."""
    params = ", ".join(f"{k}={_short(v)}" for k, v in _flat(link["parameters"] or {}) if v not in (None, [], {}))
    sources = ", ".join(str(path) for path in link.get("inputs") or [])
    return f"{link['operation']} {params}" + (f"  ← {sources}" if sources else "")


def _flat(parameters: dict, prefix: str = ""):
    """Nested option groups (extend's training=...) as training.steps=..."""
    for key, value in parameters.items():
        if isinstance(value, dict) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _short(value) -> str:
    text = json.dumps(value, default=str) if isinstance(value, list) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def inspect_command(
    path: str = typer.Argument(..., help="Checkpoint folder."),
) -> None:
    """Show what a checkpoint holds: family, size, dtypes, RoPE, quantization, lineage."""
    from lctool.io.describe import describe

    emit(describe(path), _table)


def convert_command(
    source: str = typer.Argument(..., help="Input checkpoint folder."),
    target: str = typer.Argument(..., help="Output folder (must not exist unless --force)."),
    dtype: str = dtype_option(None, "Cast floating tensors to this dtype"),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest shard, e.g. 5GB, 500MB."),
    check_finite: bool = typer.Option(False, "--check-finite", help="Refuse inputs holding NaN/Inf."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
) -> None:
    """Copy a checkpoint through lctool: re-shard, re-type, validate, add a manifest."""
    from lctool.ops.convert import ConvertOptions, convert

    options = ConvertOptions(dtype=dtype, max_shard_size=max_shard_size, check_finite=check_finite)
    out = convert(source, target, options, force=force)
    emit({"output": out}, lambda result: f"wrote {result['output']}")


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)
    app.command("convert")(convert_command)
