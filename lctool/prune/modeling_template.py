"""Model code for a checkpoint pruned by `lctool prune` whose decoder layers differ in size.

Written next to the weights as `modeling_lctool_pruned.py` and named by `auto_map` in config.json;
loading therefore needs the user to enable `trust_remote_code`. The model is the stock transformers class of the
family with each layer's projections rebuilt at the sizes listed in `config.<SIZES_KEY>`
(num_attention_heads, num_key_value_heads, intermediate_size per layer). Everything else (RoPE,
norms, attention kernels, generation) is the stock code. Requires only torch and transformers.

Inside lctool this file is also imported as a module, and `make_pruned_class` is called with the
family's names from the architecture map; the written copy has them filled in below.
"""

import transformers
from torch import nn

# Filled in by lctool when it writes this file into a checkpoint.
BASE_CLASS = ""  # lctool:fill
LAYERS = ""  # lctool:fill
MODULES = {}  # lctool:fill
SIZES_KEY = ""  # lctool:fill


def _child(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _rebuild_linear(layer: nn.Module, path: str, in_features: int, out_features: int) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = _child(layer, parent_path) if parent_path else layer
    old = getattr(parent, leaf)
    new = nn.Linear(in_features, out_features, bias=old.bias is not None,
                    dtype=old.weight.dtype, device=old.weight.device)
    setattr(parent, leaf, new)


def _parent(layer: nn.Module, path: str) -> nn.Module:
    return _child(layer, path.rpartition(".")[0])


def resize_layers(model: nn.Module, config, layers_path: str, modules: dict, sizes_key: str) -> None:
    """Rebuild every decoder layer's projections at its own head count and intermediate size."""
    sizes = getattr(config, sizes_key)
    head_dim = config.head_dim
    hidden = config.hidden_size
    for index, layer in enumerate(_child(model, layers_path)):
        heads = sizes["num_attention_heads"][index]
        kv_heads = sizes["num_key_value_heads"][index]
        intermediate = sizes["intermediate_size"][index]
        _rebuild_linear(layer, modules["q"], hidden, heads * head_dim)
        _rebuild_linear(layer, modules["k"], hidden, kv_heads * head_dim)
        _rebuild_linear(layer, modules["v"], hidden, kv_heads * head_dim)
        _rebuild_linear(layer, modules["o"], heads * head_dim, hidden)
        _rebuild_linear(layer, modules["gate"], hidden, intermediate)
        _rebuild_linear(layer, modules["up"], hidden, intermediate)
        _rebuild_linear(layer, modules["down"], intermediate, hidden)
        # The stock attention repeats each kv head for this many query heads (its only head count).
        _parent(layer, modules["q"]).num_key_value_groups = heads // kv_heads
        _parent(layer, modules["gate"]).intermediate_size = intermediate


def make_pruned_class(base: type, layers_path: str, modules: dict, sizes_key: str) -> type:
    """A subclass of the stock causal-LM class `base` whose layers take their sizes from the config."""

    class PrunedForCausalLM(base):
        def __init__(self, config):
            super().__init__(config)
            resize_layers(self, config, layers_path, modules, sizes_key)

    PrunedForCausalLM.__qualname__ = PrunedForCausalLM.__name__
    return PrunedForCausalLM


if BASE_CLASS:
    PrunedForCausalLM = make_pruned_class(getattr(transformers, BASE_CLASS), LAYERS, MODULES, SIZES_KEY)
