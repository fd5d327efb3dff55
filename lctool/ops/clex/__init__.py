"""CLEX: RoPE scaling as a learned neural ODE over the length scale (Chen et al., ICLR 2024).

`modeling_clex.py` is both lctool's implementation and the file shipped in every CLEX checkpoint
(loaded through `auto_map` with trust_remote_code enabled by the user); it imports only torch and transformers.
"""

from lctool.ops.clex.modeling_clex import (
    ClexDynamics,
    ClexRotaryEmbedding,
    install_clex_rotary,
    rk4_deviation,
)

__all__ = ["ClexDynamics", "ClexRotaryEmbedding", "install_clex_rotary", "rk4_deviation"]
