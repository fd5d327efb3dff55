"""Checkpoint I/O: round trips, sharding, atomicity, interruption, corrupt input and path escapes."""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from lctool.errors import LctoolError
from lctool.io import Checkpoint, CheckpointWriter
from lctool.ops.convert import ConvertOptions, convert
from tests.tiny_models import save_tiny


def _logits(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_round_trip_bit_identical_and_stock_loadable(tmp_path, family):
    src = save_tiny(str(tmp_path / "src"), family=family)
    dst = str(tmp_path / "dst")
    convert(src, dst, ConvertOptions(max_shard_size="20KB"))
    a, b = Checkpoint(src), Checkpoint(dst)
    assert len(b.shard_files) > 3  # really sharded
    assert sorted(a.tensor_names()) == sorted(b.tensor_names())
    for name in a.tensor_names():
        ta, tb = a.get(name), b.get(name)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), name
    ids = torch.randint(0, 256, (1, 12))
    assert torch.equal(_logits(src, ids), _logits(dst, ids))
    for f in ("tokenizer.json", "generation_config.json"):
        assert os.path.exists(os.path.join(dst, f)) == os.path.exists(os.path.join(src, f))
    manifest = json.load(open(os.path.join(dst, "lctool.json")))
    assert manifest["operation"] == "convert"
    assert set(manifest["inputs"][0]["shards"]) == set(a.shard_files)
    assert manifest["peak_rss_mb"] > 0 and manifest["wall_time_s"] >= 0
    index = json.load(open(os.path.join(dst, "model.safetensors.index.json")))
    assert set(index["weight_map"]) == set(a.tensor_names())


def test_our_files_read_by_safetensors_and_lineage(tmp_path):
    src = save_tiny(str(tmp_path / "src"))
    mid, dst = str(tmp_path / "mid"), str(tmp_path / "dst")
    convert(src, mid, ConvertOptions(dtype="bfloat16"))
    convert(mid, dst)
    theirs = load_file(os.path.join(dst, "model.safetensors"))
    ours = Checkpoint(dst)
    assert all(torch.equal(theirs[n], ours.get(n)) for n in theirs)
    assert all(t.dtype == torch.bfloat16 for t in theirs.values())
    assert [step["operation"] for step in ours.lineage()] == ["convert", "convert"]
    assert ours.lineage()[0]["parameters"]["dtype"] == "bfloat16"


def test_refuses_existing_target_without_force(tmp_path):
    src = save_tiny(str(tmp_path / "src"))
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(LctoolError, match="--force"):
        convert(src, str(dst))
    assert (dst / "keep.txt").read_text() == "mine"
    convert(src, str(dst), force=True)
    assert not (dst / "keep.txt").exists() and (dst / "lctool.json").exists()
    assert [p for p in os.listdir(tmp_path) if "lctool-tmp" in p] == []


def test_refuses_overwriting_input(tmp_path):
    src = save_tiny(str(tmp_path / "src"))
    with pytest.raises(LctoolError, match="overwrite the input"):
        convert(src, src, force=True)


def test_failure_leaves_target_untouched(tmp_path):
    src = save_tiny(str(tmp_path / "src"))
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), CheckpointWriter(str(target), operation="t", inputs=[Checkpoint(src)]) as w:
        w.write_config({"model_type": "llama"})
        w.add_tensor("a", torch.zeros(3))
        raise RuntimeError("boom")
    assert not target.exists()
    assert [p for p in os.listdir(tmp_path) if "lctool-tmp" in p] == []


def test_concurrent_writer_refused(tmp_path):
    target = str(tmp_path / "out")
    with CheckpointWriter(target, operation="a") as first:
        first.write_config({})
        with pytest.raises(LctoolError, match="another lctool process"), CheckpointWriter(target, operation="b"):
            pass
    assert json.load(open(os.path.join(target, "lctool.json")))["operation"] == "a"


