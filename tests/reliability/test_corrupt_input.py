"""Corrupt input for every reader, through the CLI: each damaged file ends in exit 2 with one `error:` line
and nothing written, or in a correct result. Never a traceback, a hang, or a partial output.

Readers: safetensors header and data, model.safetensors.index.json, config.json, tokenizer.json,
mergekit YAML, lctool.json manifests, and data files (text, JSONL, JSON lists). Each test damages one
valid file (hypothesis: byte-level and structural mutations), then runs commands that read it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.reliability.common import (
    SOAK,
    assert_clean_error,
    cases,
    check_output,
    cli,
    leftovers,
    reset,
)
from tests.reliability.mutations import json_values, mutate_bytes, mutate_tree


def fuzz(quick: int, soak: int):
    # No shrinking: a failing case is reported as drawn (shrinking reruns whole commands for minutes).
    return settings(max_examples=cases(quick, soak), deadline=None, database=None, derandomize=not SOAK,
                    suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])


# ---- the outcome of one case -------------------------------------------------------------------------
def attempt(tally, args: list, out: str | None = None, on_success=None) -> int:
    """Run one command on damaged input: a clean refusal with nothing written, or a checked success."""
    if out is not None:
        reset(out)
    code, stdout, err = cli(*args)
    if code == 0:
        tally.add("accepted")
        if on_success is not None:
            on_success(stdout)
    else:
        assert_clean_error(code, err)
        tally.add("refused")
    if out is not None:
        if code != 0:
            assert not os.path.exists(out), f"{out} written by a failed run"
        assert leftovers(os.path.dirname(out)) == []
    return code


def writes(name: str, out: str):
    def check(_stdout: str) -> None:
        check_output(name, out)

    return check


def prints_json(stdout: str) -> None:
    json.loads(stdout)


@pytest.fixture
def work(tmp_path, workspace):
    """A scratch copy of the tiny model (recopied by each case that damages it) and an output path."""
    return {"folder": str(tmp_path / "in"), "out": str(tmp_path / "out"), "tmp": tmp_path}


def fresh_copy(source: str, folder: str) -> str:
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(source, folder)
    return folder


# Commands that read a model folder, as (name, args builder, success check).
def model_readers(workspace, folder: str, out: str, heavy: bool):
    text = workspace.text
    readers = [
        (["inspect", folder, "--json"], None, prints_json),
        (["convert", folder, out], out, writes("convert", out)),
        (["extend", folder, out, "--method", "yarn", "--factor", "2", "--force"], out, writes("extend", out)),
        (["quantize", folder, out, "--method", "rtn", "--group-size", "32"], out, writes("quantize", out)),
    ]
    if heavy or SOAK:
        readers += [
            (["eval", folder, "--text", text, "--ctx", "32", "--max-tokens", "128", "--json"], None, prints_json),
            (["prune", folder, out, "--ratio", "0.2", "--importance", "l2"], out, writes("prune", out)),
        ]
    return readers


def run_readers(data, tally, readers) -> None:
    args, out, check = data.draw(st.sampled_from(readers), label="command")
    attempt(tally, args, out, check)


# ---- safetensors ---------------------------------------------------------------------------------------
def _header_length(path: str) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


@fuzz(quick=10, soak=400)
@given(data=st.data())
def test_safetensors_header(workspace, work, tally, data):
    folder = fresh_copy(workspace.src, work["folder"])
    shard = os.path.join(folder, "model.safetensors")
    blob = open(shard, "rb").read()
    end = _header_length(shard)
    if data.draw(st.booleans(), label="structural"):
        header = json.loads(blob[8:end])
        damaged = json.dumps(mutate_tree(data, header, ["dtype", "shape", "data_offsets", "__metadata__"]),
                             allow_nan=True).encode()
        length = len(damaged) + data.draw(st.sampled_from([0, 0, 0, -1, 1, 8, -8, 2**40]))
        blob = struct.pack("<Q", max(length, 0)) + damaged + blob[end:]
    else:
        blob = mutate_bytes(data, blob, 0, end)
    open(shard, "wb").write(blob)
    run_readers(data, tally, model_readers(workspace, folder, work["out"], heavy=False))


@fuzz(quick=6, soak=250)
@given(data=st.data())
def test_safetensors_data(workspace, work, tally, data):
    """Damaged tensor bytes are still tensors: a copy must carry them exactly; NaN/Inf weights must be
    refused or handled, never crash a command."""
    from lctool.io import Checkpoint

    folder = fresh_copy(workspace.src, work["folder"])
    shard = os.path.join(folder, "model.safetensors")
    blob = bytearray(open(shard, "rb").read())
    start = _header_length(shard)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(start, len(blob) - 4))
        blob[position : position + 4] = data.draw(st.sampled_from([b"\xff\xff\xff\x7f", b"\x00\x00\x80\x7f",
                                                                  b"\x00\x00\x80\xff"]) | st.binary(min_size=4, max_size=4))
    open(shard, "wb").write(bytes(blob))

    def exact_copy(_stdout: str) -> None:
        check_output("convert", work["out"])
        source, copy = Checkpoint(folder), Checkpoint(work["out"])
        for name, tensor in source.iter_tensors():
            assert copy.get(name).view(-1).view(dtype=tensor.dtype).numpy().tobytes() == tensor.numpy().tobytes()

    readers = [(["convert", folder, work["out"]], work["out"], exact_copy),
               *model_readers(workspace, folder, work["out"], heavy=True)[2:]]
    run_readers(data, tally, readers)


# ---- the shard index -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded(workspace, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sharded") / "model")
    code, _, err = cli("convert", workspace.src, out, "--max-shard-size", "100KB")
    assert code == 0, err
    return out


@fuzz(quick=8, soak=300)
@given(data=st.data())
def test_index_json(workspace, sharded, work, tally, data):
    folder = fresh_copy(sharded, work["folder"])
    path = os.path.join(folder, "model.safetensors.index.json")
    raw = open(path, "rb").read()
    if data.draw(st.booleans(), label="structural"):
        raw = json.dumps(mutate_tree(data, json.loads(raw), ["weight_map", "metadata"]), allow_nan=True).encode()
    else:
        raw = mutate_bytes(data, raw)
    open(path, "wb").write(raw)
    run_readers(data, tally, model_readers(workspace, folder, work["out"], heavy=False)[:2])


# ---- config.json ---------------------------------------------------------------------------------------
CONFIG_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size", "max_position_embeddings", "rope_theta", "rope_scaling", "rope_parameters",
               "tie_word_embeddings", "model_type", "architectures", "torch_dtype", "dtype", "quantization_config",
               "auto_map", "rms_norm_eps", "hidden_act", "partial_rotary_factor", "attention_bias", "clex"]


@fuzz(quick=12, soak=450)
@given(data=st.data())
def test_config_json(workspace, work, tally, data):
    folder = fresh_copy(workspace.src, work["folder"])
    path = os.path.join(folder, "config.json")
    raw = open(path, "rb").read()
    if data.draw(st.booleans(), label="structural"):
        config = mutate_tree(data, json.loads(raw), CONFIG_KEYS)
        raw = json.dumps(config, allow_nan=True).encode()
    else:
        raw = mutate_bytes(data, raw)
    open(path, "wb").write(raw)
    run_readers(data, tally, model_readers(workspace, folder, work["out"], heavy=True))


# ---- tokenizer.json ------------------------------------------------------------------------------------
@fuzz(quick=8, soak=300)
@given(data=st.data())
def test_tokenizer_json(workspace, work, tally, data):
    folder = fresh_copy(workspace.src, work["folder"])
    path = os.path.join(folder, "tokenizer.json")
    raw = open(path, "rb").read()
    if data.draw(st.booleans(), label="structural"):
        tokenizer = mutate_tree(data, json.loads(raw), ["model", "vocab", "merges", "type", "added_tokens"])
        raw = json.dumps(tokenizer, allow_nan=True).encode()
    else:
        raw = mutate_bytes(data, raw)
    open(path, "wb").write(raw)
    out, text = work["out"], workspace.text
    readers = [
        (["vocab", "expand", folder, out, "--corpus", text, "--num-new", "4"], out, writes("vocab", out)),
        (["vocab", "fertility", folder, "--corpus", text, "--json"], None, prints_json),
        (["eval", folder, "--text", text, "--ctx", "32", "--max-tokens", "128", "--json"], None, prints_json),
    ]
    run_readers(data, tally, readers)


# ---- mergekit YAML -------------------------------------------------------------------------------------
MERGE_KEYS = ["merge_method", "base_model", "models", "slices", "parameters", "weight", "density", "dtype",
              "out_dtype", "tokenizer_source", "tokenizer", "layer_range", "sources", "filter", "value", "t"]


@fuzz(quick=10, soak=350)
@given(data=st.data())
def test_merge_yaml(workspace, work, tally, data):
    path = str(work["tmp"] / "merge.yml")
    raw = open(workspace.merge_yaml, "rb").read()
    if data.draw(st.booleans(), label="structural"):
        config = mutate_tree(data, yaml.safe_load(raw), MERGE_KEYS)
        if isinstance(config, dict) and data.draw(st.booleans(), label="method"):
            config = {**config, "merge_method": data.draw(st.sampled_from(
                ["linear", "ties", "dare_linear", "slerp", "task_arithmetic", "breadcrumbs", "della", "model_stock",
                 "nuslerp", "passthrough", "karcher", "sce", "nearswap", "arcee_fusion", "bogus"]))}
        raw = yaml.safe_dump(config, allow_unicode=True).encode() if isinstance(config, dict) else json.dumps(config).encode()
    else:
        raw = mutate_bytes(data, raw)
    open(path, "wb").write(raw)
    out = work["out"]
    attempt(tally, ["merge", path, out, "--seed", "1"], out, writes("merge", out))


# ---- lctool.json manifests -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def extended(workspace, tmp_path_factory):
    """An lctool output whose manifest later commands read (extend reads a previous extend's results)."""
    out = str(tmp_path_factory.mktemp("manifest") / "model")
    code, _, err = cli("extend", workspace.src, out, "--method", "yarn", "--factor", "2")
    assert code == 0, err
    return out


@fuzz(quick=8, soak=300)
@given(data=st.data())
def test_manifest(workspace, extended, work, tally, data):
    folder = fresh_copy(extended, work["folder"])
    path = os.path.join(folder, "lctool.json")
    raw = open(path, "rb").read()
    if data.draw(st.booleans(), label="structural"):
        keys = ["operation", "parameters", "results", "inputs", "manifest", "original_theta", "original_length"]
        raw = json.dumps(mutate_tree(data, json.loads(raw), keys), allow_nan=True).encode()
    else:
        raw = mutate_bytes(data, raw)
    open(path, "wb").write(raw)
    run_readers(data, tally, model_readers(workspace, folder, work["out"], heavy=False)[:3])


# ---- data files ----------------------------------------------------------------------------------------
def _data_file(data, workspace, folder) -> tuple[str, str]:
    """A damaged data file and its kind: text, jsonl or a JSON list."""
    kind = data.draw(st.sampled_from(["text", "jsonl", "json-list"]), label="file kind")
    if kind == "text":
        raw = open(workspace.text, "rb").read()[:4000]
    elif kind == "jsonl":
        rows = [{"text": "The quick brown fox jumps over the lazy dog. " * 4}] * 3 + [
            {"prompt": "Q: what jumps? ", "completion": "A: the fox."}]
        rows = rows[:3] if data.draw(st.booleans()) else rows[3:] * 4
        if data.draw(st.booleans(), label="structural"):
            rows = mutate_tree(data, rows, ["text", "prompt", "completion"])
            raw = b"\n".join(json.dumps(r, allow_nan=True).encode() for r in (rows if isinstance(rows, list) else [rows]))
        else:
            raw = "\n".join(json.dumps(r) for r in rows).encode()
    else:
        values = data.draw(st.lists(json_values, max_size=6) | st.just([1.0] * 8), label="list")
        raw = json.dumps(values, allow_nan=True).encode()
    if data.draw(st.booleans(), label="bytes"):
        raw = mutate_bytes(data, raw)
    suffix = {"text": ".txt", "jsonl": ".jsonl", "json-list": ".json"}[kind]
    path = os.path.join(folder, f"data{suffix}")
    open(path, "wb").write(raw)
    return path, kind


@fuzz(quick=10, soak=350)
@given(data=st.data())
def test_data_files(workspace, work, tally, data):
    path, kind = _data_file(data, workspace, str(work["tmp"]))
    src, out = workspace.src, work["out"]
    readers = {
        "text": [
            (["eval", src, "--text", path, "--ctx", "32", "--json"], None, prints_json),
            (["quantize", src, out, "--method", "gptq", "--group-size", "32", "--calib", path, "--calib-n", "2",
              "--calib-len", "32"], out, writes("quantize", out)),
            (["vocab", "expand", src, out, "--corpus", path, "--num-new", "4"], out, writes("vocab", out)),
            (["vocab", "trim", src, out, "--corpus", path], out, writes("vocab", out)),
            (["prune", src, out, "--ratio", "0.2", "--calib", path, "--calib-n", "2", "--calib-len", "32"], out,
             writes("prune", out)),
        ],
        "jsonl": [],
        "json-list": [
            (["extend", src, out, "--method", "longrope", "--factor", "2", "--short-factor", path, "--long-factor",
              path], out, writes("extend", out)),
            (["vocab", "expand", src, out, "--tokens", path], out, writes("vocab", out)),
        ],
    }
    finetune = (["finetune", src, out, "--data", path, "--seq-len", "16", "--batch", "2", "--steps", "1",
                 "--lora-r", "2"], out, writes("finetune", out))
    if SOAK or kind == "jsonl":
        readers[kind].append(finetune)
    run_readers(data, tally, readers[kind])


# ---- caps: a hostile file cannot make a reader allocate -------------------------------------------------
@pytest.mark.parametrize("claimed", ["over the cap", "past the end"])
def test_header_length_is_capped_before_reading(workspace, work, tally, claimed):
    """A header that claims more than the cap (or than the file holds) is refused from its 8-byte prefix:
    the file here is sparse, so reading the claimed bytes would allocate gigabytes."""
    import resource

    from lctool.io.safetensors_format import MAX_HEADER_BYTES

    folder = fresh_copy(workspace.src, work["folder"])
    shard = os.path.join(folder, "model.safetensors")
    length = MAX_HEADER_BYTES + 1 if claimed == "over the cap" else MAX_HEADER_BYTES
    with open(shard, "wb") as f:
        f.write(struct.pack("<Q", length) + b"{")
        f.truncate(8 + (4 * 2**30 if claimed == "over the cap" else MAX_HEADER_BYTES - 1))
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, _, err = cli("inspect", folder)
    assert_clean_error(code, err)
    assert ("cap" if claimed == "over the cap" else "past the end") in err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 64 * 1024  # KiB: no big read
    tally.add("refused")


def test_json_files_are_capped(workspace, work, tally):
    from lctool.io.reader import MAX_JSON_BYTES

    folder = fresh_copy(workspace.src, work["folder"])
    for name in ("config.json", "lctool.json", "tokenizer.json"):
        path = os.path.join(folder, name)
        original = open(path, "rb").read() if os.path.exists(path) else b"{}"
        with open(path, "wb") as f:
            f.write(b"{")
            f.truncate(MAX_JSON_BYTES + 1)  # sparse: nothing is allocated unless a reader loads it
        readers = [["inspect", folder]] if name != "tokenizer.json" else [
            ["vocab", "fertility", folder, "--corpus", workspace.text]]
        for args in readers:
            code, _, err = cli(*args)
            assert_clean_error(code, err)
            assert "cap" in err, err
            tally.add("refused")
        open(path, "wb").write(original)


# ---- as users see it: a real process, stderr holding exactly one line ------------------------------------
def test_damaged_inputs_in_a_real_process(workspace, tmp_path, tally):
    from tests.reliability.common import spawn

    truncated = fresh_copy(workspace.src, str(tmp_path / "truncated"))
    shard = os.path.join(truncated, "model.safetensors")
    os.truncate(shard, os.path.getsize(shard) // 2)
    bad_config = fresh_copy(workspace.src, str(tmp_path / "bad-config"))
    with open(os.path.join(bad_config, "config.json"), "a") as f:
        f.write("}")
    bad_yaml = str(tmp_path / "bad.yml")
    open(bad_yaml, "w").write("merge_method: linear\nmodels: [\n")
    out = str(tmp_path / "out")
    runs = [spawn("convert", truncated, out), spawn("quantize", bad_config, out, "--method", "rtn"),
            spawn("merge", bad_yaml, out)]
    for process in runs:
        _, err = process.communicate(timeout=1800)
        assert process.returncode == 2, err
        assert err.count("\n") == 1 and err.startswith("error: "), err  # --quiet: nothing but the error
        tally.add("refused")
    assert not os.path.exists(out) and leftovers(str(tmp_path)) == []
