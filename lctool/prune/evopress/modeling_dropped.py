"""Model code for a checkpoint whose layers lost their attention or their MLP sub-block (`lctool prune
--method evopress --space blocks`).

Written next to the weights as `modeling_lctool_dropped.py` and named by `auto_map` in config.json;
loading therefore needs the user to enable `trust_remote_code`. The model is the stock transformers
class of the family; in each layer listed in `config.<DROPPED_KEY>` ({"attn": [...], "mlp": [...]})
the dropped sub-block and the norm in front of it are replaced by modules without weights that add
nothing to the residual stream, so that layer computes x + mlp(norm(x)) (or x + attn(norm(x))).
Requires only torch and transformers.

Inside lctool this file is also imported as a module (the search uses the same stand-ins), and
`make_dropped_class` is called with the family's names from the architecture map; the written copy
has them filled in below.
"""

import torch
import transformers
from torch import nn

# Filled in by lctool when it writes this file into a checkpoint.
BASE_CLASS = ""  # lctool:fill
LAYERS = ""  # lctool:fill
SUBLAYERS = {}  # lctool:fill
NORMS = {}  # lctool:fill
DROPPED_KEY = ""  # lctool:fill


class SkippedAttention(nn.Module):
    """Stands in for a dropped attention block: contributes zero to the residual stream."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            # A one-channel placeholder keeps the cache's length bookkeeping right (generation asks a
            # layer's cache for the sequence length so far), at no real memory cost.
            batch, length = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros(batch, 1, length, 1)
            past_key_values.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class SkippedMLP(nn.Module):
    """Stands in for a dropped MLP block: contributes zero to the residual stream."""

    def forward(self, hidden_states):
        return torch.zeros_like(hidden_states)


def _child(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _replace(layer: nn.Module, path: str, module: nn.Module) -> nn.Module:
    parent_path, _, leaf = path.rpartition(".")
    parent = _child(layer, parent_path) if parent_path else layer
    original = getattr(parent, leaf)
    setattr(parent, leaf, module)
    return original


def stand_in(kind: str, layer_idx: int) -> nn.Module:
    return SkippedAttention(layer_idx) if kind == "attn" else SkippedMLP()


def drop_sublayer(layer: nn.Module, kind: str, layer_idx: int, sublayers: dict, norms: dict) -> tuple:
    """Replace sub-block `kind` of a decoder layer and its norm; returns the originals (block, norm)."""
    block = _replace(layer, sublayers[kind], stand_in(kind, layer_idx))
    norm = _replace(layer, norms[kind], nn.Identity())
    return block, norm


def restore_sublayer(layer: nn.Module, kind: str, originals: tuple, sublayers: dict, norms: dict) -> None:
    _replace(layer, sublayers[kind], originals[0])
    _replace(layer, norms[kind], originals[1])


def make_dropped_class(base: type, layers_path: str, sublayers: dict, norms: dict, dropped_key: str) -> type:
    """A subclass of the stock causal-LM class `base` without the sub-blocks the config lists."""

    class DroppedForCausalLM(base):
        def __init__(self, config):
            super().__init__(config)
            dropped = getattr(config, dropped_key)
            layers = _child(self, layers_path)
            for kind in ("attn", "mlp"):
                for index in dropped[kind]:
                    drop_sublayer(layers[index], kind, index, sublayers, norms)

    DroppedForCausalLM.__qualname__ = DroppedForCausalLM.__name__
    return DroppedForCausalLM


if BASE_CLASS:
    DroppedForCausalLM = make_dropped_class(getattr(transformers, BASE_CLASS), LAYERS, SUBLAYERS, NORMS, DROPPED_KEY)
