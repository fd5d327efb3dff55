"""`--search`: choose a training-free method's factor (and YaRN/Llama-3 shape parameters) by held-out
perplexity at the target length.

The model is loaded once; each candidate's frequencies (lctool's own formulas, which the tests tie
to transformers') are written into the live rotary embedding, and perplexity is measured on windows
of the target length from a held-out split (wiki:calib by default, never the eval split). The
winner is written exactly like an unsearched run, with the candidates' table in the manifest.
"""

from __future__ import annotations

from pydantic import ConfigDict, Field

from lctool.devices import ComputeOptions
from lctool.errors import check
from lctool.ops.extend.options import ExtendOptions
from lctool.ops.extend.scaling import Lengths, OriginalRope, expected_frequencies, scaled_rope

FACTOR_MULTIPLIERS = (1.0, 1.25, 1.5, 2.0)
SHAPE_GRID = {
    "yarn": [{"beta_fast": b} for b in (8.0, 16.0, 32.0, 64.0)],
    "llama3": [{"high_freq_factor": h} for h in (2.0, 4.0, 8.0)],
}


class SearchOptions(ComputeOptions):
    """`device`/`dtype`: where and in what dtype the candidates' perplexities are measured (weights and
    activations)."""

    model_config = ConfigDict(extra="forbid")
    corpus: str = Field("wiki:calib", description="held-out text source")
    max_tokens: int = Field(8192, ge=16)
    batch_size: int = Field(4, ge=1)


def candidates(options: ExtendOptions, lengths: Lengths) -> list[dict]:
    """Option overrides to try: factor multiples of F (never below F), times the shape grid."""
    shapes = SHAPE_GRID.get(options.method, [{}])
    return [{"factor": round(lengths.factor * m, 6), **shape} for m in FACTOR_MULTIPLIERS for shape in shapes]


def search_scaling(checkpoint, original: OriginalRope, lengths: Lengths, options: ExtendOptions, dim: int,
                   search: SearchOptions | None = None) -> tuple[ExtendOptions, list[dict]]:
    from lctool.data import load_text_source
    from lctool.eval import perplexity
    from lctool.io.hf import load_tokenizer
    from lctool.ops.extend.finetune import load_unscaled_model
    from lctool.ops.extend.rotary import RotaryOverride

    search = search or SearchOptions()
    model = load_unscaled_model(checkpoint, original, search.torch_dtype).to(search.device).eval()
    tokenizer = load_tokenizer(checkpoint.path)
    text = load_text_source(search.corpus, split="calib")
    tried = []
    with RotaryOverride(model) as rotary:
        for overrides in candidates(options, lengths):
            candidate = options.model_copy(update=overrides)
            trial_lengths = Lengths(lengths.original, lengths.target, overrides["factor"])
            rope, _ = scaled_rope(options.method, original.rope, dim, trial_lengths, candidate)
            inv_freq, scaling = expected_frequencies(rope, dim, lengths.original, seq_len=lengths.target)
            rotary.set(inv_freq, scaling)
            result = perplexity(model, tokenizer, text, lengths.target, batch_size=search.batch_size,
                                max_tokens=search.max_tokens)
            tried.append({**overrides, "ppl": round(float(result["ppl"]), 4)})
    check(bool(tried), "nothing to search")
    best = min(tried, key=lambda row: row["ppl"])
    chosen = options.model_copy(update={k: v for k, v in best.items() if k != "ppl"})
    return chosen, tried
