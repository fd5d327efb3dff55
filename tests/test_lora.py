"""lctool.train.lora: adapters land on the modules the architecture map names, and merge exactly."""

from __future__ import annotations

import pytest
import torch

from lctool.arch import ATTN_ROLES, FAMILIES, ModelArch
from lctool.errors import LctoolError
from lctool.train import lora
from tests.tiny_models import tiny_model

IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapters_sit_on_the_mapped_roles_and_merge_exactly(family):
    model = tiny_model(family)
    arch = ModelArch(model.config.to_dict())
    norms = ["final_norm", *arch.family.norm_roles]
    config = lora.peft_config(arch, lora.LoraSpec(rank=4, roles="attn", train_fully=norms))
    assert config.lora_alpha == 8  # twice the rank by default

    wrapped = lora.attach(model, config, seed=0)
    adapted = {name.removeprefix("base_model.model.") for name, module in wrapped.named_modules()
               if hasattr(module, "lora_A") and not name.endswith(("lora_A", "lora_B"))}
    expected = {arch.module(role, layer) for role in ATTN_ROLES for layer in range(arch.num_layers)}
    assert adapted == expected
    trainable = [name for name, p in wrapped.named_parameters() if p.requires_grad]
    assert all("lora_" in name or "modules_to_save" in name for name in trainable)
    assert {arch.module(role, 0 if role != "final_norm" else None).rsplit(".", 1)[-1] for role in norms} \
        == set(config.modules_to_save)

    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # peft starts B at zero: make the adapter do something
        adapted_logits = wrapped(input_ids=IDS).logits
        merged = lora.merge(wrapped)
        assert not any("lora" in name for name in merged.state_dict())
        torch.testing.assert_close(merged(input_ids=IDS).logits, adapted_logits, atol=1e-5, rtol=1e-5)


def test_unknown_roles_fail_before_any_model_is_touched():
    arch = ModelArch(tiny_model("llama").config.to_dict())
    with pytest.raises(LctoolError, match="unknown role 'qq'"):
        lora.peft_config(arch, lora.LoraSpec(rank=4, roles=["q", "qq"]))
    with pytest.raises(LctoolError, match="unknown role 'nope'"):
        lora.peft_config(arch, lora.LoraSpec(rank=4, train_fully=["nope"]))
