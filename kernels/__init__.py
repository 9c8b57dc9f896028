"""Triton kernels for the CUDA hot path, installed as ``minsdxl.kernels``.

Only ``minsdxl.attention`` and ``minsdxl.unet`` (GEGLU) import this package, lazily, so ``import minsdxl``
never needs triton.
"""

# PyPI has an unrelated top-level `kernels` package. When this folder is reached as `kernels` (the repo
# root on sys.path), stay an empty module rather than pose as it; installed, it is `minsdxl.kernels`.
if __name__ == "minsdxl.kernels":
    from minsdxl.kernels.flash_attn import flash_attention
    from minsdxl.kernels.geglu_gemm import geglu

    __all__ = ["flash_attention", "geglu"]
