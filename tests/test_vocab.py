"""`lctool vocab`: BPE expansion and trimming keep the tokenizer, the ids and the model consistent."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lctool.errors import LctoolError
from lctool.io import Checkpoint
from lctool.ops.vocab import ByteLevelBpe, ExpandOptions, TrimOptions, expand, trim
from lctool.ops.vocab.bpe import apply_ranked_merges, segment_words, word_counts
from lctool.ops.vocab.init import merge_tree_leaves

BASE_TOKENS = 520  # tokenizer size of the test models (256 byte symbols + 1 special + 263 merges)
NUM_NEW = 120
SAMPLE_CHARS = 60_000


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Small target (Shakespeare) and old-domain (wiki) texts, and a file holding the target text."""
    from lctool.data import corpus_text

    folder = tmp_path_factory.mktemp("texts")
    target = corpus_text("shakespeare", "calib")[:SAMPLE_CHARS]
    old = corpus_text("wiki", "calib")[:SAMPLE_CHARS]
    target_file = folder / "target.txt"
    target_file.write_text(target, encoding="utf-8")
    return {"target": target, "old": old, "target_file": str(target_file)}


def save_model(path, family: str, tied: bool, texts: dict, vocab_size: int = BASE_TOKENS + 8) -> str:
    """A tiny model whose tokenizer is a byte-level BPE trained on wiki text (padded rows beyond it)."""
    from lctool.ops.testbed import train_tokenizer
    from tests.tiny_models import tiny_model

    tokenizer = train_tokenizer([texts["old"]], BASE_TOKENS)
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    model = tiny_model(family, vocab_size=vocab_size, tie_word_embeddings=tied, bos_token_id=eos, eos_token_id=eos)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory, texts):
    return save_model(tmp_path_factory.mktemp("tied") / "model", "llama", True, texts)


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory, texts):
    return save_model(tmp_path_factory.mktemp("untied") / "model", "qwen2", False, texts)


@pytest.fixture(scope="module")
def expanded_tied(tmp_path_factory, tied_dir, texts):
    out = tmp_path_factory.mktemp("exp") / "tied-mean"
    results = expand(tied_dir, str(out), ExpandOptions(corpus=texts["target_file"], num_new=NUM_NEW, init="mean"))
    return str(out), results


@pytest.fixture(scope="module")
def expanded_untied(tmp_path_factory, untied_dir, texts):
    out = tmp_path_factory.mktemp("exp") / "untied-merge"
    options = ExpandOptions(corpus=texts["target_file"], num_new=NUM_NEW, init="merge", pad_to_multiple=64)
    return str(out), expand(untied_dir, str(out), options)


def auto_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def auto_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def pre_tokenized_words(path: str, text: str) -> list[str]:
    return list(word_counts(ByteLevelBpe.read(path).backend(), text))


# ---- the tokenizer -------------------------------------------------------------------------------

def test_new_tokens_are_appended_merges_not_added_tokens(tied_dir, expanded_tied):
    out, results = expanded_tied
    old, new = ByteLevelBpe.read(tied_dir), ByteLevelBpe.read(out)
    assert results["new_tokens"] == NUM_NEW
    assert new.merges[: len(old.merges)] == old.merges
    assert len(new.merges) == len(old.merges) + NUM_NEW
    assert new.added == old.added
    assert new.document["added_tokens"] == old.document["added_tokens"]
    for token, token_id in old.vocab.items():
        assert new.vocab[token] == token_id  # old ids keep their meaning
    new_tokens = {a + b for a, b in new.merges[len(old.merges):]}
    assert {new.vocab[t] for t in new_tokens} == set(range(old.size, old.size + NUM_NEW))


