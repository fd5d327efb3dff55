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
    monkeypatch.setattr(testbed_module, "testbed_path", lambda preset, build, log, **compute: long_path)
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


# ---- --device / --dtype on every command that computes with a model ---------------------------------------
MODEL_COMMANDS = ("eval", "merge", "quantize", "prune", "extend", "finetune", "vocab expand", "testbed build")


def _command_args(command: str, tiny: str, out) -> list:
    """A command line that would run (or fail later) but for the --device/--dtype given after it."""
    return {
        "eval": ["eval", tiny],
        "merge": ["merge", "--method", "linear", tiny, tiny, out],
        "quantize": ["quantize", tiny, out, "--method", "rtn"],
        "prune": ["prune", tiny, out, "--ratio", "0.2"],
        "extend": ["extend", tiny, out, "--method", "e2llm", "--factor", "2"],
        "finetune": ["finetune", tiny, out, "--data", "wiki"],
        "vocab expand": ["vocab", "expand", tiny, out, "--corpus", "wiki", "--num-new", "4"],
        "testbed build": ["testbed", "build", out],
    }[command]


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_model_commands_document_device_and_dtype(run_cli, command):
    code, out, _ = run_cli(*command.split(), "--help")
    assert code == 0 and "--device" in out and "--dtype" in out, out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal needs a machine without CUDA")
@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_an_absent_cuda_is_refused_before_any_work(tmp_path, run_cli, command):
    tiny = save_tiny(str(tmp_path / "tiny"))
    code, out, err = run_cli(*_command_args(command, tiny, tmp_path / "out"), "--device", "cuda")
    assert code == 2, (code, out, err)
    assert "--device" in _one_error_line(err) and "no CUDA device" in err
    assert sorted(os.listdir(tmp_path)) == ["tiny"]  # no output, no temp or training folder


@pytest.mark.parametrize(("command", "dtype", "accepted"), [
    ("vocab expand", "float64", True), ("merge", "float64", True), ("quantize", "float64", False),
    ("finetune", "float64", False), ("prune", "bf16", True), ("extend", "bogus", False), ("testbed build", "int8", False),
])
def test_dtype_spelling_is_checked_per_command(tmp_path, run_cli, monkeypatch, command, dtype, accepted):
    """An accepted dtype gets past option parsing (the command then fails later on purpose: no text, a
    model listed twice, nothing runs); a refused one is a usage error naming what the command accepts."""
    import lctool.data as data

    def no_text(*args, **kwargs):
        raise LctoolError("stop here")

    from lctool.errors import LctoolError

    monkeypatch.setattr(data, "load_text_source", no_text)
    monkeypatch.setattr(data, "calibration_batches", no_text)
    monkeypatch.setenv("LCTOOL_CACHE", str(tmp_path / "cache"))  # testbed build: nothing cached, nothing built
    from lctool.ops import testbed as testbed_module

    monkeypatch.setattr(testbed_module, "build_testbed", no_text)
    tiny = save_tiny(str(tmp_path / "tiny"))
    code, out, err = run_cli(*_command_args(command, tiny, tmp_path / "out"), "--dtype", dtype, "--quiet")
    _one_error_line(err)
    if accepted:
        assert code == 2 and "--dtype" not in err and "is not one of" not in err, err
    else:
        assert code == 2 and "--dtype" in err and "is not one of" in err, err


def test_float16_training_on_cpu_is_refused(tmp_path, run_cli):
    """accelerate has no CPU fp16 autocast: it would silently train in float32."""
    tiny = save_tiny(str(tmp_path / "tiny"))
    code, _, err = run_cli("finetune", tiny, tmp_path / "out", "--data", "wiki", "--dtype", "float16")
    assert code == 2 and "float16 trains on cuda only" in _one_error_line(err)
    assert sorted(os.listdir(tmp_path)) == ["tiny"]