_SLOW_WRITER = """
import signal, sys, time, torch
from lctool.io import CheckpointWriter
# pytest-xdist workers ignore SIGTERM and children inherit that; a user's process would not.
signal.signal(signal.SIGTERM, signal.SIG_DFL)
signal.signal(signal.SIGINT, signal.default_int_handler)
with CheckpointWriter(sys.argv[1], operation="slow", max_shard_size="1MB") as w:
    w.write_config({"model_type": "llama"})
    for i in range(400):
        w.add_tensor(f"t{i}", torch.full((64, 1024), float(i)))
        print(i, flush=True)
        if i == 30:
            sys.stdin.read()  # mid-write until the test signals us: no race with a loaded machine
        time.sleep(0.005)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_interrupted_write_leaves_nothing(tmp_path, sig):
    target = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(target)],
                            stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    if sig == signal.SIGTERM:
        # the CLI turns SIGTERM into a clean unwind; a bare script needs the same handler
        pass
    for _ in range(30):
        proc.stdout.readline()
    proc.send_signal(sig)
    proc.stdin.close()  # a handler that only records the signal lets the blocked read resume: end it
    proc.wait(timeout=60)
    assert not target.exists()
    leftovers = [p for p in os.listdir(tmp_path) if "lctool-tmp" in p]
    if sig == signal.SIGINT:
        assert leftovers == []  # KeyboardInterrupt unwinds through the writer
    # the next run cleans what a killed run left and succeeds
    with CheckpointWriter(str(target), operation="next") as w:
        w.write_config({})
    assert [p for p in os.listdir(tmp_path) if "lctool-tmp" in p] == []
    assert (target / "lctool.json").exists()


def test_sigkill_during_force_replace_keeps_old_target(tmp_path):
    target = tmp_path / "out"
    with CheckpointWriter(str(target), operation="old") as w:
        w.write_config({"old": True})
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER.replace('operation="slow"', 'operation="slow", force=True'),
                             str(target)], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    for _ in range(20):
        proc.stdout.readline()
    proc.kill()
    proc.wait(timeout=60)
    assert json.load(open(target / "config.json")) == {"old": True}


# ---- corrupt input -------------------------------------------------------------------------------

def _write_raw(path, header_bytes, data=b"", length=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes) if length is None else length))
        f.write(header_bytes)
        f.write(data)


def _folder_with(tmp_path, header, data=b"", length=None):
    folder = tmp_path / "bad"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8,
        "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 10}))
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    _write_raw(str(folder / "model.safetensors"), raw, data, length)
    return str(folder)


@pytest.mark.parametrize(
    "header,data,length,message",
    [
        (b"", b"", 1000, "runs past the end"),
        (b"", b"", 2**63, "cap"),
        (b"[1,2]", b"", None, "not an object"),
        (b"{not json", b"", None, "not valid UTF-8 JSON"),
        ({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 80]}}, b"\0" * 8, None, "outside the data"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8, None, "needs 8"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "invalid shape"),
    ],
)
def test_corrupt_headers_one_line_errors(tmp_path, header, data, length, message):
    folder = _folder_with(tmp_path, header, data, length)
    with pytest.raises(LctoolError, match=message):
        Checkpoint(folder)


def test_truncated_file(tmp_path):
    src = save_tiny(str(tmp_path / "src"))
    path = os.path.join(src, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(LctoolError, match="outside the data section"):
        Checkpoint(src)


def test_shape_mismatch_with_config(tmp_path):
    src = save_tiny(str(tmp_path / "src"))
    config = json.load(open(os.path.join(src, "config.json")))
    config["intermediate_size"] = 96
    json.dump(config, open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(LctoolError, match="config.json implies"):
        Checkpoint(src)


def test_missing_things(tmp_path):
    with pytest.raises(LctoolError, match="no checkpoint folder"):
        Checkpoint(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LctoolError, match="config.json not found"):
        Checkpoint(str(tmp_path / "empty"))
    src = save_tiny(str(tmp_path / "src"))
    os.remove(os.path.join(src, "model.safetensors"))
    with pytest.raises(LctoolError, match="no model.safetensors"):
        Checkpoint(src)


def test_unsupported_architecture(tmp_path):
    src = save_tiny(str(tmp_path / "src"))
    config = json.load(open(os.path.join(src, "config.json")))
    config["model_type"] = "gpt2"
    json.dump(config, open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(LctoolError, match="supported: gemma, llama"):
        Checkpoint(src)


@pytest.mark.parametrize("escape", ["../outside.safetensors", "/etc/passwd", "link.safetensors"])
def test_index_paths_escaping_the_folder(tmp_path, escape):
    src = str(tmp_path / "src")
    convert(save_tiny(str(tmp_path / "orig")), src, ConvertOptions(max_shard_size="40KB"))
    outside = tmp_path / "outside.safetensors"
    save_file({"x": torch.zeros(1)}, str(outside))
    if escape == "link.safetensors":
        os.symlink(outside, os.path.join(src, escape))
    index_path = os.path.join(src, "model.safetensors.index.json")
    index = json.load(open(index_path))
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = escape
    json.dump(index, open(index_path, "w"))
    with pytest.raises(LctoolError, match="outside the checkpoint|absolute path"):
        Checkpoint(src)


def test_missing_shard(tmp_path):
    src = str(tmp_path / "src")
    convert(save_tiny(str(tmp_path / "orig")), src, ConvertOptions(max_shard_size="40KB"))
    shards = sorted(f for f in os.listdir(src) if f.startswith("model-0"))
    os.remove(os.path.join(src, shards[1]))
    with pytest.raises(LctoolError, match="missing shard"):
        Checkpoint(src)


def test_nan_detection(tmp_path):
    src = save_tiny(str(tmp_path / "src"))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, os.path.join(src, "model.safetensors"))
    with pytest.raises(LctoolError, match="NaN/Inf"):
        convert(src, str(tmp_path / "out"), ConvertOptions(check_finite=True))
    assert not (tmp_path / "out").exists()


def test_open_reads_no_tensor_data(tmp_path):
    """Opening touches headers only: a checkpoint whose data section is unreadable still opens."""
    src = save_tiny(str(tmp_path / "src"))
    path = os.path.join(src, "model.safetensors")
    start = time.perf_counter()
    ckpt = Checkpoint(src)
    assert time.perf_counter() - start < 1.0
    os.chmod(path, 0o200) if os.getuid() != 0 else None
    assert ckpt.num_parameters() > 0


def test_cli_errors_are_one_line(tmp_path, run_cli):
    code, out, err = run_cli("inspect", tmp_path / "nope")
    assert code == 2 and err.strip().count("\n") == 0 and err.startswith("error: ")
    src = save_tiny(str(tmp_path / "src"))
    code, out, err = run_cli("convert", src, tmp_path / "o", "--dtype", "int3")
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    code, out, err = run_cli("convert", src, tmp_path / "o", "--max-shard-size", "lots")
    assert code == 2 and "cannot read size" in err
    assert not (tmp_path / "o").exists()


def test_inspect_cli(tmp_path, run_cli):
    src = save_tiny(str(tmp_path / "src"))
    dst = str(tmp_path / "dst")
    assert run_cli("convert", src, dst)[0] == 0
    code, out, err = run_cli("inspect", dst, "--json")
    info = json.loads(out)
    assert code == 0 and info["family"] == "llama" and info["kv_heads"] == 2
    assert info["lctool"]["lineage"][0]["operation"] == "convert"
    code, out, _ = run_cli("inspect", dst)
    assert code == 0 and "llama" in out and "lineage" in out


def test_streamed_shard_with_reserved_header(tmp_path, monkeypatch):
    """Large shards stream after a reserved header; a header that outgrows it is still correct."""
    from lctool.io import writer as writer_mod

    monkeypatch.setattr(writer_mod, "STREAM_AFTER_BYTES", 1000)
    monkeypatch.setattr(writer_mod, "MAX_HEADER_RESERVE", 4096)
    monkeypatch.setattr(writer_mod, "MIN_HEADER_RESERVE", 64)
    tensors = {f"layer.{i}.weight": torch.randn(8, 40) for i in range(300)}  # header >> 4 KB
    for name, count in (("fits", 3), ("grows", 300)):
        target = str(tmp_path / name)
        with CheckpointWriter(target, operation="t", require_config=False) as w:
            for key in list(tensors)[:count]:
                w.add_tensor(key, tensors[key])
        back = load_file(os.path.join(target, "model.safetensors"))
        assert len(back) == count and all(torch.equal(back[k], tensors[k]) for k in back)


def test_many_live_tensors_and_writes_stay_private(tmp_path):
    """Mapped tensors are copy-on-write (writing one never touches the file), and thousands can
    be alive at once."""
    import resource

    path = str(tmp_path / "many")
    with CheckpointWriter(path, operation="t", require_config=False) as w:
        for i in range(300):
            w.add_tensor(f"t{i}", torch.full((4, 1024), float(i)))
    before = open(os.path.join(path, "model.safetensors"), "rb").read()
    from lctool.io.safetensors_format import read_header

    header = read_header(os.path.join(path, "model.safetensors"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # fewer descriptors than tensors
    try:
        fake = Checkpoint.__new__(Checkpoint)
        fake.headers, fake._file_of = {"model.safetensors": header}, dict.fromkeys(header.entries, "model.safetensors")
        alive = [fake.get(f"t{i}") for i in range(300)]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert all(float(t[0, 0]) == i for i, t in enumerate(alive))
    alive[5].add_(1000)
    assert open(os.path.join(path, "model.safetensors"), "rb").read() == before


def test_large_tensors_mapped_to_huge_page_bounds_stay_exact_and_private(tmp_path):
    """Ranges of 2 MiB or more are mapped out to 2 MiB boundaries (so whole huge page-cache folios
    map at once); each tensor still holds exactly its own bytes, near the file's end too, and writes
    reach neither the file, its neighbours nor a later read."""
    from lctool.io import mapping
    from lctool.io.safetensors_format import read_header

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "head": torch.randn(3, generator=generator).half(),  # leaves what follows off any page boundary
        "big": torch.randn(1024 * 1024 + 5, generator=generator).half(),  # just over 2 MiB
        "mid": torch.randn(7, generator=generator).half(),
        "tail": torch.randn(1536 * 1024, generator=generator).half(),  # 3 MiB, ends at the end of the file
    }
    path = str(tmp_path / "big")
    with CheckpointWriter(path, operation="t", require_config=False) as w:
        for name, tensor in tensors.items():
            w.add_tensor(name, tensor)
    file = os.path.join(path, "model.safetensors")
    header, size = read_header(file), os.path.getsize(file)
    for name in ("big", "tail"):
        offset, length = header.data_start + header.entries[name].start, header.entries[name].nbytes
        first, end = mapping._mapped_span(offset, length, size)
        assert first % mapping._HUGE == 0 and first <= offset and offset + length <= end <= -(-size // 4096) * 4096
    offset = header.data_start + header.entries["mid"].start
    assert mapping._mapped_span(offset, 14, size) == (offset - offset % 4096, offset + 14)

    before = open(file, "rb").read()
    reader = Checkpoint.__new__(Checkpoint)
    reader.headers, reader._file_of = {"model.safetensors": header}, dict.fromkeys(header.entries, "model.safetensors")
    alive = {name: reader.get(name) for name in tensors}
    assert all(torch.equal(alive[name], tensor) for name, tensor in tensors.items())
    for tensor in alive.values():
        tensor.fill_(7.0)
    assert open(file, "rb").read() == before
    assert all(torch.equal(reader.get(name), tensor) for name, tensor in tensors.items())


def test_file_truncated_after_opening(tmp_path):
    """A shard cut short after the checkpoint was opened is one clear error, never a crash on access."""
    src = save_tiny(str(tmp_path / "src"))
    checkpoint = Checkpoint(src)
    last = max(checkpoint.tensor_names(), key=lambda name: checkpoint.entry(name).end)
    path = os.path.join(src, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)
    with pytest.raises(LctoolError, match="truncated"):
        checkpoint.get(last)


def test_cli_usage_errors_exit_2_in_one_line(run_cli):
    for args in (["convert", "a", "b", "--nope"], ["no-such-command"], []):
        code, out, err = run_cli(*args)
        assert code == 2 and "Traceback" not in err, args
    code, out, err = run_cli("convert", "a", "b", "--nope")
    assert err.strip().startswith("error: No such option") and err.strip().count("\n") == 0


def test_layers_beyond_num_hidden_layers_are_refused(tmp_path):
    """A config declaring fewer layers than the checkpoint holds is one clear error (the soak found prune
    failing with an IndexError on such a folder)."""
    src = save_tiny(str(tmp_path / "src"))
    config_path = os.path.join(src, "config.json")
    config = json.load(open(config_path))
    config["num_hidden_layers"] -= 1
    json.dump(config, open(config_path, "w"))
    with pytest.raises(LctoolError, match="beyond the"):
        Checkpoint(src)
