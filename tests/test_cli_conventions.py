"""The rules every command follows (docs/cli.md): streams, --json, exit codes, --config, --quiet/--debug,
--device/--dtype, $LCTOOL_CACHE, and the lineage `lctool inspect` shows."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import typer
from safetensors import safe_open

from tests.tiny_models import save_tiny


def _commands():
    """(path, click command) of every leaf command, sub-commands included."""
    from lctool.cli.main import app

    found = []

    def walk(command, path):
        children = getattr(command, "commands", None)
        if children:
            for name, child in children.items():
                walk(child, [*path, name])
        else:
            found.append((" ".join(path), command))

    walk(typer.main.get_command(app), [])
    return found


def _flags(command) -> set[str]:
    return {flag for param in command.params for flag in (*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ()))}


def _one_json_object(stdout: str) -> dict:
    decoder = json.JSONDecoder()
    obj, end = decoder.raw_decode(stdout)
    assert stdout[end:].strip() == "", f"more than one object on stdout: {stdout[end:][:200]!r}"
    assert isinstance(obj, dict)
    return obj


def _one_error_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _dtypes(folder) -> set[str]:
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        return {str(f.get_slice(name).get_dtype()) for name in f.keys()}


def test_every_command_has_the_shared_options():
    commands = _commands()
    names = {path for path, _ in commands}
    assert {"inspect", "convert", "eval", "extend", "finetune", "quantize", "prune", "merge", "testbed build",
            "testbed path", "vocab expand", "vocab trim", "vocab fertility"} <= names
    for path, command in commands:
        flags = _flags(command)
        assert {"--json", "--config", "--quiet", "--debug"} <= flags, (path, flags)


@pytest.mark.parametrize("args", [("convert", "--dtype", "int4"), ("eval", "--dtype", "int4"),
                                  ("merge", "--dtype", "int4"), ("eval", "--device", "tpu"),
                                  ("merge", "--device", "tpu"), ("eval", "--device", "cuda:7"),
                                  ("merge", "--device", "cuda:7")])
def test_device_and_dtype_are_checked_alike(tmp_path, run_cli, args):
    command, option, value = args
    tiny = save_tiny(str(tmp_path / "tiny"))
    target = [tiny, tmp_path / "out"] if command != "eval" else [tiny]
    if command == "merge":
        target = ["--method", "linear", tiny, tiny, tmp_path / "out"]
    code, out, err = run_cli(command, *target, option, value)
    assert code == 2, (code, out, err)
    _one_error_line(err)
    expected = "is not one of float32, bfloat16, float16" if option == "--dtype" else "--device"
    assert expected in err
    assert not (tmp_path / "out").exists()


def test_dtype_aliases_mean_the_same_everywhere(tmp_path, run_cli):
    tiny = save_tiny(str(tmp_path / "tiny"))
    code, out, err = run_cli("convert", tiny, tmp_path / "bf16", "--dtype", "bf16")
    assert code == 0, err
    assert _dtypes(tmp_path / "bf16") == {"BF16"}


def test_json_is_one_object_and_stray_prints_go_to_stderr(tmp_path, run_cli, monkeypatch):
    import lctool.io.describe as describe_module

    real = describe_module.describe

    def noisy(path):
        print("a library talking on stdout")
        return real(path)

    monkeypatch.setattr(describe_module, "describe", noisy)
    tiny = save_tiny(str(tmp_path / "tiny"))
    code, out, err = run_cli("inspect", tiny, "--json")
    assert code == 0
    assert _one_json_object(out)["family"] == "llama"
    assert "a library talking on stdout" in err
    # Without --json the table is the only thing on stdout, too.
    code, out, err = run_cli("inspect", tiny)
    assert code == 0 and "a library talking" not in out and "llama" in out and "a library talking" in err
    # --quiet sends it nowhere.
    code, out, err = run_cli("inspect", tiny, "--quiet")
    assert code == 0 and err == "" and "a library talking" not in out


def test_json_results_of_writing_commands(tmp_path, run_cli):
    tiny = save_tiny(str(tmp_path / "tiny"))
    code, out, err = run_cli("convert", tiny, tmp_path / "c", "--json")
    assert code == 0, err
    assert _one_json_object(out) == {"output": str(tmp_path / "c")}
    code, out, err = run_cli("quantize", tmp_path / "c", tmp_path / "q", "--method", "rtn", "--group-size", "32",
                             "--json")
    assert code == 0, err
    summary = _one_json_object(out)
    assert summary["method"] == "rtn" and summary["layers"]


def test_exit_codes(tmp_path, run_cli, monkeypatch):
    import lctool.io.describe as describe_module

    tiny = save_tiny(str(tmp_path / "tiny"))
    assert run_cli("inspect", tiny)[0] == 0
    # 2: bad input, and bad usage
    code, _, err = run_cli("inspect", tmp_path / "missing")
    assert code == 2 and "no checkpoint folder" in _one_error_line(err)
    code, _, err = run_cli("inspect", tiny, "--no-such-option")
    assert code == 2 and "--no-such-option" in _one_error_line(err)
    code, _, err = run_cli("no-such-command")
    assert code == 2 and _one_error_line(err)

    # 1: a failure during work (one line, the traceback only with --debug, before or after the command)
    def broken(path):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(describe_module, "describe", broken)
    code, out, err = run_cli("inspect", tiny)
    assert code == 1 and err.splitlines()[-1] == "error: RuntimeError: disk on fire" and "Traceback" not in err
    for args in (("--debug", "inspect", tiny), ("inspect", tiny, "--debug")):
        code, out, err = run_cli(*args)
        assert code == 1 and "Traceback" in err and "disk on fire" in err

    # 130: interrupted
    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(describe_module, "describe", interrupted)
    code, out, err = run_cli("inspect", tiny, "--json")
    assert code == 130 and err.strip() == "error: interrupted"
    assert _one_json_object(out) == {"error": "interrupted", "exit_code": 130}


def test_json_errors_are_one_object_too(tmp_path, run_cli):
    code, out, err = run_cli("inspect", tmp_path / "missing", "--json")
    assert code == 2 and _one_error_line(err)
    assert _one_json_object(out) == {"error": f"no checkpoint folder at {tmp_path / 'missing'}", "exit_code": 2}
    code, out, err = run_cli("quantize", tmp_path / "missing", tmp_path / "q", "--json")  # no --method: usage
    assert code == 2 and _one_json_object(out)["exit_code"] == 2 and "--method" in out


def test_config_recipe(tmp_path, run_cli):
    tiny = save_tiny(str(tmp_path / "tiny"))
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("method: rtn\nbits: 4\ngroup-size: 32\nasym: true\nskip: [down, up]\n")
    # A required option (--method) may come from the recipe; `asym: true` is the negative flag.
    code, out, err = run_cli("quantize", tiny, tmp_path / "q", "--config", recipe, "--json")
    assert code == 0, err
    parameters = json.loads((tmp_path / "q" / "lctool.json").read_text())["parameters"]
    assert (parameters["method"], parameters["bits"], parameters["group_size"], parameters["sym"]) == ("rtn", 4, 32,
                                                                                                       False)
    assert parameters["skip"] == ["down", "up"]  # a YAML list becomes --skip down,up
    # Flags given explicitly win over the recipe.
    code, out, err = run_cli("quantize", tiny, tmp_path / "q8", "--config", recipe, "--bits", "8", "--sym")
    assert code == 0, err
    parameters = json.loads((tmp_path / "q8" / "lctool.json").read_text())["parameters"]
    assert (parameters["bits"], parameters["group_size"], parameters["sym"]) == (8, 32, True)


@pytest.mark.parametrize(("text", "needle"), [
    ("bogus: 1\n", "unknown option 'bogus'"),
    ("model: x\n", "model is an argument"),
    ("bits: four\n", "bits"),                     # the click type, as for --bits four
    ("method: rtn\nbits: 5\n", "bits"),            # the pydantic model, as for --bits 5
    ("- bits\n", "expected a mapping"),
    ("bits: [4\n", "not valid YAML"),
    ("group-size: 32\ngroup_size: 64\n", "given twice"),
])
def test_bad_recipes_are_one_line_usage_errors(tmp_path, run_cli, text, needle):
    tiny = save_tiny(str(tmp_path / "tiny"))
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(text)
    code, out, err = run_cli("quantize", tiny, tmp_path / "q", "--method", "rtn", "--config", recipe)
    assert code == 2 and needle in _one_error_line(err), err
    assert not (tmp_path / "q").exists()


def test_recipe_validated_like_flags(tmp_path, run_cli):
    """The same value is refused with the same message from a flag and from a recipe."""
    tiny = save_tiny(str(tmp_path / "tiny"))
    recipe = tmp_path / "eval.yml"
    recipe.write_text("ctx: 1\n")
    from_flag = run_cli("eval", tiny, "--ctx", "1")
    from_recipe = run_cli("eval", tiny, "--config", recipe)
    assert from_flag[0] == from_recipe[0] == 2
    assert from_flag[2] == from_recipe[2] and "ctx" in from_flag[2]


def test_cache_env_is_checked_for_every_command(tmp_path, run_cli, monkeypatch):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    monkeypatch.setenv("LCTOOL_CACHE", str(not_a_folder))
    for args in (("inspect", tmp_path), ("testbed", "path", "--no-build"), ("vocab", "fertility", tmp_path)):
        code, _, err = run_cli(*args)
        assert code == 2 and "LCTOOL_CACHE" in _one_error_line(err), args


def test_testbed_path_prints_a_bare_path(tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("LCTOOL_CACHE", str(tmp_path / "cache"))
    code, out, err = run_cli("testbed", "path", "--no-build")
    assert code == 2 and "not built" in err  # an empty cache: nothing is built behind your back
    from lctool.ops import testbed as testbed_module

    long_path = str(tmp_path / ("a-very-long-folder-name-" * 5) / "quick")
    monkeypatch.setattr(testbed_module, "testbed_path", lambda preset, build, log: long_path)
    code, out, err = run_cli("testbed", "path")
    assert code == 0 and out == long_path + "\n"  # no wrapping or styling: usable as $(lctool testbed path)


def test_lineage_through_a_chain_and_a_merge(tmp_path, run_cli):
    base = save_tiny(str(tmp_path / "base"))
    a, b = save_tiny(str(tmp_path / "a"), seed=1), save_tiny(str(tmp_path / "b"), seed=2)
    assert run_cli("convert", a, tmp_path / "a16", "--dtype", "float16")[0] == 0
    assert run_cli("convert", tmp_path / "a16", tmp_path / "a32", "--dtype", "float32")[0] == 0
    code, _, err = run_cli("merge", "--method", "task_arithmetic", "--base", base, "--weight", "0.5,0.5",
                           tmp_path / "a32", b, tmp_path / "merged")
    assert code == 0, err
    code, out, _ = run_cli("inspect", tmp_path / "merged", "--json")
    lineage = _one_json_object(out)["lctool"]["lineage"]
    assert [step["operation"] for step in lineage] == ["convert", "convert", "merge"]
    assert [step["parameters"]["dtype"] for step in lineage[:2]] == ["float16", "float32"]
    assert lineage[1]["inputs"] == [str(tmp_path / "a16")]
    assert str(tmp_path / "a32") in lineage[2]["inputs"] and b in lineage[2]["inputs"]
    # Each manifest records the sha256 of its input's manifest file.
    manifest = json.loads((tmp_path / "merged" / "lctool.json").read_text())
    by_path = {source["path"]: source for source in manifest["inputs"]}
    digest = hashlib.sha256((tmp_path / "a32" / "lctool.json").read_bytes()).hexdigest()
    assert by_path[str(tmp_path / "a32")]["manifest_sha256"] == digest
    assert by_path[b]["manifest_sha256"] is None  # not made by lctool
    code, out, _ = run_cli("inspect", tmp_path / "merged")
    assert code == 0 and "lineage 3" in out and "merge" in out
