"""The one attention seam. Every attention layer in minsdxl calls `attention(q, k, v)` here.

Backends: "sdpa" (torch's scaled_dot_product_attention, the default and what diffusers'
AttnProcessor2_0 calls), "math" (explicit softmax(q k^T / sqrt(d)) v in fp32, for debugging), and
"triton" (minsdxl.kernels, imported lazily on first use). Select with `set_backend()` or the
MINSDXL_ATTENTION environment variable. "triton" falls back to SDPA outside the kernel's envelope
(CPU without TRITON_INTERPRET=1, head size > 128, masks, autograd).
"""

import os

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "math", "triton")
_backend = os.environ.get("MINSDXL_ATTENTION", "sdpa")


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


# Below this many keys SDPA's flash backend wins: on an H200 (docs/performance.md) our kernel did
# 4096x4096 self-attention at 374-384 TFLOP/s vs SDPA's 277-282, but took ~0.1 ms (launch and
# dispatch overhead) where SDPA needs 0.02-0.05 ms for 1024 tokens or 77 cross-attention keys.
TRITON_MIN_KEYS = 2048


def _triton_fits(q, k) -> bool:
    """The kernel's envelope (and where it pays); anything else (e.g. the VAE's single 512-wide head,
    cross-attention's 77 keys) takes SDPA."""
    on_device = q.is_cuda or (q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return (
        on_device
        and (k.shape[-2] >= TRITON_MIN_KEYS or not q.is_cuda)
        and q.shape[-1] <= 128
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))  # the op has no backward
        and q.shape[0] * q.shape[1] <= 65535  # CUDA grid limit on batch x heads
    )


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask=None) -> torch.Tensor:
    """q: [B, Lq, heads*d], k/v: [B, Lk, heads*d] -> [B, Lq, heads*d]. `mask` is an additive
    [Lq, Lk] (or broadcastable) float mask, used by the causal CLIP text encoders."""
    b, lq, c = q.shape
    d = c // heads
    # [B, L, H*D] -> [B, H, L, D]: a view, no copy (= diffusers' view(...).transpose(1, 2))
    q, k, v = (x.view(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))
    if _backend == "triton" and mask is None and _triton_fits(q, k):
        from minsdxl.kernels import flash_attention

        o = flash_attention(q, k, v)
    elif _backend == "math":
        s = (q.float() @ k.float().transpose(-1, -2)) * d**-0.5
        if mask is not None:
            s = s + mask
        o = (s.softmax(-1) @ v.float()).to(q.dtype)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return o.transpose(1, 2).reshape(b, lq, c)
