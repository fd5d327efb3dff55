"""lctool eval: numbers against a plain HF loop, layer-by-layer equality, KL, passkey, CLI errors."""

from __future__ import annotations

import json
import math
import os
import re
from types import SimpleNamespace

import pytest
import torch

from lctool.errors import LctoolError
from lctool.eval import (
    EvalOptions,
    LayerwiseRunner,
    evaluate,
    kl_divergence,
    load_for_eval,
    passkey_accuracy,
    perplexity,
    ppl_vs_length,
    register_loader,
    tokenize_stream,
    unregister_loader,
)
from lctool.eval.passkey import FILLER, QUESTION, TASK, build_prompt, first_number, fit_prompt, key_line
from lctool.eval.tokens import owned_bytes_from_offsets
from lctool.eval.windows import plan_windows
from tests.tiny_models import byte_tokenizer, save_tiny, tiny_model

TEXT = (
    "The river rises in the northern hills and flows south through farmland, past the old mill and "
    "the market town, before it reaches the sea. Café owners along the bank serve crêpes; a sign reads "
    "“naïve art → upstairs”. "
) * 12


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("eval") / "llama"))


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    return load_for_eval(tiny_llama)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def naive_hf_nll(model, token_ids: torch.Tensor, ctx: int, stride: int) -> tuple[float, int]:
    """The textbook loop: one window at a time, labels -100 where a token was scored before."""
    nll_sum, scored, previous_end = 0.0, 0, 0
    for start in range(0, len(token_ids) - ctx + 1, stride):
        window = token_ids[start : start + ctx][None]
        labels = window.clone()
        already = max(1, previous_end - start)
        labels[0, :already] = -100
        with torch.no_grad():
            loss = model(input_ids=window, labels=labels).loss
        count = int((labels[0, 1:] != -100).sum())
        nll_sum += float(loss) * count
        scored += count
        previous_end = start + ctx
    return nll_sum, scored


# ---- perplexity and bits-per-byte --------------------------------------------------------------


@pytest.mark.parametrize("stride", [None, 40])
def test_perplexity_matches_plain_hf_loop(loaded, stride):
    model, tokenizer = loaded
    ctx = 64
    ours = perplexity(model, tokenizer, TEXT, ctx=ctx, stride=stride, batch_size=3)
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    nll_sum, scored = naive_hf_nll(model, ids, ctx, stride or ctx)
    assert ours["tokens"] == scored
    assert ours["ppl"] == pytest.approx(math.exp(nll_sum / scored), rel=1e-4)
    assert ours["nll_sum"] == pytest.approx(nll_sum, rel=1e-4)
    assert ours["bpb"] == pytest.approx(ours["nll_sum"] / (math.log(2) * ours["bytes"]), rel=1e-12)


def test_windows_score_every_token_once():
    for num_tokens, ctx, stride in [(100, 10, 10), (100, 10, 3), (103, 16, 7), (16, 16, 4)]:
        plan = plan_windows(num_tokens, ctx, stride)
        positions = plan.scored_positions()
        assert positions.tolist() == sorted(set(positions.tolist()))
        assert len(positions) == plan.scored_tokens
        last_end = int(plan.starts[-1]) + ctx
        assert last_end <= num_tokens < last_end + stride
        expected = (
            set(range(1, last_end)) if stride < ctx else set(range(last_end)) - set(plan.starts.tolist())
        )
        assert set(positions.tolist()) == expected


def test_owned_bytes_add_up_to_the_text():
    tokenizer = byte_tokenizer()
    stream = tokenize_stream(tokenizer, TEXT)
    assert stream.exact_bytes
    assert stream.total_bytes == len(TEXT.encode("utf-8"))
    # A character split over byte tokens is owned by its first token; whitespace a tokenizer drops goes to the next token.
    owned = owned_bytes_from_offsets("a é  b", [1, 3, 3, 6])
    assert owned.tolist() == [1, 3, 0, 3]


