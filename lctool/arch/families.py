"""Each supported model family, as data: the one place in lctool that knows tensor names.

A family is described by module paths with a `{i}` placeholder for the layer index. Roles are the
words every op uses instead of names:

    linear roles  q k v o (attention), gate up down (MLP)
    norm roles    input_norm post_attn_norm (+ q_norm k_norm on Qwen3; + the sandwich norms on Gemma 2/3)
    model roles   embed lm_head final_norm
"""

from __future__ import annotations

from dataclasses import dataclass, field

ATTN_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")
LINEAR_ROLES = ATTN_ROLES + MLP_ROLES

_LLAMA_LAYER = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
    "input_norm": "input_layernorm",
    "post_attn_norm": "post_attention_layernorm",
}


@dataclass(frozen=True)
class Family:
    """How one model family names and shapes its tensors."""

    name: str
    model_types: tuple[str, ...]
    causal_lm_class: str
    layer_modules: dict[str, str]
    embed: str = "model.embed_tokens"
    lm_head: str = "lm_head"
    final_norm: str = "model.norm"
    layers: str = "model.layers"
    # The model-level rotary embedding module (computes the cos/sin every decoder layer takes).
    rotary: str = "model.rotary_emb"
    # Roles whose Linear carries a bias regardless of config (Qwen2 q/k/v).
    fixed_bias_roles: tuple[str, ...] = ()
    # Config key that switches biases on for all attention projections (Llama's attention_bias).
    attention_bias_key: str | None = "attention_bias"
    mlp_bias_key: str | None = "mlp_bias"
    # Gemma stores RMSNorm weights as w with y = x * (1 + w); others as y = x * w.
    norm_weight_offset: float = 0.0
    # Gemma multiplies the embedding output by sqrt(hidden_size).
    embed_scaled: bool = False
    # Roles that are per-head norms of size head_dim rather than hidden_size.
    head_norm_roles: tuple[str, ...] = ()
    # tie_word_embeddings when config.json does not say (the transformers config class default).
    tie_default: bool = False
    # transformers' config refuses num_attention_heads that do not divide hidden_size, even with an
    # explicit head_dim (LlamaConfig.validate_architecture in transformers 5.23): a stock-loadable
    # pruned model must keep such a head count.
    heads_divide_hidden: bool = False
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def norm_roles(self) -> tuple[str, ...]:
        return tuple(r for r in self.layer_modules if r not in LINEAR_ROLES)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", ("llama", "clex_llama"), "LlamaForCausalLM", dict(_LLAMA_LAYER), heads_divide_hidden=True),
        Family("mistral", ("mistral", "clex_mistral"), "MistralForCausalLM", dict(_LLAMA_LAYER), attention_bias_key=None, mlp_bias_key=None),
        Family(
            "qwen2",
            ("qwen2", "clex_qwen2"),
            "Qwen2ForCausalLM",
            dict(_LLAMA_LAYER),
            fixed_bias_roles=("q", "k", "v"),
            attention_bias_key=None,
            mlp_bias_key=None,
        ),
        Family(
            "qwen3",
            ("qwen3", "clex_qwen3"),
            "Qwen3ForCausalLM",
            {**_LLAMA_LAYER, "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"},
            mlp_bias_key=None,
            head_norm_roles=("q_norm", "k_norm"),
        ),
        Family(
            "gemma",
            ("gemma", "clex_gemma"),
            "GemmaForCausalLM",
            dict(_LLAMA_LAYER),
            norm_weight_offset=1.0,
            embed_scaled=True,
            mlp_bias_key=None,
            tie_default=True,
            notes="RMSNorm weight w acts as (1 + w); embeddings are scaled by sqrt(hidden_size); gelu MLP.",
        ),
    )
}

# `clex_<type>`: the same model with a CLEX rotary embedding (lctool extend --method clex), whose
# modeling_clex.py subclasses the stock class; tensor names and shapes are the family's.
MODEL_TYPE_TO_FAMILY = {mt: fam for fam in FAMILIES.values() for mt in fam.model_types}
