"""EvoPress (Sieberling et al., 2024): evolutionary search of per-layer compression levels.

One search, three spaces: dropped attention / MLP sub-blocks (or whole layers), unstructured sparsity
per linear layer (SparseGPT or magnitude levels), and GPTQ bitwidth per linear layer. See `space`
(units, levels, the exact target), `database` (the levels on disk), `search` (the evolutionary loop,
resumable), `fitness` (KL to the dense model), `output` (the checkpoint formats), `run` (end to end).
"""

from lctool.prune.evopress.options import EvoPressPruneOptions, EvoPressQuantOptions
from lctool.prune.evopress.run import run_evopress_prune, run_evopress_quantize

__all__ = ["EvoPressPruneOptions", "EvoPressQuantOptions", "run_evopress_prune", "run_evopress_quantize"]
