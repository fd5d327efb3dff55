import os
import sys

# Triton's interpreter must be chosen before triton is imported anywhere (kernel parity tests on CPU).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def tiny_dir(tmp_path):
    from tests.tiny_models import save_tiny

    return save_tiny(str(tmp_path / "tiny"))


@pytest.fixture
def run_cli():
    """Run the CLI in-process; returns (exit_code, stdout, stderr)."""
    import contextlib
    import io

    from lctool.cli.main import run

    def _run(*args):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run([str(a) for a in args])
        return code, out.getvalue(), err.getvalue()

    return _run


@pytest.fixture(scope="session")
def testbed_dir():
    """The quick testbed model (built once per machine and cached; minutes the first time)."""
    from lctool.ops.testbed import testbed_path

    return testbed_path(preset="quick", build=True)


@pytest.fixture(autouse=True)
def _autograd_left_on():
    """A test (or the code it runs) that leaves autograd off would break every later test in the worker."""
    yield
    leaked = not torch.is_grad_enabled() or torch.is_inference_mode_enabled()
    torch.set_grad_enabled(True)
    assert not leaked, "autograd was left disabled (a generator yielding inside no_grad/inference_mode?)"


def free_port() -> int:
    """A TCP port nobody listens on now (for torchrun rendezvous in multi-process tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