def assert_segmentation_kept(old_dir: str, new_dir: str, text: str) -> tuple[int, int]:
    """With the stock tokenizers: words no new token applies to segment exactly as before; the others
    only join old pieces. Returns (changed words, untouched words)."""
    old_stock, new_stock = auto_tokenizer(old_dir), auto_tokenizer(new_dir)
    old_backend, new_backend = old_stock.backend_tokenizer, new_stock.backend_tokenizer
    new_ids = set(range(len(old_stock), len(new_stock)))
    changed = untouched = 0
    for word in word_counts(old_backend, text):
        before = [t.value for t in old_backend.model.tokenize(word)]
        after = new_backend.model.tokenize(word)
        if not any(t.id in new_ids for t in after):
            assert [t.value for t in after] == before, word
            untouched += 1
        else:
            changed += 1
            assert "".join(t.value for t in after) == word
            assert _boundaries([t.value for t in after]) <= _boundaries(before), word
    # and the whole text, through the full stock pipeline, decodes back losslessly
    assert new_stock.decode(new_stock(text)["input_ids"]) == text
    return changed, untouched


def test_old_text_segments_exactly_as_before_where_no_new_merge_applies(tied_dir, expanded_tied, texts):
    out, _ = expanded_tied
    changed, untouched = assert_segmentation_kept(tied_dir, out, texts["old"] + texts["target"])
    assert changed > 100 and untouched > 1000


def _boundaries(pieces: list[str]) -> set[int]:
    positions, at = set(), 0
    for piece in pieces:
        at += len(piece)
        positions.add(at)
    return positions


def test_stock_tokenizer_ids_stable_and_decoding_lossless(tied_dir, expanded_tied, texts):
    out, _ = expanded_tied
    old_tok, new_tok = auto_tokenizer(tied_dir), auto_tokenizer(out)
    assert len(new_tok) == BASE_TOKENS + NUM_NEW
    for token, token_id in old_tok.get_vocab().items():
        assert new_tok.convert_tokens_to_ids(token) == token_id
    samples = [texts["target"][:5000], texts["old"][:5000], "Ünïcödé ✓ 日本語 — tabs\tand\n\nnewlines  ", "def f(x): return x**2"]
    for sample in samples:
        ids = new_tok(sample)["input_ids"]
        assert new_tok.decode(ids) == sample
    shakespeare_ids = new_tok(texts["target"][:5000])["input_ids"]
    assert len(shakespeare_ids) < len(old_tok(texts["target"][:5000])["input_ids"])
    assert max(shakespeare_ids) >= BASE_TOKENS  # the new tokens are used


def test_learned_merges_replay_as_the_library_segments(tied_dir, expanded_tied, texts):
    """Our BPE continuation (rank order after all old merges) is what the tokenizers library does."""
    out, _ = expanded_tied
    old, new = ByteLevelBpe.read(tied_dir), ByteLevelBpe.read(out)
    ranks = {pair: rank for rank, pair in enumerate(new.merges)}
    words = pre_tokenized_words(tied_dir, texts["target"][:20_000])
    replayed = [apply_ranked_merges(pieces, ranks) for pieces in segment_words(old.backend(), words)]
    assert replayed == segment_words(new.backend(), words)