def test_bits_per_byte_with_a_merging_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        [TEXT], trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw)
    stream = tokenize_stream(tokenizer, TEXT)
    assert len(stream) < 0.7 * len(TEXT)  # merges happened
    assert stream.total_bytes == len(TEXT.encode("utf-8"))
    model = tiny_model(vocab_size=len(tokenizer))
    result = perplexity(model, tokenizer, TEXT, ctx=32)
    positions = plan_windows(len(stream), 32).scored_positions()
    assert result["bytes"] == int(stream.owned_bytes[positions].sum())
    assert result["bpb"] == pytest.approx(result["nll_sum"] / (math.log(2) * result["bytes"]))


def test_max_tokens_truncates_the_stream(loaded):
    model, tokenizer = loaded
    result = perplexity(model, tokenizer, TEXT, ctx=32, max_tokens=100)
    assert result["text_tokens"] == 100 and result["windows"] == 3


# ---- layer by layer ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma"])
def test_layer_by_layer_equals_in_memory(tmp_path, family):
    path = save_tiny(str(tmp_path / family), family, vocab_size=272)
    model, tokenizer = load_for_eval(path)
    in_memory = perplexity(model, tokenizer, TEXT, ctx=48, stride=32, batch_size=4)
    streamed = perplexity(LayerwiseRunner(path), tokenizer, TEXT, ctx=48, stride=32, batch_size=4)
    assert streamed["tokens"] == in_memory["tokens"]
    assert streamed["nll_sum"] == pytest.approx(in_memory["nll_sum"], rel=1e-4)


def test_layer_by_layer_never_holds_two_layers(tiny_llama, loaded):
    _, tokenizer = loaded
    runner = LayerwiseRunner(tiny_llama)
    layers = runner.skeleton.get_submodule(runner.arch.family.layers)
    loaded_counts = []
    original_load = runner._load

    def counting_load(module_path, tensors):
        module = original_load(module_path, tensors)
        loaded_counts.append(sum(not p.is_meta for layer in layers for p in layer.parameters()))
        return module

    runner._load = counting_load
    perplexity(runner, tokenizer, TEXT, ctx=64)
    per_layer = sum(1 for _ in layers[0].parameters())
    assert max(loaded_counts) == per_layer
    assert all(p.is_meta for p in runner.skeleton.parameters())


def test_cli_layer_by_layer_matches(run_cli, tiny_llama, text_file):
    results = {}
    for mode in ("never", "always"):
        code, out, err = run_cli(
            "eval", tiny_llama, "--text", text_file, "--ctx", "64", "--layer-by-layer", mode, "--json"
        )
        assert code == 0, err
        results[mode] = json.loads(out)
    assert results["always"]["mode"] == "layer-by-layer"
    assert results["always"]["perplexity"]["ppl"] == pytest.approx(
        results["never"]["perplexity"]["ppl"], rel=1e-4
    )


# ---- KL ------------------------------------------------------------------------------------------


def test_kl_of_a_model_to_itself_is_zero(loaded):
    model, tokenizer = loaded
    assert abs(kl_divergence(model, model, tokenizer, TEXT, ctx=64)) < 1e-6


def test_kl_is_positive_for_a_perturbed_copy_and_has_the_stated_direction(loaded):
    model, tokenizer = loaded
    perturbed = tiny_model()
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    kl = kl_divergence(perturbed, model, tokenizer, TEXT, ctx=64)
    assert kl > 1e-4
    # Direction: KL(P_reference || P_model), averaged over the scored positions of one window.
    text = TEXT[:70]
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:64])[None]
    with torch.no_grad():
        log_p_model = torch.log_softmax(perturbed(ids).logits[0, :-1].float(), -1)
        log_p_reference = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    expected = float((log_p_reference.exp() * (log_p_reference - log_p_model)).sum(-1).mean())
    reverse = float((log_p_model.exp() * (log_p_model - log_p_reference)).sum(-1).mean())
    ours = kl_divergence(perturbed, model, tokenizer, text, ctx=64)
    assert ours == pytest.approx(expected, rel=1e-4)
    assert abs(expected - reverse) > 1e-6 * expected


def test_kl_layer_by_layer_matches_in_memory(tiny_llama, loaded, tmp_path):
    model, tokenizer = loaded
    other = save_tiny(str(tmp_path / "other"), seed=1)
    in_memory = kl_divergence(load_for_eval(other)[0], model, tokenizer, TEXT, ctx=64)
    streamed = kl_divergence(LayerwiseRunner(other), LayerwiseRunner(tiny_llama), tokenizer, TEXT, ctx=64)
    assert streamed == pytest.approx(in_memory, rel=1e-4)


