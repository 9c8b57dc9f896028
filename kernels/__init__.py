"""Triton kernels for the CUDA hot path, installed as ``minsdxl.kernels``.

Only ``minsdxl.attention`` imports this package, lazily, so ``import minsdxl`` never needs triton.
"""

if __name__ != "minsdxl.kernels":
    # PyPI has an unrelated top-level `kernels` package: never pose as it (e.g. when the repo root is on sys.path)
    raise ImportError("this folder is minsdxl.kernels, not the `kernels` package; install minsdxl to use it")

from minsdxl.kernels.flash_attn import flash_attention  # noqa: E402

__all__ = ["flash_attention"]
