"""The one attention seam. Every attention layer in minsdxl calls `attention(q, k, v)` here.

Backends: "sdpa" (torch's scaled_dot_product_attention, the default and what diffusers'
AttnProcessor2_0 calls), "math" (explicit softmax(q k^T / sqrt(d)) v in fp32, for debugging), and
"triton" (minsdxl.kernels, imported lazily on first use). Per model: minsdxl.load(..., attention=...)
(or minsdxl.set_attention(name, model)) sets each attention layer's `attention_backend`; process
default: `set_backend()` or the MINSDXL_ATTENTION environment variable. "triton" falls back to SDPA
outside the kernel's envelope (CPU without TRITON_INTERPRET=1, head size > 128, masks, autograd).
"""

import os

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "math", "triton")


def check_backend(name: str, what: str = "unknown attention backend") -> None:
    """The one check of a backend name (set_backend, set_attention, load(attention=...), MINSDXL_ATTENTION)."""
    if name not in BACKENDS:
        raise ValueError(f"{what} {name!r}; choose one of {', '.join(BACKENDS)}")


_backend = os.environ.get("MINSDXL_ATTENTION") or "sdpa"
check_backend(_backend, "the environment variable MINSDXL_ATTENTION is")


def set_backend(name: str) -> None:
    global _backend
    check_backend(name)
    _backend = name


def get_backend() -> str:
    return _backend


def _triton_fits(q, k) -> bool:
    """The kernel's envelope; anything else (e.g. the VAE's single 512-wide head) takes SDPA.
    In GPU time the kernel beats SDPA's flash backend at every SDXL shape (H100, H200); against cuDNN's
    (torch's default on Hopper) it wins with 77 keys, ties at 1024 and loses at 4096 (docs/performance.md).
    Each call costs ~0.1 ms to launch: it pays under CUDA graphs (minsdxl.compile's default on CUDA);
    called eagerly on short sequences it is slower than SDPA (no length check here: "triton"
    means the kernel wherever it fits)."""
    on_device = q.is_cuda or (q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return (
        on_device
        and q.shape[-1] <= 128
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))  # the op has no backward
        and q.shape[0] * q.shape[1] <= 65535  # CUDA grid limit on batch x heads
    )


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask=None, backend: str | None = None
) -> torch.Tensor:
    """q: [B, Lq, heads*d], k/v: [B, Lk, heads*d] -> [B, Lq, heads*d]. `mask` is an additive
    [Lq, Lk] (or broadcastable) float mask, used by the causal CLIP text encoders. `backend`: this
    layer's choice (a model loaded with attention=...), None = the process default."""
    backend = backend or _backend
    b, lq, c = q.shape
    d = c // heads
    # [B, L, H*D] -> [B, H, L, D]: a view, no copy (= diffusers' view(...).transpose(1, 2))
    q, k, v = (x.view(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))
    if backend == "triton" and mask is None and _triton_fits(q, k):
        from minsdxl.kernels import flash_attention

        o = flash_attention(q, k, v)
    elif backend == "math":
        s = (q.float() @ k.float().transpose(-1, -2)) * d**-0.5
        if mask is not None:
            s = s + mask
        o = (s.softmax(-1) @ v.float()).to(q.dtype)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return o.transpose(1, 2).reshape(b, lq, c)
