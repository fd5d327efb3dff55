"""Turning batches of windows into final hidden states, then into logits for chosen rows only.

A runner splits a causal LM into `hidden_batches` (everything up to and including the final norm)
and `logits` (the output head). Scoring then computes logits only for the positions it scores, a
bounded number of rows at a time, instead of the full [batch, ctx, vocab] tensor.

- `InMemoryRunner` wraps a loaded model (any `AutoModelForCausalLM`, quantized ones included).
- `LayerwiseRunner` never holds more than one decoder layer: it builds the model skeleton on the
  meta device, runs every window through the embedding, then through layer 0 (read from the
  checkpoint, run, freed), layer 1, ..., keeping the hidden states of all windows in memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lctool.errors import LctoolError, check
from lctool.eval.progress import Tracker
from lctool.eval.windows import WindowBatch


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class InMemoryRunner:
    """A loaded causal LM, split at its output head when it has the usual decoder + head shape."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = model_device(model)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.vocab_size = int(config.vocab_size)
        self.decoder = _decoder_of(model)
        self.head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        # Logit soft-capping (and anything else done after the head) only the full forward knows.
        self.split = (
            self.decoder is not None
            and self.head is not None
            and not getattr(config, "final_logit_softcapping", None)
        )

    def hidden_batches(self, batches: list[WindowBatch], tracker: Tracker) -> Iterator[torch.Tensor]:
        for batch in batches:
            ids = batch.input_ids.to(self.device)
            with torch.inference_mode():
                if self.split:
                    out = self.decoder(input_ids=ids, use_cache=False).last_hidden_state
                else:
                    out = self.model(input_ids=ids, use_cache=False).logits
            tracker.advance(ids.numel())
            yield out

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.head(rows) if self.split else rows


def _decoder_of(model: torch.nn.Module):
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    return decoder if decoder is not None and decoder is not model else None


class _LayerInputs(Exception):
    """Raised by the last stand-in layer: the forward has shown every layer its inputs."""


class _StandIn(torch.nn.Module):
    """Takes a decoder layer's place for one forward: records what the layer would receive."""

    def __init__(self, layer: torch.nn.Module, record: list, last: bool):
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", None)
        self.record = record
        self.last = last

    def forward(self, hidden_states, *args, **kwargs):
        check(not args, "unexpected positional arguments to a decoder layer")
        self.record.append((hidden_states, kwargs))
        if self.last:
            raise _LayerInputs
        return hidden_states