def _llama3_style(tokenizer_dir: str) -> None:
    """Rewrite a saved tokenizer as Llama 3 / Qwen do it: regex Split then ByteLevel, ignore_merges."""
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    document = json.loads(open(path, encoding="utf-8").read())
    pattern = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    document["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    document["model"]["ignore_merges"] = True
    open(path, "w", encoding="utf-8").write(json.dumps(document))


def _merges_as_strings(tokenizer_dir: str) -> None:
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    document = json.loads(open(path, encoding="utf-8").read())
    document["model"]["merges"] = [" ".join(m) for m in document["model"]["merges"]]
    open(path, "w", encoding="utf-8").write(json.dumps(document))


def _declared_qwen2_class(tokenizer_dir: str) -> None:
    """A tokenizer class that imposes its own pre-tokenizer over tokenizer.json's (transformers 5)."""
    path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    config = json.loads(open(path, encoding="utf-8").read())
    config["tokenizer_class"] = "Qwen2Tokenizer"
    open(path, "w", encoding="utf-8").write(json.dumps(config))


@pytest.mark.parametrize("variant", [_llama3_style, _merges_as_strings, _declared_qwen2_class])
def test_tokenizer_variants(variant, texts, tmp_path):
    source = save_model(tmp_path / "model", "llama", True, texts)
    variant(source)
    out = tmp_path / "out"
    expand(source, str(out), ExpandOptions(corpus=texts["target_file"], num_new=40, init="merge"))
    changed, untouched = assert_segmentation_kept(source, str(out), texts["old"][:20_000] + texts["target"][:20_000])
    assert changed > 20 and untouched > 200
    stored = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    original = json.loads(open(os.path.join(source, "tokenizer.json"), encoding="utf-8").read())
    assert isinstance(stored["model"]["merges"][0], str) == isinstance(original["model"]["merges"][0], str)
    assert {k: v for k, v in stored.items() if k != "model"} == {k: v for k, v in original.items() if k != "model"}
    auto_model(out)


def test_fertility_reported_and_lower_on_target(expanded_tied):
    _, results = expanded_tied
    assert results["tokens_per_char_after"] < results["tokens_per_char_before"]


def test_tokens_file_makes_each_token_one_token(tied_dir, tmp_path):
    tokens = [" thou", " thee", " wherefore", "doth"]
    token_file = tmp_path / "tokens.txt"
    token_file.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    results = expand(tied_dir, str(out), ExpandOptions(tokens_file=str(token_file)))
    tokenizer = auto_tokenizer(out)
    for token in tokens:
        ids = tokenizer(token)["input_ids"]
        assert len(ids) == 1 and ids[0] >= BASE_TOKENS, token
        assert tokenizer.decode(ids) == token
        # inside running text too, where the word is preceded by others
        assert tokenizer.convert_tokens_to_ids(tokenizer.tokenize(token)) == ids
    assert results["new_tokens"] == len(tokens) + results["intermediate_tokens"]
    bpe, old = ByteLevelBpe.read(str(out)), ByteLevelBpe.read(tied_dir)
    assert bpe.added == old.added and bpe.merges[: len(old.merges)] == old.merges


# ---- the model -----------------------------------------------------------------------------------

def test_tied_model_stays_tied_and_loads(tied_dir, expanded_tied):
    out, results = expanded_tied
    checkpoint = Checkpoint(out)
    arch = checkpoint.arch
    assert checkpoint.config["tie_word_embeddings"] is True and results["tied"] is True
    assert arch.weight("lm_head") not in checkpoint
    assert arch.vocab_size == BASE_TOKENS + NUM_NEW == checkpoint.entry(arch.weight("embed")).shape[0]
    model = auto_model(out)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids = auto_tokenizer(out)("Thou art a villain, my lord.", return_tensors="pt")["input_ids"]
    logits = model(ids).logits
    assert logits.shape[-1] == arch.vocab_size and torch.isfinite(logits).all()


def test_untied_rows_init_from_merges_and_other_tensors_unchanged(untied_dir, expanded_untied):
    out, results = expanded_untied
    before, after = Checkpoint(untied_dir), Checkpoint(out)
    arch = after.arch
    assert after.config["tie_word_embeddings"] is False and results["tied"] is False
    assert arch.vocab_size % 64 == 0 and arch.vocab_size >= BASE_TOKENS + NUM_NEW
    old_bpe, new_bpe = ByteLevelBpe.read(untied_dir), ByteLevelBpe.read(out)
    parts = dict((a + b, (a, b)) for a, b in new_bpe.merges[len(old_bpe.merges):])
    for role in ("embed", "lm_head"):
        old_rows, new_rows = before.get(arch.weight(role)), after.get(arch.weight(role))
        assert torch.equal(new_rows[:BASE_TOKENS], old_rows[:BASE_TOKENS])
        for token, (left, right) in list(parts.items())[:40]:
            expected = (_row(new_rows, new_bpe, left) + _row(new_rows, new_bpe, right)) / 2
            torch.testing.assert_close(new_rows[new_bpe.vocab[token]], expected)
        padding = new_rows[BASE_TOKENS + NUM_NEW:]
        torch.testing.assert_close(padding, old_rows[:BASE_TOKENS].mean(0).expand_as(padding))
    for name in before.tensor_names():
        if after.arch.classify(name).role not in ("embed", "lm_head"):
            assert torch.equal(before.get(name), after.get(name)), name
    model = auto_model(out)
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


def _row(matrix, bpe, token):
    return matrix[bpe.vocab[token]]


@pytest.mark.parametrize("init", ["mean", "random", "align"])
def test_init_methods(tied_dir, texts, tmp_path, init):
    out = tmp_path / init
    results = expand(tied_dir, str(out), ExpandOptions(corpus=texts["target_file"], num_new=40, init=init, seed=3))
    before, after = Checkpoint(tied_dir), Checkpoint(out)
    name = after.arch.weight("embed")
    old_rows, rows = before.get(name)[:BASE_TOKENS], after.get(name)
    bpe_old, bpe = ByteLevelBpe.read(tied_dir), ByteLevelBpe.read(str(out))
    added = bpe.merges[len(bpe_old.merges):]
    parts = {a + b: (a, b) for a, b in added}
    new = rows[BASE_TOKENS:BASE_TOKENS + 40]
    if init == "mean":
        for k, (a, b) in enumerate(added):
            leaves = merge_tree_leaves(a + b, parts)
            torch.testing.assert_close(new[k], old_rows[[bpe_old.vocab[t] for t in leaves]].mean(0))
    elif init == "random":
        torch.testing.assert_close(new.mean(0), old_rows.mean(0), atol=0.5 * old_rows.std().item(), rtol=0)
        ratio = new.norm(dim=1).mean() / old_rows.norm(dim=1).mean()
        assert 0.8 < ratio < 1.25
    else:
        assert results["aligned_tokens"] > 20
        # each aligned row is a convex mix of old rows: inside their coordinate-wise range
        assert (new >= old_rows.min(0).values - 1e-5).all() and (new <= old_rows.max(0).values + 1e-5).all()


def test_random_init_is_seeded(tied_dir, texts, tmp_path):
    rows = []
    for name in ("a", "b"):
        expand(tied_dir, str(tmp_path / name), ExpandOptions(corpus=texts["target_file"], num_new=10, init="random", seed=7))
        checkpoint = Checkpoint(str(tmp_path / name))
        rows.append(checkpoint.get(checkpoint.arch.weight("embed")))
    assert torch.equal(rows[0], rows[1])


# ---- trim ----------------------------------------------------------------------------------------

def test_trim_keeps_corpus_segmentation_and_logits(expanded_untied, texts, tmp_path):
    source, _ = expanded_untied
    out = tmp_path / "trimmed"
    results = trim(source, str(out), TrimOptions(corpus=texts["target_file"]))
    assert results["tokens_after"] < results["tokens_before"]
    assert results["merges_after"] < results["merges_before"]
    old_tok, new_tok = auto_tokenizer(source), auto_tokenizer(out)
    sample = texts["target"][:3000]
    old_ids, new_ids = old_tok(sample)["input_ids"], new_tok(sample)["input_ids"]
    assert [old_tok.convert_ids_to_tokens(i) for i in old_ids] == [new_tok.convert_ids_to_tokens(i) for i in new_ids]
    assert new_tok.decode(new_tok("Any text at all: ¿qué? 12345 ✓")["input_ids"]) == "Any text at all: ¿qué? 12345 ✓"
    # the model computes exactly the same logits on the kept tokens
    old_model, new_model = auto_model(source), auto_model(out)
    kept_old_ids = [old_tok.convert_tokens_to_ids(new_tok.convert_ids_to_tokens(i)) for i in range(len(new_tok))]
    with torch.no_grad():
        old_logits = old_model(torch.tensor([old_ids[:64]])).logits[..., kept_old_ids]
        new_logits = new_model(torch.tensor([new_ids[:64]])).logits
    torch.testing.assert_close(new_logits, old_logits)


def test_trim_remaps_special_token_ids(tied_dir, tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text("zzz qqq zzz qqq " * 20, encoding="utf-8")
    out = tmp_path / "trimmed"
    trim(tied_dir, str(out), TrimOptions(corpus=str(text_file), pad_to_multiple=8))
    tokenizer = auto_tokenizer(out)
    config = json.loads((out / "config.json").read_text())
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert config["eos_token_id"] == eos == tokenizer.eos_token_id
    assert config["vocab_size"] % 8 == 0 and config["tie_word_embeddings"] is True
    assert len(tokenizer) < 300  # 256 byte symbols + special + the few merges this text uses
    assert tokenizer.decode(tokenizer("zzz qqq")["input_ids"]) == "zzz qqq"
    auto_model(out)


# ---- peft round trip -----------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["tied", "untied"])
def test_finetune_adapter_with_new_rows_loads_on_expanded_base_in_stock_peft(which, expanded_tied, expanded_untied,
                                                                              texts, tmp_path, run_cli):
    """`lctool finetune --trainable embed,lm_head` after expansion: the adapter loads in stock peft."""
    from peft import PeftModel
    from safetensors.torch import load_file

    base_dir, results = expanded_tied if which == "tied" else expanded_untied
    arch = Checkpoint(base_dir).arch
    common = ["--data", texts["target_file"], "--trainable", "embed,lm_head", "--steps", 2, "--seq-len", 32,
              "--batch", 2, "--lr", "1e-2", "--lora-r", 4, "--lora-dropout", 0]
    code, _, stderr = run_cli("--quiet", "finetune", base_dir, tmp_path / "adapter", *common)
    assert code == 0, stderr
    code, _, stderr = run_cli("--quiet", "finetune", base_dir, tmp_path / "merged", *common, "--merge")
    assert code == 0, stderr

    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    embed_rows = [t for n, t in saved.items() if arch.module("embed").split(".")[-1] in n]
    assert embed_rows and all(t.shape[0] == arch.vocab_size for t in embed_rows)
    if which == "untied":
        assert any(arch.module("lm_head") in n for n in saved)

    batch = auto_tokenizer(base_dir)(texts["target"][:400], return_tensors="pt")["input_ids"][:, :48]
    assert int(batch.max()) >= results["tokenizer_size_before"]  # new tokens are in play
    adapted = PeftModel.from_pretrained(auto_model(base_dir), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        adapted_logits = adapted(input_ids=batch).logits
        base_logits = auto_model(base_dir)(input_ids=batch).logits
        merged_logits = auto_model(tmp_path / "merged")(input_ids=batch).logits
    assert adapted_logits.shape[-1] == arch.vocab_size
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)
    torch.testing.assert_close(adapted_logits, merged_logits, atol=1e-4, rtol=1e-4)


# ---- bad inputs ----------------------------------------------------------------------------------

def test_cli_expand_json(run_cli, tied_dir, texts, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("vocab", "expand", tied_dir, out, "--corpus", texts["target_file"],
                                   "--num-new", 16, "--init", "merge", "--json")
    assert code == 0, stderr
    results = json.loads(stdout)
    assert results["new_tokens"] == 16 and results["init"] == "merge"
    manifest = json.loads((out / "lctool.json").read_text())
    assert manifest["operation"] == "vocab-expand"
    code, stdout, _ = run_cli("vocab", "fertility", tied_dir, out, "--corpus", texts["target_file"], "--json")
    assert code == 0
    values = json.loads(stdout)["tokens_per_char"]
    assert values[str(out)][texts["target_file"]] < values[tied_dir][texts["target_file"]]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-new", 0], "greater than 0"),
        (["--num-new", 100_000], "yields only"),
        (["--num-new", 5, "--init", "nonsense"], "init"),
        (["--num-new", 5, "--pad-to-multiple", 0], "pad_to_multiple"),
        ([], "--num-new"),
    ],
)
def test_cli_bad_options(run_cli, tied_dir, texts, tmp_path, extra, message):
    out = tmp_path / "out"
    code, _, stderr = run_cli("vocab", "expand", tied_dir, out, "--corpus", texts["target_file"], *extra)
    assert code == 2 and message in stderr and "Traceback" not in stderr
    assert not os.path.exists(out)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")  and "lock" not in p]


@pytest.mark.parametrize(
    "lines, message",
    [
        ([" thou", " thou"], "listed twice"),
        ([" the"], "already in the vocabulary"),
        (["thou art"], "split by the pre-tokenizer"),
    ],
)
def test_bad_token_lists(run_cli, tied_dir, tmp_path, lines, message):
    token_file = tmp_path / "tokens.txt"
    token_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, _, stderr = run_cli("vocab", "expand", tied_dir, tmp_path / "out", "--tokens", token_file)
    assert code == 2 and message in stderr, stderr
    assert not os.path.exists(tmp_path / "out")


def test_non_bpe_tokenizer_refused(tmp_path, run_cli):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tests.tiny_models import save_tiny

    path = save_tiny(str(tmp_path / "model"), with_tokenizer=False)
    tokenizer = Tokenizer(models.WordLevel(vocab={"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    text_file = tmp_path / "t.txt"
    text_file.write_text("a b a b", encoding="utf-8")
    code, _, stderr = run_cli("vocab", "expand", path, tmp_path / "out", "--corpus", text_file, "--num-new", 2)
    assert code == 2 and "not BPE" in stderr
    code, _, stderr = run_cli("vocab", "trim", path, tmp_path / "out", "--corpus", text_file)
    assert code == 2 and "not BPE" in stderr


def test_missing_tokenizer_and_existing_output_refused(tmp_path, tied_dir, texts):
    from tests.tiny_models import save_tiny

    bare = save_tiny(str(tmp_path / "bare"), with_tokenizer=False)
    with pytest.raises(LctoolError, match="no tokenizer.json"):
        expand(bare, str(tmp_path / "o"), ExpandOptions(corpus=texts["target_file"], num_new=2))
    (tmp_path / "exists").mkdir()
    with pytest.raises(LctoolError, match="already exists"):
        expand(tied_dir, str(tmp_path / "exists"), ExpandOptions(corpus=texts["target_file"], num_new=2))


def test_options_are_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        ExpandOptions(corpus="wiki", num_new=3, tokens_file="x.txt")
    with pytest.raises(ValidationError):
        ExpandOptions(tokens_file="x.txt", init="align")
    with pytest.raises(ValidationError):
        ExpandOptions(corpus="wiki", num_new=3, min_frequency=0)
    with pytest.raises(ValidationError):
        ExpandOptions(corpus="wiki", num_new=3, unknown=1)


@pytest.mark.parametrize("style", ["gpt2", "llama3"])
def test_chunked_pre_tokenization_is_exact(style, texts):
    """Long texts are pre-tokenized in pieces; the pieces must not change a single word."""
    from collections import Counter

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from lctool.ops.vocab.bpe import text_chunks

    backend = Tokenizer(models.BPE())
    if style == "gpt2":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        pattern = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    text = texts["target"][:20_000] + "\n\nend_\nx.\ny \n\nz\r\nw 12\n3" + texts["old"][:20_000]
    whole = Counter(w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    for size in (50, 1000):
        assert "".join(text_chunks(text, size)) == text
        pieces = Counter()
        for chunk in text_chunks(text, size):
            pieces.update(w for w, _ in backend.pre_tokenizer.pre_tokenize_str(chunk))
        assert pieces == whole


# ---- quality on the testbed --------------------------------------------------------------------

@pytest.mark.testbed
@pytest.mark.slow
def test_testbed_expanded_for_shakespeare(testbed_dir, tmp_path):
    """512 Shakespeare merges: >= 10% fewer tokens per character there, wiki almost unchanged, and
    mean init codes Shakespeare better than random init, with wiki bits-per-byte within a few percent."""
    from lctool.data import corpus_text
    from lctool.eval import load_for_eval, perplexity
    from lctool.ops.vocab import tokens_per_char

    texts = {name: corpus_text(name, "eval")[:20_000] for name in ("shakespeare", "wiki")}
    paths = {"base": testbed_dir}
    for init in ("mean", "random"):
        paths[init] = str(tmp_path / init)
        expand(testbed_dir, paths[init], ExpandOptions(corpus="shakespeare", num_new=512, init=init))
    fertility = {name: tokens_per_char(paths["mean"], text) / tokens_per_char(testbed_dir, text)
                 for name, text in texts.items()}
    assert fertility["shakespeare"] <= 0.90
    assert fertility["wiki"] >= 0.98
    bpb = {}
    for key, path in paths.items():
        model, tokenizer = load_for_eval(path)
        bpb[key] = {name: perplexity(model, tokenizer, text, ctx=256)["bpb"] for name, text in texts.items()}
    assert bpb["mean"]["shakespeare"] < 0.99 * bpb["random"]["shakespeare"]
    assert bpb["mean"]["shakespeare"] < bpb["base"]["shakespeare"]
    assert abs(bpb["mean"]["wiki"] / bpb["base"]["wiki"] - 1) < 0.03
