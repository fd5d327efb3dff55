"""The architecture map against the real module trees of tiny models of each family."""

import pytest

from lctool.arch import LINEAR_ROLES, ModelArch, read_rope, supported_families, write_rope
from lctool.errors import LctoolError
from tests.tiny_models import tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma"]


@pytest.mark.parametrize("family", FAMILIES)
def test_map_matches_module_tree(family):
    model = tiny_model(family)
    config = model.config.to_dict()
    arch = ModelArch(config)
    state = model.state_dict()
    expected = arch.expected_shapes()
    stored = {n: tuple(t.shape) for n, t in state.items() if not (arch.tied and n == "lm_head.weight")}
    assert expected == stored
    modules = dict(model.named_modules())
    for layer in range(arch.num_layers):
        for role in LINEAR_ROLES:
            module = modules[arch.module(role, layer)]
            assert tuple(module.weight.shape) == arch.linear_shape(role)
            assert (module.bias is not None) == arch.has_bias(role)
            assert arch.classify(arch.weight(role, layer)).role == role
    assert arch.classify("model.embed_tokens.weight").role == "embed"
    assert arch.classify("something.else") is None


def test_gqa_and_roles():
    arch = ModelArch(tiny_model("llama").config.to_dict())
    assert arch.gqa_group == 2
    assert arch.linear_roles("attn") == ["q", "k", "v", "o"]
    assert arch.linear_roles("q,v") == ["q", "v"]
    assert arch.module_names_for_roles(["q", "gate"]) == ["gate_proj", "q_proj"]
    with pytest.raises(LctoolError, match="unknown role"):
        arch.linear_roles("q,nope")


def test_unknown_architecture_lists_supported():
    with pytest.raises(LctoolError) as info:
        ModelArch({"model_type": "gpt2", "hidden_size": 8})
    for name in supported_families():
        assert name in str(info.value)


def test_bad_config_values():
    config = tiny_model("llama").config.to_dict()
    with pytest.raises(LctoolError, match="num_hidden_layers"):
        ModelArch({**config, "num_hidden_layers": -1})
    with pytest.raises(LctoolError, match="multiple"):
        ModelArch({**config, "num_key_value_heads": 3})


def test_rope_both_spellings():
    v4 = {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 4.0}}
    v5 = {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "linear", "factor": 4.0}}
    assert read_rope(v4) == read_rope(v5)
    assert read_rope({}).theta == 10000.0 and not read_rope({}).scaled
    written = write_rope({**v4, "x": 1}, read_rope(v4))
    assert "rope_scaling" not in written and "rope_theta" not in written
    assert written["rope_parameters"] == v5["rope_parameters"] and written["x"] == 1
    with pytest.raises(LctoolError):
        read_rope({"rope_theta": "big"})
