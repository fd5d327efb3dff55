"""Property-based corruption of safetensors files: every case opens correctly or fails with one
LctoolError — never another exception, never a hang. At least 500 cases per strategy (more under
LCTOOL_SOAK=1)."""

import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lctool.errors import LctoolError
from lctool.io import Checkpoint

CASES = 2500 if os.environ.get("LCTOOL_SOAK") else 500
FUZZ = settings(max_examples=CASES, deadline=2000, suppress_health_check=list(HealthCheck), derandomize=True)

CONFIG = {"model_type": "llama", "hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1,
          "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 6, "tie_word_embeddings": True}


def _valid_tensors():
    from lctool.arch import ModelArch

    torch.manual_seed(0)
    return {n: torch.randn(s) for n, s in ModelArch(CONFIG).expected_shapes().items()}


@pytest.fixture(scope="module")
def valid_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("valid") / "model.safetensors"
    save_file(_valid_tensors(), str(path))
    return path.read_bytes()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz")
    (path / "config.json").write_text(json.dumps(CONFIG))
    return path


def _open_and_read(folder, blob):
    (folder / "model.safetensors").write_bytes(blob)
    try:
        checkpoint = Checkpoint(str(folder))
        for name in checkpoint.tensor_names():
            checkpoint.get(name)
    except LctoolError as e:
        assert "\n" not in str(e)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F99", "", "f32"]) | json_values,
        "shape": st.lists(st.integers(-3, 2**40), max_size=4) | json_values,
        "data_offsets": st.lists(st.integers(-10, 2**40), min_size=0, max_size=3) | json_values,
    },
)
headers = st.dictionaries(st.text(max_size=12), entry | json_values, max_size=5) | json_values


@FUZZ
@given(header=headers, data=st.binary(max_size=64), length_delta=st.integers(-4, 4) | st.just(0))
def test_generated_headers(folder, header, data, length_delta):
    raw = json.dumps(header, allow_nan=True).encode()
    blob = struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + data
    _open_and_read(folder, blob)


@FUZZ
@given(st.data())
def test_mutated_valid_file(folder, valid_bytes, data):
    blob = bytearray(valid_bytes)
    for _ in range(data.draw(st.integers(1, 6))):
        position = data.draw(st.integers(0, len(blob) - 1))
        blob[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    if data.draw(st.booleans()):
        blob = blob[:cut]
    _open_and_read(folder, bytes(blob))


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes(folder, blob):
    _open_and_read(folder, blob)
