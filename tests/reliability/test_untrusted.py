"""Nothing from an input folder runs unless the user passes --trust-remote-code: not a config's auto_map
code, not a tokenizer's, not a pickle. Symlinks and names that leave the input folder are refused.

The hostile files all try to create a marker file; each command must leave it absent, and either work
without the code or refuse in one line.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest

from tests.reliability.common import SOAK, assert_clean_error, check_output, cli, leftovers, reset


class _Payload:
    """Unpickling this creates the marker folder."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _plant_code(folder: str, marker: str) -> None:
    """auto_map code for the config and the tokenizer, and a module that would run on import."""
    code = f"import os\nos.mkdir({marker!r})\n"
    for module in ("evil_model.py", "evil_tokenizer.py", "__init__.py"):
        with open(os.path.join(folder, module), "w") as f:
            f.write(code)
    config_path = os.path.join(folder, "config.json")
    config = json.load(open(config_path))
    config["auto_map"] = {"AutoConfig": "evil_model.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilModel"}
    json.dump(config, open(config_path, "w"))
    tokenizer_config_path = os.path.join(folder, "tokenizer_config.json")
    tokenizer_config = json.load(open(tokenizer_config_path))
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}
    json.dump(tokenizer_config, open(tokenizer_config_path, "w"))


def _plant_pickles(folder: str, marker: str) -> None:
    payload = pickle.dumps({"model.embed_tokens.weight": _Payload(marker)})
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "rng_state.pth", "scheduler.pt"):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(payload)


@pytest.fixture
def hostile(workspace, tmp_path):
    """A model folder carrying code and pickles, and the marker they would create."""
    folder = str(tmp_path / "hostile")
    shutil.copytree(workspace.src, folder)
    marker = str(tmp_path / "MARKER")
    _plant_code(folder, marker)
    _plant_pickles(folder, marker)
    return folder, marker


def _commands(workspace, folder: str, out: str) -> list[list[str]]:
    text = workspace.text
    commands = [
        ["inspect", folder, "--json"],
        ["convert", folder, out],
        ["eval", folder, "--text", text, "--ctx", "32", "--max-tokens", "128", "--json"],
        ["extend", folder, out, "--method", "yarn", "--factor", "2"],
        ["finetune", folder, out, "--data", text, "--seq-len", "16", "--batch", "2", "--steps", "1", "--lora-r", "2"],
        ["quantize", folder, out, "--method", "gptq", "--group-size", "32", "--calib", text, "--calib-n", "2",
         "--calib-len", "32"],
        ["prune", folder, out, "--ratio", "0.2", "--calib", text, "--calib-n", "2", "--calib-len", "32"],
        ["merge", "--method", "linear", "--base", folder, folder, workspace.ft1, out],
        ["vocab", "expand", folder, out, "--corpus", text, "--num-new", "4"],
        ["vocab", "fertility", folder, "--corpus", text, "--json"],
    ]
    if SOAK:
        commands += [
            ["extend", folder, out, "--method", "e2llm", "--factor", "2", "--steps", "1", "--corpus", text,
             "--batch-size", "2"],
            ["finetune", folder, out, "--data", text, "--seq-len", "16", "--batch", "2", "--steps", "1", "--lora-r",
             "2", "--merge"],
            ["quantize", folder, out, "--method", "nf4"],
            ["vocab", "trim", folder, out, "--corpus", text],
        ]
    return commands


def test_code_and_pickles_in_the_folder_never_run(workspace, hostile, tmp_path, tally):
    folder, marker = hostile
    out = str(tmp_path / "out")
    for args in _commands(workspace, folder, out):
        reset(out)
        code, stdout, err = cli(*args)
        assert not os.path.exists(marker), f"{args[0]} ran code from the input folder"
        if code == 0:
            tally.add("worked without the code")
            if os.path.exists(out):
                assert not any(name.endswith((".py", ".bin", ".pt", ".pth")) for name in os.listdir(out)), \
                    f"{args[0]} copied code or pickles into its output"
        else:
            assert_clean_error(code, err)
            tally.add("refused")
        assert leftovers(str(tmp_path)) == []