def test_option_models_take_device_and_dtype_too():
    """The Python API validates like the flags: LctoolError (one line, exit 2), canonical names."""
    from lctool.errors import LctoolError
    from lctool.ops.extend import TrainingOptions
    from lctool.ops.extend.search import SearchOptions
    from lctool.ops.finetune import FinetuneOptions
    from lctool.ops.vocab import ExpandOptions
    from lctool.prune.evopress import EvoPressPruneOptions
    from lctool.prune.options import LlmPrunerOptions
    from lctool.quant import QuantizeOptions
    from lctool.quant.pv import PvOptions

    makers = [lambda **c: QuantizeOptions(method="gptq", **c), lambda **c: FinetuneOptions(data="wiki", **c),
              lambda **c: LlmPrunerOptions(ratio=0.2, **c), lambda **c: EvoPressPruneOptions(space="blocks", target=1, **c),
              lambda **c: TrainingOptions(**c), lambda **c: SearchOptions(**c), lambda **c: PvOptions(method="pv", **c),
              lambda **c: ExpandOptions(corpus="wiki", num_new=2, **c)]
    for make in makers:
        assert (make().device, make().dtype) == ("cpu", "float32")
        assert make(dtype="bf16").dtype == "bfloat16"
        with pytest.raises(LctoolError, match="is not one of"):
            make(dtype="int4")
        with pytest.raises(LctoolError, match="not a device"):
            make(device="tpu")


def _spy(monkeypatch, module, name, record):
    real = getattr(module, name)

    def spy(*args, **kwargs):
        result = record(real, *args, **kwargs)
        return result

    monkeypatch.setattr(module, name, spy)


def _linear_output_dtypes(model) -> set:
    """Records the dtype of every Linear's output in the forwards that follow (what the math ran in)."""
    seen: set = set()
    for module in model.modules():
        if isinstance(module, __import__("torch").nn.Linear):
            module.register_forward_hook(lambda m, i, o: seen.add(str(o.dtype)))
    return seen


def test_quantize_computes_in_the_dtype_asked(tmp_path, run_cli, monkeypatch):
    """gptq --dtype bfloat16: the calibration forward runs in bf16, Hessians stay float32, the output is
    the GPTQ format's own dtypes (fp16 scales), and the weights are rounded from their float32 values."""
    import lctool.quant.engine as engine

    seen = {"layers": set(), "hidden": set(), "hessians": set()}

    def load_layer(real, stream, *args, **kwargs):
        layer = real(stream, *args, **kwargs)
        seen["layers"] |= {str(p.dtype) for p in layer.parameters()}
        seen["hidden"].add(str(stream.hidden.dtype))
        return layer

    def collect(real, stream, *args, **kwargs):
        hessians = real(stream, *args, **kwargs)
        seen["hessians"] |= {str(h.dtype) for h in hessians.values()}
        return hessians

    _spy(monkeypatch, engine.LayerStream, "load_layer", load_layer)
    _spy(monkeypatch, engine.LayerStream, "collect_hessians", collect)
    tiny = save_tiny(str(tmp_path / "tiny"))
    calib = tmp_path / "calib.txt"
    calib.write_text("Quantization keeps the weights small and the outputs close. " * 40)
    code, out, err = run_cli("quantize", tiny, tmp_path / "q", "--method", "gptq", "--group-size", "32", "--calib",
                             calib, "--calib-n", "4", "--calib-len", "32", "--device", "cpu", "--dtype", "bfloat16",
                             "--json")
    assert code == 0, err
    assert seen == {"layers": {"torch.bfloat16"}, "hidden": {"torch.bfloat16"}, "hessians": {"torch.float32"}}
    parameters = json.loads((tmp_path / "q" / "lctool.json").read_text())["parameters"]
    assert (parameters["device"], parameters["dtype"]) == ("cpu", "bfloat16")
    with safe_open(os.path.join(tmp_path / "q", "model.safetensors"), framework="pt") as f:
        scales = {str(f.get_slice(n).get_dtype()) for n in f.keys() if n.endswith(".scales")}
    assert scales == {"F16"}