# ---- perplexity versus length --------------------------------------------------------------------


def test_ppl_vs_length_rows_and_plot(run_cli, tiny_llama, text_file, tmp_path, loaded):
    model, tokenizer = loaded
    rows = ppl_vs_length(model, tokenizer, TEXT, [32, 64, 128])
    assert [r["length"] for r in rows] == [32, 64, 128]
    assert rows[1]["ppl"] == pytest.approx(perplexity(model, tokenizer, TEXT, ctx=64)["ppl"], rel=1e-9)
    png = tmp_path / "ppl.png"
    code, out, err = run_cli(
        "eval", tiny_llama, "--text", text_file, "--lengths", "128,32,64", "--plot", png, "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert [r["length"] for r in result["ppl_vs_length"]] == [32, 64, 128]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp.png")]


# ---- passkey -------------------------------------------------------------------------------------


def test_passkey_prompt_format_length_and_depth():
    tokenizer = byte_tokenizer()
    prompt = fit_prompt(tokenizer, "68217", 600, 0.5)
    lines = prompt.text.split("\n")
    assert lines[0] == TASK and lines[2] == key_line("68217") and lines[-1] == QUESTION
    assert key_line("68217") == "The pass key is 68217. Remember it. 68217 is the pass key."
    assert lines[1].startswith(FILLER[0]) and lines[3].startswith(FILLER[0])
    assert prompt.tokens <= 600
    assert (
        len(build_prompt("68217", prompt.filler_sentences + 1, 0.5).encode()) > 600
    )  # the most filler that fits
    before = fit_prompt(tokenizer, "68217", 600, 0.0).text.split("\n")
    after = fit_prompt(tokenizer, "68217", 600, 1.0).text.split("\n")
    assert before[1] == "" and after[3] == ""
    with pytest.raises(LctoolError, match="shorter than the prompt"):
        fit_prompt(tokenizer, "68217", 50, 0.5)


class _Reply:
    """Test double of a causal LM: answers the passkey question by a fixed rule, one token per call."""

    def __init__(self, tokenizer, rule):
        self.tokenizer, self.rule, self.queue = tokenizer, rule, []
        self.parameters = lambda: iter([torch.zeros(1)])

    def __call__(self, input_ids, past_key_values=None, use_cache=True):
        if past_key_values is None:
            prompt = self.tokenizer.decode(input_ids[0].tolist())
            self.queue = self.tokenizer(self.rule(prompt), add_special_tokens=False)["input_ids"]
        logits = torch.zeros(1, 1, len(self.tokenizer))
        logits[0, 0, self.queue.pop(0) if self.queue else 0] = 1.0
        return SimpleNamespace(logits=logits, past_key_values="cache")


def test_passkey_scoring():
    tokenizer = byte_tokenizer()
    grid = dict(lengths=[300, 500], depths=[0.0, 0.5, 1.0], trials=2, seed=3)
    recall = _Reply(tokenizer, lambda p: " " + re.search(r"The pass key is (\d+)", p).group(1) + ". Yes")
    result = passkey_accuracy(recall, tokenizer, **grid)
    assert result["accuracy"] == 1.0 and len(result["cells"]) == 6
    assert all(c["correct"] == 2 for c in result["cells"])
    wrong = _Reply(tokenizer, lambda p: " 12345.")
    assert passkey_accuracy(wrong, tokenizer, **grid)["accuracy"] == 0.0
    first_digits = _Reply(
        tokenizer, lambda p: " " + re.search(r"(\d+)", p).group(1)
    )  # the key is the first number
    assert passkey_accuracy(first_digits, tokenizer, **grid)["keys"] == result["keys"]
    assert first_number(" 68217. Remember") == "68217" and first_number(" none") is None
    assert first_number(" 6821") != "68217"


def test_passkey_is_deterministic_on_a_real_model(loaded):
    model, tokenizer = loaded
    grid = dict(lengths=[260], depths=[0.0, 1.0], trials=2, seed=7)
    first, second = passkey_accuracy(model, tokenizer, **grid), passkey_accuracy(model, tokenizer, **grid)
    assert first == second
    assert passkey_accuracy(model, tokenizer, **{**grid, "seed": 8})["keys"] != first["keys"]


