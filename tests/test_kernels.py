"""Triton SpQR kernel vs its pure-PyTorch reference (CPU under TRITON_INTERPRET=1, compiled on CUDA)."""

import pytest
import torch

from lctool.kernels.spqr import spqr_matmul, spqr_matmul_reference, spqr_matmul_triton
from lctool.quant.formats import spqr_hf_tensors
from lctool.quant.spqr import SpqrSettings, spqr_quantize

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def packed_layer(out_features, in_features, outlier_fraction=0.03, threshold=0.2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(256, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    weight[torch.rand(out_features, in_features, generator=generator) < outlier_fraction] *= 12
    result = spqr_quantize(weight, 2 * inputs.T @ inputs / 256, SpqrSettings(bits=3, outlier_threshold=threshold))
    return result, spqr_hf_tensors(result, out_features, in_features)


def run_both(tensors, x, out_features, in_features):
    args = [tensors[k].to(DEVICE) for k in ("dense_weights", "row_offsets", "col_vals")]
    expected = spqr_matmul_reference(x.to(DEVICE), *args, out_features, in_features)
    actual = spqr_matmul_triton(x.to(DEVICE), *args, out_features, in_features)
    return expected.cpu(), actual.cpu()


@pytest.mark.parametrize(
    "out_features,in_features,batch",
    [(32, 32, 1), (48, 64, 4), (40, 50, 3), (17, 33, 2), (16, 16, 16)],
    ids=["square-b1", "multi-tile-b4", "ragged-both", "ragged-one-past-tile", "single-tile-b16"],
)
def test_triton_matches_reference(out_features, in_features, batch):
    result, tensors = packed_layer(out_features, in_features)
    x = torch.randn(batch, in_features, generator=torch.Generator().manual_seed(1))
    expected, actual = run_both(tensors, x, out_features, in_features)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # and the reference is the weight the quantizer's error feedback assumed
    torch.testing.assert_close(expected, x @ result.w_hat.T, rtol=1e-5, atol=1e-5)


def test_odd_outlier_counts_and_rows_without_outliers():
    result, tensors = packed_layer(32, 48, outlier_fraction=0.0, threshold=float("inf"))
    assert tensors["col_vals"].numel() == 0
    x = torch.randn(2, 48)
    expected, actual = run_both(tensors, x, 32, 48)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    result, tensors = packed_layer(32, 48, outlier_fraction=0.05, threshold=0.05, seed=3)
    counts = tensors["row_offsets"].diff()
    assert result.outlier_count % 2 == 1 or (counts % 2 == 1).any()  # uneven rows exercise the masked tail
    assert (counts == 0).any() or counts.max() > counts.min()
    expected, actual = run_both(tensors, torch.randn(3, 48), 32, 48)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_dispatcher_chunks_large_batches():
    _, tensors = packed_layer(16, 32)
    x = torch.randn(20, 32)
    args = [tensors[k] for k in ("dense_weights", "row_offsets", "col_vals")]
    torch.testing.assert_close(spqr_matmul(x, *args, 16, 32), spqr_matmul_reference(x, *args, 16, 32), rtol=1e-5, atol=1e-5)
