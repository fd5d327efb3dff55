"""Mixed-bit EvoPress GPTQ output in GPTQModel (side environment): its `dynamic` per-module bits load
with GPTQModel's own loader and compute what lctool's reference reader computes; transformers' stock
GPTQ path (one `bits` for every module) refuses the file rather than misreading it.
"""

import json
import os
import subprocess
from fractions import Fraction

import pytest
import torch

from lctool.io import Checkpoint, CheckpointWriter
from lctool.prune.evopress import output
from lctool.prune.evopress.database import open_database
from lctool.quant import load_reference
from tests.test_quant_interop import GPTQ_PYTHON
from tests.tiny_models import save_tiny

CHILD = """
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
ids = torch.arange(64).reshape(2, 32) * 3 % 256
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu", dtype=torch.float16)
    print("transformers: loaded")
except Exception as e:
    print("transformers: refused", type(e).__name__)
from gptqmodel import GPTQModel
model = GPTQModel.load(sys.argv[1], device="cpu", backend="torch")
with torch.no_grad():
    logits = model.model(ids).logits.float()
save_file({"logits": logits.contiguous()}, sys.argv[2])
print("bits", getattr(model.model.get_submodule(sys.argv[3]), "bits", None))
"""

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(os.path.dirname(GPTQ_PYTHON), "..", ".installed")),
    reason="GPTQModel side environment absent: run `bash bench/setup_gptq_env.sh` to enable the stock-load test",
)


@pytest.mark.slow
def test_gptqmodel_loads_per_module_bits(tmp_path, run_cli):
    from safetensors.torch import load_file

    calib = tmp_path / "calib.txt"
    calib.write_text("Mixed bitwidths must load where the format is read per module. " * 200)
    source = save_tiny(str(tmp_path / "m"))
    uniform = tmp_path / "q3"
    code, stdout, err = run_cli("--quiet", "quantize", source, uniform, "--search", "evopress", "--bits-choices",
                                "2,3,4", "--target-bits", "3", "--group-size", "32", "--generations", "0",
                                "--calib", calib, "--calib-n", "8", "--calib-len", "32", "--selection-tokens", "64,256",
                                "--survivors", "2,1", "--database", tmp_path / "db", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    # From the same database, a mix GPTQModel must read per module: 2 and 4 bits alternating.
    checkpoint = Checkpoint(source)
    database = open_database(summary["database"], json.loads((tmp_path / "db" / "database.json").read_text()),
                             checkpoint, [Fraction(b) for b in (2, 3, 4)])
    bits = {m: (2, 4)[i % 2] for i, m in enumerate(summary["modules"])}
    out = tmp_path / "q"
    with CheckpointWriter(str(out), operation="quantize", inputs=[checkpoint]) as writer:
        written = output.write_mixed_gptq(checkpoint, writer, database, bits, {
            "group_size": 32, "sym": True, "act_order": False, "damp": 0.01})
    assert written["modules_at_other_bits"] == len(bits) // 2
    module = next(m for m, b in bits.items() if b != written["base_bits"])
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "PYTHONPATH": ""}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([GPTQ_PYTHON, "-c", CHILD, str(out), str(tmp_path / "logits.safetensors"), module],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "transformers: refused" in done.stdout
    assert f"bits {bits[module]}" in done.stdout  # the per-module override took effect
    stock = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    ids = torch.arange(64).reshape(2, 32) * 3 % 256
    with torch.no_grad():
        reference = load_reference(str(out))(ids).logits
    torch.testing.assert_close(stock, reference, rtol=0, atol=0.02 * reference.abs().max().item())
