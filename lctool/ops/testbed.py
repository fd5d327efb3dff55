"""The embedded testbed: a small real Llama that lctool trains itself from real text.

Nothing can be downloaded at run time, yet compression and adaptation are only judged by what they
do to a model's quality. So lctool builds its own model, deterministically from a seed:

1. a byte-level BPE tokenizer trained on the wiki train split;
2. a Llama with GQA, RoPE, SwiGLU and tied embeddings, pretrained at context L0 = 256 on the same
   split with the shared training loop (`lctool.train`);
3. saved through lctool's writer into the cache (`$LCTOOL_CACHE/testbed/<preset>-<recipe hash>`),
   so tests and the demo build it once per machine.

Presets: `quick` (tests, demo: a few minutes on 2 CPU cores) and `bench` (benchmarks: stronger,
longer, with a share of synthetic retrieval sequences; see `lctool/ops/testbed_bench.py`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import time

from pydantic import BaseModel, ConfigDict

from lctool.errors import LctoolError
from lctool.io.cache import cache_dir

EOS_TOKEN = "<|endoftext|>"


class TestbedRecipe(BaseModel):
    """Everything that determines the testbed; its hash names the cache folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    __test__ = False  # not a pytest class

    preset: str
    seed: int = 0
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    context: int = 256
    rope_theta: float = 10000.0
    steps: int = 240
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    threads: int = 2
    retrieval_share: float = 0.0  # fraction of training sequences that are synthetic retrieval tasks
    dtype: str = "float32"  # the training run's mixed precision (float32: none)

    def digest(self) -> str:
        # float32 recipes hash as they did before `dtype` existed: cached testbeds and bench results name them.
        exclude = {"dtype"} if self.dtype == "float32" else None
        return hashlib.sha256(self.model_dump_json(exclude=exclude).encode()).hexdigest()[:12]


PRESETS: dict[str, TestbedRecipe] = {
    "quick": TestbedRecipe(preset="quick"),
    # Benchmarks: ~1.6x the parameters and ~3.3x the steps of quick (about 5x its compute, ~45 min on
    # 2 CPU cores), and 10% synthetic retrieval rows so that passkey accuracy at L0 is meaningful
    # (the copy skill gets a weak signal: only the recalled digits are hard to predict in each row).
    "bench": TestbedRecipe(
        preset="bench",
        vocab_size=4096,
        hidden_size=320,
        intermediate_size=864,
        num_layers=5,
        num_heads=10,
        num_kv_heads=2,
        steps=800,
        batch_size=16,
        lr=2.5e-3,
        warmup_steps=40,
        retrieval_share=0.10,
    ),
}


def recipe_for(preset: str, dtype: str = "float32") -> TestbedRecipe:
    """The preset's recipe, trained in `dtype` (another dtype is another testbed, in its own folder)."""
    if preset not in PRESETS:
        raise LctoolError(f"unknown testbed preset {preset!r} (presets: {', '.join(sorted(PRESETS))})")
    return PRESETS[preset] if dtype == "float32" else PRESETS[preset].model_copy(update={"dtype": dtype})


def testbed_dir_for(recipe: TestbedRecipe) -> str:
    return os.path.join(cache_dir("testbed"), f"{recipe.preset}-{recipe.digest()}")


def testbed_path(preset: str = "quick", build: bool = True, log=None, device: str = "cpu",
                 dtype: str = "float32") -> str | None:
    """The cached testbed folder; built first (training on `device` in `dtype`) when missing and `build`
    is true, else None. The device does not name the folder: it changes only float rounding."""
    from lctool.devices import check_device, mixed_precision

    check_device(device)
    mixed_precision(dtype, device)
    recipe = recipe_for(preset, dtype)
    path = testbed_dir_for(recipe)
    if os.path.exists(os.path.join(path, "lctool.json")):
        return path
    if not build:
        return None
    # One builder per machine; concurrent callers (pytest-xdist workers) wait for it.
    with _build_lock(path):
        if not os.path.exists(os.path.join(path, "lctool.json")):
            build_testbed(recipe, path, log=log, device=device)
    return path


@contextlib.contextmanager
def _build_lock(path: str):
    fd = os.open(path + ".build-lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ---- tokenizer -----------------------------------------------------------------------------------

def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style) tokenizer as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=None,
        model_max_length=1_000_000,
    )


# ---- model ---------------------------------------------------------------------------------------

def model_config(recipe: TestbedRecipe, tokenizer):
    from transformers import LlamaConfig

    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    return LlamaConfig(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        head_dim=recipe.hidden_size // recipe.num_heads,
        max_position_embeddings=recipe.context,
        rope_parameters={"rope_type": "default", "rope_theta": recipe.rope_theta},
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
    )


def training_stream(tokens, recipe: TestbedRecipe, retrieval=None):
    """Endless batches of random windows of `context` tokens, seeded (the order is the recipe's)."""
    import torch

    generator = torch.Generator().manual_seed(recipe.seed + 1)
    span = recipe.context
    last_start = len(tokens) - span
    while True:
        starts = torch.randint(0, last_start, (recipe.batch_size,), generator=generator)
        batch = torch.stack([tokens[s : s + span] for s in starts.tolist()])
        if retrieval is not None:
            batch = retrieval(batch, generator)
        yield {"input_ids": batch, "labels": batch}


