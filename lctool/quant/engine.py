"""Layer-streaming calibration: run calibration activations through a checkpoint one decoder layer at a time.

Only one decoder layer's weights plus the activations [n, seq, hidden] are in memory at once: the
embeddings turn token ids into the first layer's inputs, each layer is built as the family's stock
transformers decoder-layer class, loaded from the checkpoint, processed (e.g. quantized), run to
produce the next layer's inputs, and freed. Methods that reuse it (GPTQ, SpQR, AQLM, EvoPress) do so
through `LayerStream` and `HessianCollector`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from lctool.errors import LctoolError
from lctool.io import Checkpoint

# True-sequential stages within a decoder layer: each stage sees inputs produced by the already
# quantized stages before it.
SEQUENTIAL_STAGES = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


def hf_config_for(checkpoint: Checkpoint):
    """A transformers config for the checkpoint's architecture, without any quantization settings."""
    from transformers import AutoConfig

    config = {k: v for k, v in checkpoint.config.items() if k != "quantization_config"}
    model_type = config.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **config)
    hf_config._attn_implementation = "sdpa"
    return hf_config


def skeleton(hf_config, arch):
    """The family's stock causal-LM class instantiated on the meta device (no memory)."""
    import transformers

    model_class = getattr(transformers, arch.family.causal_lm_class)
    with torch.device("meta"):
        return model_class(hf_config)


class _StageDone(Exception):
    """Raised by a hook once every module of the current stage has seen its input (skips the rest)."""


class HessianCollector:
    """H = 2/n Σ x xᵀ of the inputs of some Linear modules, collected with forward pre-hooks.

    With `stop_after_all=True` the forward is cut short as soon as every module has been called for
    the current batch, so collecting a stage costs only the part of the layer up to it.
    """

    def __init__(self, modules: dict[str, nn.Linear], stop_after_all: bool = True):
        self.modules = modules
        self.sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=m.weight.device)
                     for name, m in modules.items()}
        self.rows = dict.fromkeys(modules, 0)
        self.stop_after_all = stop_after_all
        self._seen: set[str] = set()
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            self.sums[name].addmm_(x.T, x)
            self.rows[name] += x.shape[0]
            self._seen.add(name)
            if self.stop_after_all and len(self._seen) == len(self.modules):
                raise _StageDone

        return hook

    def new_batch(self) -> None:
        self._seen.clear()

    def hessians(self) -> dict[str, torch.Tensor]:
        return {name: 2 * self.sums[name] / max(self.rows[name], 1) for name in self.modules}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class LayerStream:
    """Calibration activations flowing through a checkpoint's decoder layers, one layer at a time.

    The layers run on `device` with their weights and activations in `dtype` (the `--device` /
    `--dtype` of the command); Hessians are accumulated in float32 whatever `dtype` is.
    """

    def __init__(self, checkpoint: Checkpoint, input_ids: torch.Tensor, batch_size: int = 8, *,
                 device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.dtype = dtype
        self.arch = checkpoint.arch
        self.hf_config = hf_config_for(checkpoint)
        self.batch_size = max(1, batch_size)
        model = skeleton(self.hf_config, self.arch)
        self.layer_class = type(model.get_submodule(self.arch.family.layers)[0])
        rotary_class = type(model.get_submodule(self.arch.family.rotary))
        del model
        self.rotary = rotary_class(config=self.hf_config)
        seq_len = input_ids.shape[1]
        self.rotary.to(self.device)
        self.position_ids = torch.arange(seq_len, device=self.device).unsqueeze(0)
        self.hidden = self._embed(input_ids)
        self.position_embeddings = self.rotary(self.hidden[:1], position_ids=self.position_ids)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = self.checkpoint.get(self.arch.weight("embed"), dtype=torch.float32)
        if int(input_ids.max()) >= table.shape[0]:
            raise LctoolError("calibration token ids exceed the model's vocabulary (tokenizer/model mismatch)")
        hidden = nn.functional.embedding(input_ids, table)
        if self.arch.family.embed_scaled:
            hidden = hidden * math.sqrt(self.arch.hidden_size)
        return hidden.to(self.device, self.dtype)

    @property
    def num_layers(self) -> int:
        return self.arch.num_layers

    def load_layer(self, index: int, tensors: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """The stock decoder layer `index` on the stream's device and in its dtype, holding the checkpoint's
        weights (or `tensors`)."""
        with torch.device("meta"):
            layer = self.layer_class(self.hf_config, layer_idx=index)
        layer = layer.to_empty(device=self.device).to(self.dtype)
        prefix = self.arch.layer_prefix(index) + "."
        tensors = tensors if tensors is not None else self.checkpoint.layer_tensors(index)
        state = {name[len(prefix):]: t.to(self.dtype) if t.is_floating_point() else t for name, t in tensors.items()}
        missing, unexpected = layer.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise LctoolError(f"layer {index}: tensors do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
        for buffer_name, buffer in layer.named_buffers():
            if buffer.is_meta:
                raise LctoolError(f"layer {index}: buffer {buffer_name} has no value")
        return layer.eval()

    def linear(self, layer: nn.Module, role: str) -> nn.Linear:
        path = self.arch.family.layer_modules[role]
        return layer.get_submodule(path)

    def batches(self) -> Iterable[torch.Tensor]:
        for start in range(0, self.hidden.shape[0], self.batch_size):
            yield self.hidden[start : start + self.batch_size]

    @torch.no_grad()
    def run(self, layer: nn.Module, collector: HessianCollector | None = None) -> torch.Tensor | None:
        """Run every calibration batch through `layer`: its outputs, or None when a collector cuts it short."""
        outputs = [] if collector is None or not collector.stop_after_all else None
        for batch in self.batches():
            if collector is not None:
                collector.new_batch()
            try:
                out = layer(batch, position_ids=self.position_ids, position_embeddings=self.position_embeddings)
            except _StageDone:
                continue
            out = out[0] if isinstance(out, tuple) else out
            if outputs is not None:
                outputs.append(out)
        return torch.cat(outputs) if outputs is not None else None

    def collect_hessians(self, layer: nn.Module, roles: tuple[str, ...]) -> dict[str, torch.Tensor]:
        collector = HessianCollector({role: self.linear(layer, role) for role in roles})
        try:
            self.run(layer, collector)
        finally:
            collector.close()
        return collector.hessians()

    def advance(self, layer: nn.Module) -> None:
        """Replace the activations by `layer`'s outputs: the next layer's inputs."""
        self.hidden = self.run(layer)