# ---- loading -------------------------------------------------------------------------------------


def test_registered_loader_serves_its_quant_method(tiny_llama, tmp_path):
    folder = tmp_path / "fakequant"
    folder.mkdir()
    for name in os.listdir(tiny_llama):
        os.link(os.path.join(tiny_llama, name), folder / name)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "lctool-test-format", "bits": 3}
    os.unlink(folder / "config.json")
    (folder / "config.json").write_text(json.dumps(config))
    calls = []

    def loader(path, dtype):
        calls.append((path, dtype))
        return tiny_model()

    register_loader("lctool-test-format", loader)
    try:
        model, tokenizer = load_for_eval(str(folder))
    finally:
        unregister_loader("lctool-test-format")
    assert calls == [(str(folder), torch.float32)]
    assert perplexity(model, tokenizer, TEXT, ctx=64)["ppl"] > 1


def test_rope_scaled_and_lctool_written_checkpoints_load(tmp_path, loaded):
    from lctool.arch import RopeSettings, read_rope, write_rope
    from lctool.io import Checkpoint
    from lctool.io.hf import save_causal_lm

    model, tokenizer = loaded
    written = save_causal_lm(model, str(tmp_path / "written"), operation="test", tokenizer=tokenizer)
    assert Checkpoint(written).manifest["operation"] == "test"
    config = json.loads(open(os.path.join(written, "config.json")).read())
    scaled = write_rope(
        config,
        RopeSettings(
            read_rope(config).theta, "yarn", {"factor": 4.0, "original_max_position_embeddings": 128}
        ),
    )
    with open(os.path.join(written, "config.json"), "w") as f:
        json.dump(scaled, f)
    scaled_model, scaled_tokenizer = load_for_eval(written)
    assert scaled_model.config.rope_parameters["rope_type"] == "yarn"
    plain = perplexity(model, tokenizer, TEXT, ctx=256)["ppl"]
    stretched = perplexity(scaled_model, scaled_tokenizer, TEXT, ctx=256)["ppl"]
    assert math.isfinite(stretched) and stretched != pytest.approx(plain, rel=1e-6)
    streamed = perplexity(LayerwiseRunner(written), scaled_tokenizer, TEXT, ctx=256)["ppl"]
    assert streamed == pytest.approx(stretched, rel=1e-4)


def test_evaluate_is_deterministic(tiny_llama, text_file):
    options = EvalOptions(
        text=text_file, ctx=64, lengths=[32, 64], passkey=True, passkey_lengths=[300], passkey_trials=1
    )
    first, second = evaluate(tiny_llama, options), evaluate(tiny_llama, options)
    for result in (first, second):
        for entry in [result["perplexity"], *result["ppl_vs_length"]]:
            entry.pop("seconds"), entry.pop("tokens_per_s")
    assert first == second


# ---- CLI -----------------------------------------------------------------------------------------


def test_cli_json_is_one_object_and_quiet(run_cli, tiny_llama, text_file, tmp_path):
    other = save_tiny(str(tmp_path / "other"), seed=2)
    code, out, err = run_cli(
        "eval", tiny_llama, "--text", text_file, "--ctx", "64", "--reference", other, "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert set(result["perplexity"]) >= {
        "ppl",
        "bpb",
        "nll_sum",
        "tokens",
        "bytes",
        "windows",
        "tokens_per_s",
    }
    assert result["kl"]["kl"] > 0 and result["kl"]["direction"].startswith("KL(reference || model)")
    assert err == ""


def test_cli_table_on_pydoc_corpus(run_cli, tiny_llama):
    code, out, err = run_cli("eval", tiny_llama, "--corpus", "pydoc", "--ctx", "128", "--max-tokens", "1024")
    assert code == 0, err
    assert "pydoc:eval" in out and "perplexity" in out and "bits per byte" in out