# ---- synthetic retrieval rows (bench preset) -----------------------------------------------------
# Deliberately unlike the evaluation's passkey prompts (lctool.eval.passkey): the filler is real wiki
# text (not "The grass is green..."), the thing to recall has other names and 3-6 digits (the
# evaluation asks for a 5-digit "pass key"), and the phrasing differs. What transfers is the skill:
# find a fact stated once, anywhere in the window, and copy it at the end.
RETRIEVAL_NAMES = ("secret number", "access code", "magic number", "door code", "lucky number", "room number")


def retrieval_row(tokenizer, filler_ids: list[int], context: int, generator) -> list[int]:
    """One training row: wiki filler with a stated number at a random depth, then its recall."""
    import torch

    name = RETRIEVAL_NAMES[int(torch.randint(len(RETRIEVAL_NAMES), (1,), generator=generator))]
    digits = int(torch.randint(3, 7, (1,), generator=generator))
    value = "".join(str(int(d)) for d in torch.randint(0, 10, (digits,), generator=generator))
    fact = tokenizer(f" Note: the {name} is {value}. Keep the {name} in mind.", add_special_tokens=False)["input_ids"]
    recall = tokenizer(f" Question: what is the {name}? Answer: the {name} is {value}.",
                       add_special_tokens=False)["input_ids"]
    room = context - len(fact) - len(recall)
    filler = filler_ids[: max(room, 0)]
    depth = int(torch.randint(0, len(filler) + 1, (1,), generator=generator))
    return (filler[:depth] + fact + filler[depth:] + recall)[:context]


def retrieval_mixer(tokenizer, share: float, context: int):
    """Replace a `share` of each batch's rows by retrieval rows built from the rows' own text."""
    import torch

    def mix(batch, generator):
        chosen = torch.rand(batch.shape[0], generator=generator) < share
        for row in chosen.nonzero().flatten().tolist():
            built = retrieval_row(tokenizer, batch[row].tolist(), context, generator)
            batch[row, : len(built)] = torch.tensor(built)
        return batch

    return mix


def build_testbed(recipe: TestbedRecipe, path: str, log=None, device: str = "cpu") -> str:
    """Train the tokenizer and the model of `recipe` (on `device`) and write them to `path` (atomically)."""
    import torch
    from transformers import LlamaForCausalLM

    from lctool.data import corpus_documents
    from lctool.devices import mixed_precision
    from lctool.io.hf import save_causal_lm
    from lctool.train import TrainConfig, train

    say = log or (lambda message: None)
    started = time.time()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        documents = corpus_documents("wiki", "train")
        say(f"testbed {recipe.preset}: training the tokenizer on {len(documents)} wiki articles")
        tokenizer = train_tokenizer(documents, recipe.vocab_size)
        eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
        ids: list[int] = []
        for document_ids in tokenizer(documents)["input_ids"]:
            ids.extend(document_ids)
            ids.append(eos)
        tokens = torch.tensor(ids, dtype=torch.long)
        torch.manual_seed(recipe.seed)
        model = LlamaForCausalLM(model_config(recipe, tokenizer))
        parameters = sum(p.numel() for p in model.parameters())
        say(f"testbed {recipe.preset}: {parameters / 1e6:.1f}M parameters, {len(tokens):,} training tokens, "
            f"{recipe.steps} steps of {recipe.batch_size}×{recipe.context}")
        config = TrainConfig(
            steps=recipe.steps,
            lr=recipe.lr,
            warmup_steps=recipe.warmup_steps,
            batch_size=recipe.batch_size,
            weight_decay=recipe.weight_decay,
            seed=recipe.seed,
            description=f"testbed {recipe.preset}",
            device=device,
            mixed_precision=mixed_precision(recipe.dtype, device),
        )
        retrieval = retrieval_mixer(tokenizer, recipe.retrieval_share, recipe.context) if recipe.retrieval_share else None
        result = train(model, training_stream(tokens, recipe, retrieval), config)
        model.eval()
        results = {
            "parameters": parameters,
            "training_tokens_seen": recipe.steps * recipe.batch_size * recipe.context,
            "corpus_tokens": len(tokens),
            "final_loss": float(result.losses[-1]) if result.losses else math.nan,
            "tokens_per_s": result.tokens_per_s,
            "train_wall_s": round(time.time() - started, 1),
        }
        save_causal_lm(
            model,
            path,
            operation="testbed",
            parameters=recipe.model_dump(),
            tokenizer=tokenizer,
            seed=recipe.seed,
            force=True,
            results=results,
        )
        say(f"testbed {recipe.preset}: wrote {path} in {time.time() - started:.0f} s")
        return path
    finally:
        torch.set_num_threads(previous_threads)


def testbed_summary(path: str) -> dict:
    with open(os.path.join(path, "lctool.json")) as f:
        manifest = json.load(f)
    return {"path": path, **manifest.get("parameters", {}), **manifest.get("results", {})}
