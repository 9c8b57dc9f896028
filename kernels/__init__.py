"""Triton kernels for the CUDA hot path, installed as ``minsdxl.kernels``.

Only ``minsdxl.attention`` imports this package, lazily, so ``import minsdxl`` never needs triton.
"""

from minsdxl.kernels.flash_attn import flash_attention

__all__ = ["flash_attention"]