def test_prune_gradients_run_in_the_dtype_asked(tmp_path, run_cli, monkeypatch):
    """llm-pruner taylor --dtype bfloat16: the gradient passes' matrix products run in bf16 (autocast)
    while the weights and gradient sums stay float32; the output keeps the input's float32."""
    import lctool.prune.llm_pruner as llm_pruner

    seen = {"linear": set(), "grad": set(), "weights": set()}

    def collect(real, model, *args, **kwargs):
        seen["linear"] = _linear_output_dtypes(model)
        seen["weights"] |= {str(p.dtype) for p in model.parameters()}
        gradients = real(model, *args, **kwargs)
        seen["grad"] |= {str(g.dtype) for g in gradients.grad.values()}
        return gradients

    _spy(monkeypatch, llm_pruner, "collect_gradients", collect)
    tiny = save_tiny(str(tmp_path / "tiny"))
    code, _, err = run_cli("prune", tiny, tmp_path / "p", "--ratio", "0.2", "--calib-n", "2", "--calib-len", "32",
                           "--dtype", "bfloat16", "--device", "cpu")
    assert code == 0, err
    assert seen == {"linear": {"torch.bfloat16"}, "grad": {"torch.float32"}, "weights": {"torch.float32"}}
    assert _dtypes(tmp_path / "p") == {"F32"}


def test_finetune_trains_in_the_mixed_precision_asked(tmp_path, run_cli, monkeypatch):
    """--dtype bfloat16 reaches accelerate: the forwards of the training run compute in bf16 on the CPU
    (--device cpu is accelerate's cpu=True), the adapter stays float32."""
    import lctool.ops.finetune as finetune_module
    import lctool.train.loop as loop

    seen = {"linear": set(), "accelerate": []}

    def peft_model(real, *args, **kwargs):
        model = real(*args, **kwargs)
        seen["linear"] = _linear_output_dtypes(model)
        return model

    def make_accelerator(real, config):
        accelerator = real(config)
        seen["accelerate"].append((accelerator.device.type, accelerator.mixed_precision))
        return accelerator

    _spy(monkeypatch, finetune_module, "peft_model", peft_model)
    _spy(monkeypatch, loop, "make_accelerator", make_accelerator)
    tiny = save_tiny(str(tmp_path / "tiny"))
    data = tmp_path / "data.txt"
    data.write_text("Shall I compare thee to a summer's day? " * 40)
    code, _, err = run_cli("finetune", tiny, tmp_path / "ft", "--data", data, "--seq-len", "32", "--batch", "2",
                           "--steps", "2", "--lora-r", "2", "--device", "cpu", "--dtype", "bf16", "--quiet")
    assert code == 0, err
    assert seen == {"linear": {"torch.bfloat16"}, "accelerate": [("cpu", "bf16")]}
    with safe_open(os.path.join(tmp_path / "ft", "adapter_model.safetensors"), framework="pt") as f:
        assert {str(f.get_slice(n).get_dtype()) for n in f.keys()} == {"F32"}


def test_extend_training_runs_in_the_dtype_asked(tmp_path, run_cli, monkeypatch):
    """e2llm --dtype bfloat16: its training forwards run in bf16; the output keeps the input's dtypes."""
    import lctool.ops.extend.e2llm as e2llm

    seen: dict = {}

    def load(real, *args, **kwargs):
        model = real(*args, **kwargs)
        seen["linear"] = _linear_output_dtypes(model)
        return model

    _spy(monkeypatch, e2llm, "load_unscaled_model", load)
    tiny = save_tiny(str(tmp_path / "tiny"), max_position_embeddings=32)
    corpus = tmp_path / "train.txt"
    corpus.write_text("Longer contexts need rotary positions that stretch without breaking. " * 60)
    code, _, err = run_cli("extend", tiny, tmp_path / "e", "--method", "e2llm", "--factor", "2", "--corpus", corpus,
                           "--steps", "2", "--batch-size", "2", "--dtype", "bfloat16", "--quiet")
    assert code == 0, err
    assert seen["linear"] == {"torch.bfloat16"}
    assert _dtypes(tmp_path / "e") == _dtypes(tiny)


