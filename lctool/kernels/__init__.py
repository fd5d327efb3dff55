"""Matmul kernels for the packed formats lctool writes that stock loaders do not cover.

Each kernel sits beside the pure-PyTorch reference that defines its meaning:
    spqr.spqr_matmul_reference  / spqr.spqr_matmul_triton   (HF `spqr` layout: 3-bit 16x16 tiles + CSR outliers)
lctool's GPTQ packing is GPTQModel's own (formats.py), so GPTQ needs no kernel of ours.
The Triton kernels run on CUDA, and on CPU under TRITON_INTERPRET=1 (how CI checks parity).
"""