def test_progress_shows_tokens_per_second(loaded):
    from io import StringIO

    from rich.console import Console
    from rich.progress import Progress, TextColumn

    from lctool.cli.eval import RichTracker

    model, tokenizer = loaded
    screen = StringIO()
    console = Console(file=screen, force_terminal=True, width=100)
    with Progress(TextColumn("{task.description} {task.fields[info]}"), console=console, auto_refresh=False) as bar:
        perplexity(model, tokenizer, TEXT, ctx=64, tracker=RichTracker(bar))
        bar.refresh()
    assert re.search(r"perplexity @ 64 [\d,]+ tok/s", screen.getvalue())


def _one_line_error(code, out, err, pattern):
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--corpus", "klingon"], r"unknown corpus 'klingon'"),
        (["--corpus", "wiki:test"], r"unknown split 'test'"),
        (["--ctx", "100000"], r"fewer than one window of --ctx 100000"),
        (["--lengths", "256,abc"], r"--lengths: expected comma-separated integers"),
        (["--lengths", "0,64"], r"lengths must be at least 2"),
        (["--lengths", "99999"], r"--lengths: 99999 is longer than the text"),
        (["--plot", "x.png"], r"give --lengths too"),
        (["--ctx", "64", "--stride", "65"], r"stride"),
        (["--batch-size", "0"], r"batch_size"),
        (["--passkey", "--passkey-lengths", "20"], r"shorter than the prompt"),
        (["--passkey-depths", "0.5"], r"need --passkey"),
        (["--passkey", "--passkey-depths", "1.5"], r"between 0 and 1"),
        (["--dtype", "int3"], r"dtype"),
        (["--layer-by-layer", "sometimes"], r"layer_by_layer"),
    ],
)
def test_cli_bad_options(run_cli, tiny_llama, text_file, args, pattern, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text_args = [] if any(a.startswith("--corpus") for a in args) else ["--text", text_file]
    code, out, err = run_cli("eval", tiny_llama, *text_args, *args)
    _one_line_error(code, out, err, pattern)
    assert os.listdir(tmp_path) == ["text.txt"]


def test_cli_missing_text_and_both_sources(run_cli, tiny_llama, text_file):
    _one_line_error(*run_cli("eval", tiny_llama, "--text", "/nonexistent.txt"), r"--text: no file")
    _one_line_error(*run_cli("eval", tiny_llama, "--text", text_file, "--corpus", "wiki"), r"not both")


def test_cli_tokenizer_larger_than_model_vocab(run_cli, tmp_path, text_file):
    small = save_tiny(str(tmp_path / "small"), vocab_size=128)
    _one_line_error(
        *run_cli("eval", small, "--text", text_file),
        r"tokenizer has 256 tokens but the model has vocab_size 128",
    )
    _one_line_error(
        *run_cli("eval", small, "--text", text_file, "--layer-by-layer", "always"),
        r"tokenizer has 256 tokens",
    )


def _reversed_byte_tokenizer():
    """256 byte tokens like byte_tokenizer(), numbered the other way round."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), reverse=True)
    raw = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=alphabet[-1])


def test_cli_reference_with_another_tokenizer(run_cli, tiny_llama, tmp_path, text_file):
    other = save_tiny(str(tmp_path / "other"), seed=1, with_tokenizer=False)
    _reversed_byte_tokenizer().save_pretrained(other)
    _one_line_error(
        *run_cli("eval", tiny_llama, "--text", text_file, "--ctx", "64", "--reference", other),
        r"different tokenizer",
    )
    assert not os.path.exists(tmp_path / "x.png")


def test_cli_missing_model(run_cli, text_file):
    _one_line_error(*run_cli("eval", "/no/such/model", "--text", text_file), r"no checkpoint folder")


# ---- the testbed ---------------------------------------------------------------------------------


@pytest.mark.testbed
def test_testbed_eval(testbed_dir):
    options = EvalOptions(ctx=256, max_tokens=8192, lengths=[256, 512], layer_by_layer="never")
    in_memory = evaluate(testbed_dir, options)
    streamed = evaluate(testbed_dir, options.model_copy(update={"layer_by_layer": "always"}))
    assert streamed["perplexity"]["nll_sum"] == pytest.approx(in_memory["perplexity"]["nll_sum"], rel=1e-4)
    ppl = in_memory["perplexity"]
    assert 1 < ppl["ppl"] < 1000 and 0 < ppl["bpb"] < 8