def test_pickle_only_checkpoint_is_refused_unread(workspace, hostile, tmp_path, tally):
    folder, marker = hostile
    os.remove(os.path.join(folder, "model.safetensors"))
    out = str(tmp_path / "out")
    for args in _commands(workspace, folder, out):
        if args[:2] == ["vocab", "fertility"]:
            continue  # reads only the tokenizer, which is intact
        reset(out)
        code, _, err = cli(*args)
        assert not os.path.exists(marker), f"{args[0]} unpickled a file from the input folder"
        assert_clean_error(code, err)
        assert not os.path.exists(out)
        tally.add("refused")


def test_resume_folder_pickles_are_never_loaded(workspace, tmp_path, tally):
    """finetune --resume reads its training folder: planted pickles there must stay unread."""
    out = str(tmp_path / "out")
    marker = str(tmp_path / "MARKER")
    training = str(tmp_path / ".out.lctool-train")
    step = os.path.join(training, "step-00000001")
    os.makedirs(step)
    _plant_pickles(step, marker)
    _plant_pickles(training, marker)
    json.dump({"step": 1, "folder": "step-00000001"}, open(os.path.join(training, "latest.json"), "w"))
    code, _, err = cli("finetune", workspace.src, out, "--data", workspace.text, "--seq-len", "16", "--batch", "2",
                       "--steps", "2", "--lora-r", "2", "--resume")
    assert not os.path.exists(marker)
    assert_clean_error(code, err)
    tally.add("refused")


# ---- paths that leave the folder -----------------------------------------------------------------------
@pytest.mark.parametrize("file", ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                                  "lctool.json", "model.safetensors.index.json"])
def test_symlink_out_of_the_folder_is_refused(workspace, tmp_path, tally, file):
    folder = str(tmp_path / "model")
    code, _, err = cli("convert", workspace.src, folder, "--max-shard-size", "200KB")  # sharded, with a manifest
    assert code == 0, err
    file = file if file != "model.safetensors" else sorted(f for f in os.listdir(folder) if f.startswith("model-"))[0]
    outside = str(tmp_path / f"outside-{file}")
    shutil.move(os.path.join(folder, file), outside)
    os.symlink(outside, os.path.join(folder, file))
    out = str(tmp_path / "out")
    for args in (["inspect", folder, "--json"], ["convert", folder, out]):
        code, _, err = cli(*args)
        assert_clean_error(code, err)
        assert "outside" in err, err
        assert not os.path.exists(out)
        tally.add("refused")


def test_symlink_inside_the_folder_is_fine(workspace, tmp_path):
    folder = str(tmp_path / "model")
    shutil.copytree(workspace.src, folder)
    os.rename(os.path.join(folder, "tokenizer.json"), os.path.join(folder, "real-tokenizer.json"))
    os.symlink("real-tokenizer.json", os.path.join(folder, "tokenizer.json"))
    linked = str(tmp_path / "linked")
    os.symlink(folder, linked)  # the folder itself may be a link
    code, _, err = cli("convert", linked, str(tmp_path / "out"))
    assert code == 0, err
    check_output("convert", str(tmp_path / "out"))
    assert not os.path.islink(os.path.join(tmp_path, "out", "tokenizer.json"))


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_index_names_leaving_the_folder_are_refused(workspace, tmp_path, name):
    folder = str(tmp_path / "model")
    code, _, err = cli("convert", workspace.src, folder, "--max-shard-size", "200KB")
    assert code == 0, err
    shutil.copy(os.path.join(folder, sorted(f for f in os.listdir(folder) if f.startswith("model-"))[0]),
                str(tmp_path / "outside.safetensors"))
    index_path = os.path.join(folder, "model.safetensors.index.json")
    index = json.load(open(index_path))
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = name
    json.dump(index, open(index_path, "w"))
    code, _, err = cli("convert", folder, str(tmp_path / "out"))
    assert_clean_error(code, err)
    assert "outside" in err or "absolute" in err, err
