"""Stock loading of lctool's GPTQ artifacts: transformers + optimum + GPTQModel (torch backend, CPU).

GPTQModel pins numpy/torchao versions lctool does not want, so it lives in a side environment made
by `bash bench/setup_gptq_env.sh` (.venv-gptq, or $GPTQ_VENV). Without it these tests skip, saying so.
"""

import os
import subprocess

import pytest
import torch

from lctool.quant import QuantizeOptions, load_reference, quantize
from tests.tiny_models import save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPTQ_PYTHON = os.path.join(os.environ.get("GPTQ_VENV", os.path.join(ROOT, ".venv-gptq")), "bin", "python")

CHILD = """
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu", dtype=torch.float16).eval()
ids = torch.arange(64).reshape(2, 32) * 3 % 256
with torch.no_grad():
    logits = model(ids).logits.float()
save_file({"logits": logits.contiguous()}, sys.argv[2])
print(type(model.get_submodule(sys.argv[3])).__module__)
"""

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(os.path.dirname(GPTQ_PYTHON), "..", ".installed")),
    reason="GPTQModel side environment absent: run `bash bench/setup_gptq_env.sh` to enable the stock-load test",
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        dict(method="gptq", group_size=32, act_order=True),
        dict(method="gptq", bits=3, group_size=32, sym=False),
    ],
    ids=["gptq4-actorder", "gptq3-asym"],
)
def test_stock_transformers_loads_gptq_artifact(tmp_path, options):
    from safetensors.torch import load_file

    calib = tmp_path / "calib.txt"
    calib.write_text("Stock loaders must agree with lctool's reference reading. " * 200)
    source = save_tiny(str(tmp_path / "m"))
    extra = dict(calib=str(calib), calib_n=4, calib_len=32) if options["method"] == "gptq" else {}
    quantize(source, str(tmp_path / "q"), QuantizeOptions(**options, **extra))
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "PYTHONPATH": ""}
    env.pop("TRITON_INTERPRET", None)
    module = "model.layers.0.self_attn.q_proj"
    done = subprocess.run([GPTQ_PYTHON, "-c", CHILD, str(tmp_path / "q"), str(tmp_path / "logits.safetensors"), module],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gptqmodel" in done.stdout  # the stock path really replaced the Linear with GPTQModel's kernel
    stock = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    ids = torch.arange(64).reshape(2, 32) * 3 % 256
    with torch.no_grad():
        reference = load_reference(str(tmp_path / "q"))(ids).logits
    # GPTQModel computes in fp16; lctool's reference in fp32.
    torch.testing.assert_close(stock, reference, rtol=0, atol=0.02 * reference.abs().max().item())


def test_side_environment_has_the_pinned_torch():
    done = subprocess.run([GPTQ_PYTHON, "-c", "import torch, gptqmodel; print(torch.__version__, gptqmodel.__version__)"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1000:]
    torch_version, gptqmodel_version = done.stdout.strip().splitlines()[-1].split()  # gptqmodel prints a banner first
    assert torch_version == torch.__version__ and gptqmodel_version == "7.6.0"