class LayerwiseRunner:
    """Streamed evaluation of a plain checkpoint of a supported family, one decoder layer in memory."""

    def __init__(self, path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from lctool.io import Checkpoint

        self.checkpoint = Checkpoint(path)
        check(
            not self.checkpoint.is_quantized,
            "layer-by-layer evaluation reads plain (unquantized) checkpoints only; load quantized ones in memory",
        )
        check(
            not self.checkpoint.config.get("auto_map"),
            "layer-by-layer evaluation builds stock layers and cannot run a checkpoint's own model code (auto_map); "
            "evaluate it in memory with --trust-remote-code",
        )
        self.arch = self.checkpoint.arch
        self.dtype = dtype
        self.device = torch.device(device)
        self.vocab_size = self.arch.vocab_size
        config = AutoConfig.from_pretrained(path)
        # Buffers (RoPE frequencies, Gemma's embedding scale) stay real; parameters go to meta.
        with init_empty_weights(include_buffers=False):
            self.skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.skeleton.eval()
        self.head = None

    # ---- loading one module at a time ----------------------------------------------------------
    def _load(self, module_path: str, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
        module = self.skeleton.get_submodule(module_path)
        prefix = module_path + "."
        local = {
            name[len(prefix) :]: t.to(self.dtype) if t.is_floating_point() else t
            for name, t in tensors.items()
        }
        module.load_state_dict(local, strict=False, assign=True)
        module.to(self.device)
        missing = [n for n, p in module.named_parameters() if p.is_meta]
        if missing:
            raise LctoolError(f"{self.checkpoint.path}: no tensor for {prefix}{missing[0]}")
        return module

    def _unload(self, module: torch.nn.Module) -> None:
        module.to("meta")

    def _weights_under(self, role: str) -> dict[str, torch.Tensor]:
        name = self.arch.weight(role)
        source = name
        if role == "lm_head" and self.arch.tied:
            source = self.arch.weight("embed")
        return {name: self.checkpoint.get(source)}

    # ---- the streamed forward --------------------------------------------------------------------
    def hidden_batches(self, batches: list[WindowBatch], tracker: Tracker) -> Iterator[torch.Tensor]:
        layers = self.skeleton.get_submodule(self.arch.family.layers)
        embed = self._load(self.arch.module("embed"), self._weights_under("embed"))
        layer_kwargs: dict[tuple, list[dict]] = {}
        hidden: list[torch.Tensor] = []
        tracker.start("embedding", sum(b.input_ids.numel() for b in batches))
        for batch in batches:
            first_input, kwargs = self._layer_inputs(layers, batch.input_ids.to(self.device))
            layer_kwargs.setdefault(tuple(batch.input_ids.shape), kwargs)
            hidden.append(first_input.to("cpu"))
            tracker.advance(batch.input_ids.numel())
        self._unload(embed)
        for index in range(self.arch.num_layers):
            tracker.start(
                f"layer {index + 1}/{self.arch.num_layers}", sum(h.shape[0] * h.shape[1] for h in hidden)
            )
            layer = self._load(self.arch.layer_prefix(index), self.checkpoint.layer_tensors(index))
            for b, states in enumerate(hidden):
                kwargs = layer_kwargs[tuple(states.shape[:2])][index]
                with torch.inference_mode():
                    out = layer(states.to(self.device), **kwargs)
                hidden[b] = (out[0] if isinstance(out, tuple) else out).to("cpu")
                tracker.advance(states.shape[0] * states.shape[1])
            self._unload(layer)
        norm = self._load(self.arch.module("final_norm"), self._weights_under("final_norm"))
        self.head = self._load(self.arch.module("lm_head"), self._weights_under("lm_head"))
        tracker.start("scoring", sum(h.shape[0] * h.shape[1] for h in hidden))
        try:
            for states in hidden:
                # Never yield inside the context: an abandoned generator would leave inference mode on
                # for the whole process.
                with torch.inference_mode():
                    normed = norm(states.to(self.device))
                yield normed
                tracker.advance(states.shape[0] * states.shape[1])
        finally:
            self._unload(norm)
            self._unload(self.head)
            self.head = None

    def _layer_inputs(
        self, layers: torch.nn.ModuleList, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, list[dict]]:
        """Run the model's own forward up to the first layer: its input and every layer's kwargs."""
        record: list = []
        originals = list(layers)
        for i, layer in enumerate(originals):
            layers[i] = _StandIn(layer, record, last=i == len(originals) - 1)
        try:
            with torch.inference_mode():
                self.skeleton.get_decoder()(input_ids=input_ids, use_cache=False)
        except _LayerInputs:
            pass
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
        check(len(record) == len(originals), "the model's forward did not reach every decoder layer")
        return record[0][0], [kwargs for _, kwargs in record]

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.head(rows)


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def fits_in_memory(path: str, dtype: torch.dtype, headroom: float = 0.7) -> bool:
    """Whether the weights, at `dtype`, take less than `headroom` of the memory now available."""
    from lctool.io import Checkpoint

    checkpoint = Checkpoint(path, check_shapes=False)
    available = available_memory_bytes()
    if available is None or checkpoint.is_quantized:
        return True
    element = torch.empty(0, dtype=dtype).element_size()
    return checkpoint.num_parameters() * element < headroom * available
