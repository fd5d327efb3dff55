"""The embedded testbed: real, loadable by stock libraries, and clearly better than a unigram model."""

import json
import math
import os
from collections import Counter

import pytest
import torch

from lctool.errors import LctoolError
from lctool.ops.testbed import PRESETS, recipe_for, retrieval_row
from lctool.ops.testbed import testbed_path as locate_testbed
from tests.tiny_models import byte_tokenizer


def test_recipes_and_presets():
    assert set(PRESETS) >= {"quick", "bench"}
    assert PRESETS["quick"].digest() != PRESETS["bench"].digest()
    with pytest.raises(LctoolError, match="unknown testbed preset"):
        recipe_for("huge")


def test_retrieval_rows_state_then_recall():
    tokenizer = byte_tokenizer()
    generator = torch.Generator().manual_seed(0)
    filler = tokenizer("Plain filler text about anything at all. " * 20, add_special_tokens=False)["input_ids"]
    rows = [tokenizer.decode(retrieval_row(tokenizer, filler, 600, generator)) for _ in range(20)]
    for row in rows:
        assert len(tokenizer(row, add_special_tokens=False)["input_ids"]) == 600
        fact = row.split(" Note: the ", 1)[1]
        name, value = fact.split(" is ", 1)[0], fact.split(" is ", 1)[1].split(".", 1)[0]
        assert value.isdigit() and 3 <= len(value) <= 6
        assert row.endswith(f" Question: what is the {name}? Answer: the {name} is {value}.")
        assert "pass key" not in row and "grass is green" not in row  # unlike the evaluation prompts
    depths = {row.index(" Note: the ") for row in rows}
    assert len(depths) > 10  # the fact moves through the window


@pytest.mark.testbed
def test_testbed_loads_in_stock_transformers(testbed_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.load(open(os.path.join(testbed_dir, "config.json")))
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["max_position_embeddings"] == 256
    manifest = json.load(open(os.path.join(testbed_dir, "lctool.json")))
    assert manifest["operation"] == "testbed" and manifest["results"]["parameters"] > 3e6
    tokenizer = AutoTokenizer.from_pretrained(testbed_dir)
    model = AutoModelForCausalLM.from_pretrained(testbed_dir, dtype=torch.float32).eval()
    assert 4000 <= len(tokenizer) <= 8192
    ids = tokenizer("The history of the city", return_tensors="pt")["input_ids"]
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=40, do_sample=True, top_k=40, temperature=0.8)
    words = tokenizer.decode(out[0, ids.shape[1]:]).split()  # the continuation only
    assert len(words) >= 12
    # English-looking: mostly alphabetic words, varied, several of them common English words
    assert sum(w.strip(".,;:()'\"").isalpha() for w in words) / len(words) > 0.6
    assert len(set(words)) / len(words) > 0.5
    assert len({w.lower().strip(".,") for w in words} & {"the", "of", "and", "in", "a", "to", "is", "was"}) >= 2


@pytest.mark.testbed
def test_testbed_beats_unigram_on_held_out_wiki(testbed_dir):
    from lctool.data import corpus_text
    from lctool.eval import load_for_eval, perplexity

    model, tokenizer = load_for_eval(testbed_dir)
    held_out = corpus_text("wiki", "eval")[:60000]
    result = perplexity(model, tokenizer, held_out, ctx=256)
    train_ids = tokenizer(corpus_text("wiki", "train"), add_special_tokens=False)["input_ids"]
    counts, total = Counter(train_ids), len(train_ids)
    vocab = len(tokenizer)
    eval_ids = tokenizer(held_out, add_special_tokens=False)["input_ids"]
    # add-one smoothed unigram model trained on the same split
    unigram_nll = -sum(math.log((counts[i] + 1) / (total + vocab)) for i in eval_ids) / len(eval_ids)
    assert result["ppl"] < 0.5 * math.exp(unigram_nll), (result["ppl"], math.exp(unigram_nll))
    assert result["bpb"] < 3.0


def test_testbed_path_without_build(monkeypatch, tmp_path):
    monkeypatch.setenv("LCTOOL_CACHE", str(tmp_path))
    assert locate_testbed("quick", build=False) is None