def test_vocab_expand_computes_rows_in_the_dtype_asked(tmp_path, run_cli, monkeypatch, testbed_dir):
    """float64 and bfloat16 reach the row arithmetic; old rows are copied exactly and the matrices keep
    their dtype."""
    import importlib

    from lctool.io import Checkpoint

    expand_module = importlib.import_module("lctool.ops.vocab.expand")  # the package's `expand` is the function

    seen = []

    def new_rows(real, method, old, *args, **kwargs):
        seen.append((str(old.dtype), str(old.device)))
        return real(method, old, *args, **kwargs)

    _spy(monkeypatch, expand_module, "new_rows", new_rows)
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps([" device", " dtype"]))
    for dtype in ("float64", "bfloat16"):
        out = tmp_path / dtype
        code, _, err = run_cli("vocab", "expand", testbed_dir, out, "--tokens", tokens, "--dtype", dtype, "--quiet")
        assert code == 0, err
        assert seen[-1] == (f"torch.{dtype}", "cpu")
    source, expanded = Checkpoint(testbed_dir), Checkpoint(str(tmp_path / "bfloat16"))
    name = source.arch.weight("embed")
    old, new = source.get(name), expanded.get(name)
    assert new.dtype == old.dtype and new.shape[0] > old.shape[0]
    assert __import__("torch").equal(new[: old.shape[0]], old)


def test_cache_env_expands_home_and_relative_paths(tmp_path, monkeypatch, run_cli):
    from lctool.data import sources
    from lctool.io.cache import cache_dir, cache_root

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LCTOOL_CACHE", "~/x")
    assert cache_root() == str(tmp_path / "home" / "x")
    assert str(sources.cache_root()) == cache_root()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LCTOOL_CACHE", "rel/cache")
    assert cache_root() == str(tmp_path / "rel" / "cache")
    assert cache_dir("evopress") == str(tmp_path / "rel" / "cache" / "evopress") and os.path.isdir("rel/cache/evopress")
    # The same resolution for a command: ~ is the user's home folder, never a folder named "~".
    monkeypatch.setenv("LCTOOL_CACHE", "~/y")
    code, _, err = run_cli("testbed", "path", "--no-build")
    assert code == 2 and "not built" in err
    assert (tmp_path / "home" / "y").is_dir() and not (tmp_path / "~").exists()
    monkeypatch.delenv("LCTOOL_CACHE")
    assert cache_root() == str(tmp_path / "home" / ".cache" / "lctool")


def test_training_runs_of_different_dtypes_share_a_process():
    """accelerate keeps one mixed precision per process; each training run sets its own."""
    import torch

    from lctool.train import TrainConfig, train

    for mixed in ("bf16", "no", "bf16"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        seen = set()
        model[0].register_forward_hook(lambda m, i, o, seen=seen: seen.add(o.dtype))

        def loss_fn(prepared, batch):
            return prepared(batch["input_ids"].float()).square().mean()

        batches = iter([{"input_ids": torch.ones(2, 4)}] * 2)
        train(model, batches, TrainConfig(steps=1, lr=1e-3, batch_size=2, mixed_precision=mixed, progress=False),
              loss_fn=loss_fn)
        assert seen == {torch.bfloat16 if mixed == "bf16" else torch.float32}


def test_device_auto_is_the_default_and_resolves_to_what_this_machine_has():
    import torch

    from lctool.devices import ComputeOptions, check_device
    from lctool.train.config import TrainConfig

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert check_device("auto") == check_device(None) == expected
    assert ComputeOptions().device == expected
    assert TrainConfig.model_fields["device"].default == "auto"
