"""A family bound to one config.json: names, shapes and RoPE settings of a concrete checkpoint."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from lctool.arch.families import ATTN_ROLES, FAMILIES, LINEAR_ROLES, MLP_ROLES, MODEL_TYPE_TO_FAMILY, Family
from lctool.arch.rope import RopeSettings, read_rope
from lctool.errors import LctoolError, check

# Config key of per-layer sizes, written by `lctool prune` when layers end up of different sizes:
# {"num_attention_heads": [...], "num_key_value_heads": [...], "intermediate_size": [...]}, one entry
# per layer. The top-level sizes stay those of the unpruned model (what the stock classes build first).
LAYER_SIZES_KEY = "pruned_layer_sizes"
_LAYER_SIZE_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
# Config key of the attention / MLP sub-blocks removed by `lctool prune --method evopress --space blocks`:
# {"attn": [layer, ...], "mlp": [layer, ...]}. Those layers hold no tensors for the removed sub-block
# (its projections and the norm in front of it); the checkpoint's auto_map code skips it.
DROPPED_SUBLAYERS_KEY = "lctool_dropped_sublayers"
SUBLAYER_KINDS = ("attn", "mlp")


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def family_of(config: dict) -> Family:
    model_type = config.get("model_type")
    family = MODEL_TYPE_TO_FAMILY.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise LctoolError(
            f"unsupported architecture {model_type!r} (supported: {', '.join(supported_families())})"
        )
    return family


@dataclass(frozen=True)
class TensorRole:
    """What a tensor name means: `layer` is None for embed/lm_head/final_norm."""

    role: str
    layer: int | None
    kind: str  # "weight" or "bias"


class ModelArch:
    """Names, shapes and head layout of one checkpoint, from its config.json alone."""

    def __init__(self, config: dict):
        check(isinstance(config, dict), "config.json is not a JSON object")
        self.config = config
        self.family = family_of(config)
        self.hidden_size = self._positive_int("hidden_size")
        self.num_layers = self._positive_int("num_hidden_layers")
        self.num_heads = self._positive_int("num_attention_heads")
        self.num_kv_heads = self._optional_positive_int("num_key_value_heads", self.num_heads)
        self.intermediate_size = self._positive_int("intermediate_size")
        self.vocab_size = self._positive_int("vocab_size")
        self.head_dim = self._optional_positive_int("head_dim", self.hidden_size // self.num_heads)
        check(
            self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0,
            f"num_attention_heads ({self.num_heads}) is not a multiple of num_key_value_heads ({self.num_kv_heads})",
        )
        check(self.head_dim > 0, "head_dim must be positive")
        self.layer_sizes = self._read_layer_sizes()
        self.dropped_sublayers = self._read_dropped_sublayers()

    def _read_layer_sizes(self) -> dict[str, list[int]] | None:
        sizes = self.config.get(LAYER_SIZES_KEY)
        if sizes is None:
            return None
        check(isinstance(sizes, dict) and set(sizes) == set(_LAYER_SIZE_FIELDS),
              f"config.json: {LAYER_SIZES_KEY} must hold exactly {', '.join(_LAYER_SIZE_FIELDS)}")
        for key, values in sizes.items():
            check(isinstance(values, list) and len(values) == self.num_layers
                  and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values),
                  f"config.json: {LAYER_SIZES_KEY}.{key} must list {self.num_layers} positive integers")
        pairs = zip(sizes["num_attention_heads"], sizes["num_key_value_heads"], strict=True)
        for layer, (heads, kv) in enumerate(pairs):
            check(heads % kv == 0, f"config.json: {LAYER_SIZES_KEY}: layer {layer} has {heads} heads, "
                                   f"not a multiple of its {kv} key/value heads")
        return sizes

    def _read_dropped_sublayers(self) -> dict[str, frozenset[int]]:
        dropped = self.config.get(DROPPED_SUBLAYERS_KEY)
        if dropped is None:
            return {kind: frozenset() for kind in SUBLAYER_KINDS}
        check(isinstance(dropped, dict) and set(dropped) == set(SUBLAYER_KINDS)
              and all(isinstance(v, list) for v in dropped.values()),
              f"config.json: {DROPPED_SUBLAYERS_KEY} must map attn and mlp to lists of layer indices")
        for kind, layers in dropped.items():
            check(all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_layers for i in layers),
                  f"config.json: {DROPPED_SUBLAYERS_KEY}.{kind} must list layers in 0..{self.num_layers - 1}")
        return {kind: frozenset(dropped[kind]) for kind in SUBLAYER_KINDS}

    def _positive_int(self, key: str) -> int:
        value = self.config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise LctoolError(f"config.json: {key} must be a positive integer, got {value!r}")
        return value

    def _optional_positive_int(self, key: str, default: int) -> int:
        """A positive integer, or `default` when absent, null or 0 (as transformers reads these keys)."""
        value = self.config.get(key)
        return default if value is None or value is False or value == 0 else self._positive_int(key)

    # ---- facts ---------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.family.name

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", self.family.tie_default))

    @property
    def gqa_group(self) -> int:
        """Query heads sharing one key/value head."""
        return self.num_heads // self.num_kv_heads

    @cached_property
    def rope(self) -> RopeSettings:
        return read_rope(self.config)

    @property
    def max_positions(self) -> int | None:
        if self.config.get("max_position_embeddings") is None:
            return None
        return self._positive_int("max_position_embeddings")

    def heads_in(self, layer: int) -> int:
        return self.layer_sizes["num_attention_heads"][layer] if self.layer_sizes else self.num_heads

    def kv_heads_in(self, layer: int) -> int:
        return self.layer_sizes["num_key_value_heads"][layer] if self.layer_sizes else self.num_kv_heads

    def intermediate_in(self, layer: int) -> int:
        return self.layer_sizes["intermediate_size"][layer] if self.layer_sizes else self.intermediate_size

    # ---- names ---------------------------------------------------------------------------------
    def layer_prefix(self, layer: int) -> str:
        return f"{self.family.layers}.{layer}"

    def module(self, role: str, layer: int | None = None) -> str:
        """Module path of a role: `module("q", 3)` -> `model.layers.3.self_attn.q_proj`."""
        if role in ("embed", "lm_head", "final_norm"):
            return getattr(self.family, role)
        if role not in self.family.layer_modules:
            raise LctoolError(
                f"unknown role {role!r} for {self.name} (roles: {', '.join(self.roles())})"
            )
        if layer is None or not 0 <= layer < self.num_layers:
            raise LctoolError(f"layer {layer} is outside 0..{self.num_layers - 1}")
        return f"{self.layer_prefix(layer)}.{self.family.layer_modules[role]}"

    def weight(self, role: str, layer: int | None = None) -> str:
        return self.module(role, layer) + ".weight"

    def has_bias(self, role: str) -> bool:
        if role in self.family.fixed_bias_roles:
            return True
        key = self.family.attention_bias_key if role in ATTN_ROLES else None
        if role in MLP_ROLES:
            key = self.family.mlp_bias_key
        return bool(key and self.config.get(key))

    def roles(self) -> list[str]:
        return ["embed", "lm_head", "final_norm", *self.family.layer_modules]

    def linear_roles(self, selection: str | list[str] = "all") -> list[str]:
        """Resolve `attn`, `mlp`, `all` or an explicit role list into linear roles (validated)."""
        if isinstance(selection, str):
            groups = {"attn": list(ATTN_ROLES), "mlp": list(MLP_ROLES), "all": list(LINEAR_ROLES)}
            if selection in groups:
                return groups[selection]
            selection = [s.strip() for s in selection.split(",") if s.strip()]
        for role in selection:
            if role not in LINEAR_ROLES:
                raise LctoolError(
                    f"unknown role {role!r} (linear roles: {', '.join(LINEAR_ROLES)}; or attn, mlp, all)"
                )
        return list(selection)

    def module_names_for_roles(self, roles: list[str]) -> list[str]:
        """Leaf module names (`q_proj`) as peft's `target_modules` wants them."""
        return sorted({self.family.layer_modules[r].split(".")[-1] for r in roles})

    # ---- shapes --------------------------------------------------------------------------------
    def linear_shape(self, role: str, layer: int | None = None) -> tuple[int, int]:
        """(out_features, in_features) of a linear role (of `layer`, when layers differ in size)."""
        h, hd = self.hidden_size, self.head_dim
        heads, kv, inter = self.num_heads, self.num_kv_heads, self.intermediate_size
        if layer is not None and self.layer_sizes:
            heads, kv, inter = self.heads_in(layer), self.kv_heads_in(layer), self.intermediate_in(layer)
        return {
            "q": (heads * hd, h),
            "k": (kv * hd, h),
            "v": (kv * hd, h),
            "o": (h, heads * hd),
            "gate": (inter, h),
            "up": (inter, h),
            "down": (h, inter),
        }[role]

    def sublayer_roles(self, kind: str) -> tuple[str, ...]:
        """Roles that exist only for a layer's attention ("attn") or MLP ("mlp") sub-block, its norm included."""
        if kind == "attn":
            return (*ATTN_ROLES, "input_norm", *self.family.head_norm_roles)
        if kind == "mlp":
            return (*MLP_ROLES, "post_attn_norm")
        raise LctoolError(f"unknown sub-block {kind!r} (sub-blocks: {', '.join(SUBLAYER_KINDS)})")

    def sublayer_path(self, kind: str) -> str:
        """Path of the sub-block module inside a decoder layer (`self_attn`, `mlp`)."""
        role = ATTN_ROLES[0] if kind == "attn" else MLP_ROLES[0]
        self.sublayer_roles(kind)  # validates kind
        return self.family.layer_modules[role].rpartition(".")[0]

    def sublayer_norm_path(self, kind: str) -> str:
        """Path of the norm in front of the sub-block (`input_layernorm`, `post_attention_layernorm`)."""
        return self.family.layer_modules["input_norm" if kind == "attn" else "post_attn_norm"]

    def layer_tensor_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        absent = {r for kind in SUBLAYER_KINDS if layer in self.dropped_sublayers[kind] for r in self.sublayer_roles(kind)}
        for role in self.family.layer_modules:
            if role in absent:
                continue
            if role in LINEAR_ROLES:
                out_f, in_f = self.linear_shape(role, layer)
                shapes[self.weight(role, layer)] = (out_f, in_f)
                if self.has_bias(role):
                    shapes[self.module(role, layer) + ".bias"] = (out_f,)
            else:
                size = self.head_dim if role in self.family.head_norm_roles else self.hidden_size
                shapes[self.weight(role, layer)] = (size,)
        return shapes

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a dense checkpoint of this config holds, with its shape."""
        shapes: dict[str, tuple[int, ...]] = {
            self.weight("embed"): (self.vocab_size, self.hidden_size),
            self.weight("final_norm"): (self.hidden_size,),
        }
        if not self.tied:
            shapes[self.weight("lm_head")] = (self.vocab_size, self.hidden_size)
        for layer in range(self.num_layers):
            shapes.update(self.layer_tensor_shapes(layer))
        return shapes

    # ---- parsing names -------------------------------------------------------------------------
    @cached_property
    def _name_pattern(self) -> re.Pattern:
        by_path = {path: role for role, path in self.family.layer_modules.items()}
        alternatives = "|".join(re.escape(p) for p in sorted(by_path, key=len, reverse=True))
        self._role_by_path = by_path
        return re.compile(rf"^{re.escape(self.family.layers)}\.(\d+)\.({alternatives})\.(weight|bias)$")

    def classify(self, tensor_name: str) -> TensorRole | None:
        """The role of a tensor name, or None when the map does not know it."""
        for role in ("embed", "lm_head", "final_norm"):
            base = getattr(self.family, role)
            if tensor_name in (base + ".weight", base + ".bias"):
                return TensorRole(role, None, tensor_name.rsplit(".", 1)[1])
        match = self._name_pattern.match(tensor_name)
        if not match:
            return None
        return TensorRole(self._role_by_path[match.group(2)], int(match.group(1)), match.group(3))

    def layer_of(self, tensor_name: str) -> int | None:
        found = self.classify(tensor_name)
        return found.layer if found else None

    def summary(self) -> dict:
        return {
            "family": self.name,
            "layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "tied_embeddings": self.tied,
        }
