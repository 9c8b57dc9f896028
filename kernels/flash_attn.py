"""Flash-attention forward in Triton for the UNet's attention: softmax(q k^T / sqrt(d)) v, non-causal.

One program computes BLOCK_M query rows of one (batch, head) and streams the keys in blocks of BLOCK_N
with the online softmax (running max m, running sum l, rescaled accumulator), so the [Lq, Lk] score
matrix never reaches memory. Follows Dao et al., "FlashAttention" (2022) and the Triton tutorial
06-fused-attention; written for minsdxl's layout:

- q, k, v come as [B, H, L, D] views of [B, L, H*D] projections, non-contiguous: we pass strides and
  never copy. The output is allocated as [B, Lq, H, D] and returned as its [B, H, Lq, D] view, so
  `attention()`'s transpose(1, 2).reshape(...) back to [B, Lq, H*D] is free.
- any Lq / Lk (cross-attention has 77 keys): loads past the end are masked, never padded in memory.
- head dims that are not a power of 2 (40, 80) are padded to one in registers, with masked loads.
- fp16 / bf16 (and fp32, for the CPU interpreter tests) with fp32 accumulation; exp2 with the
  softmax scale folded into log2(e).

Registered as the custom op torch.ops.minsdxl.flash_attention with a fake impl, so torch.compile
(fullgraph=True) traces through it without a graph break. With TRITON_INTERPRET=1 set before triton is
first imported, the kernel runs in Triton's interpreter on CPU tensors (slow: tests only).
"""

import torch
import triton
import triton.language as tl

# @triton.jit picks the interpreter when this module is imported; remember what it picked.
_INTERPRET = bool(triton.knobs.runtime.interpret)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634

# A short list for Hopper (H100), in the spirit of the Triton tutorial's; the autotuner times each
# config once per (Lq, Lk, head dim, dtype) in the process and keeps nothing on disk. Compiled for
# sm_90, all use wgmma; (128, 64, 4 warps) spills registers at head dims > 64, so tuning skips it there.
_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (128, 64, 4, 3),
        (128, 64, 8, 3),
        (128, 128, 8, 3),
        (128, 32, 4, 4),
        (64, 64, 4, 3),
        (64, 32, 4, 4),
    ]
]
# The interpreter runs the programs one after another, each costing tens of ms of Python overhead
# whatever its size: huge query blocks mean few programs and fast tests.
_INTERPRET_BLOCKS = {"BLOCK_M": 1024, "BLOCK_N": 256}


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    # Masks only where a tile can run past the end; unmasked loads vectorize best.
    if MASK_ROWS and MASK_COLS:
        x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif MASK_ROWS:
        x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif MASK_COLS:
        x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _attn_block(
    acc, m_i, l_i, q, k_ptrs, v_ptrs, offs_n, Lk, offs_d, qk_scale,
    HEAD_DIM: tl.constexpr, MASK_N: tl.constexpr, PAD_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One BLOCK_N slice of keys: fold softmax(q k^T) v for it into (acc, m_i, l_i)."""
    k = _load_tile(k_ptrs, offs_n, Lk, offs_d, HEAD_DIM, MASK_N, PAD_D)  # [BLOCK_N, D_PAD]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
    if MASK_N:
        s = tl.where(offs_n[None, :] < Lk, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)  # rescales what was summed under the old max
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(v_ptrs, offs_n, Lk, offs_d, HEAD_DIM, MASK_N, PAD_D)  # [BLOCK_N, D_PAD]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd(
    Q, K, V, O,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, Lq, Lk, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # grid: (query blocks, B * H); query blocks vary fastest, so programs running together share K/V in L2
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: batch offsets of large tensors overflow int32
    h = (pid_bh % H).to(tl.int64)
    PAD_D: tl.constexpr = HEAD_DIM != D_PAD
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    q = _load_tile(q_ptrs, offs_m, Lq, offs_d, HEAD_DIM, True, PAD_D)  # [BLOCK_M, D_PAD]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)  # running sum of exp2(score - m_i) * v
    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):  # whole key blocks: no masks on the hot loop
        acc, m_i, l_i = _attn_block(
            acc, m_i, l_i, q, k_ptrs + start_n * stride_kn, v_ptrs + start_n * stride_vn, start_n + offs_n,
            Lk, offs_d, qk_scale, HEAD_DIM, False, PAD_D, DOT_PRECISION,
        )  # fmt: skip
    if n_full < Lk:  # the ragged last block (all of it for 77 text tokens), masked
        acc, m_i, l_i = _attn_block(
            acc, m_i, l_i, q, k_ptrs + n_full * stride_kn, v_ptrs + n_full * stride_vn, n_full + offs_n,
            Lk, offs_d, qk_scale, HEAD_DIM, True, PAD_D, DOT_PRECISION,
        )  # fmt: skip

    o = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    if PAD_D:
        mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM)
    else:
        mask = offs_m[:, None] < Lq
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=mask)


_attn_fwd_tuned = triton.autotune(configs=_CONFIGS, key=["Lq", "Lk", "HEAD_DIM"])(_attn_fwd)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be a 4-d [B, H, L, D] tensor, got {_describe(x)}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in _DTYPES:
        raise TypeError(
            f"flash_attention: q, k, v must share one dtype out of float16, bfloat16, float32; got "
            f"{q.dtype}, {k.dtype}, {v.dtype} (cast them first)"
        )
    b, h, lq, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, h) or k.shape[3] != d:
        raise ValueError(
            f"flash_attention: expected q [B, H, Lq, D] and k, v [B, H, Lk, D], got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not 1 <= d <= _MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head dim {d} is not in 1..{_MAX_HEAD_DIM}; use the 'sdpa' backend")
    if b * h > 65535:  # CUDA's limit on the grid's second axis
        raise ValueError(f"flash_attention: batch * heads = {b * h} is over 65535; split the batch")
    if k.shape[2] == 0:
        raise ValueError("flash_attention: k and v have no keys (Lk == 0); softmax over nothing is undefined")
    if not q.device == k.device == v.device:
        raise ValueError(f"flash_attention: q, k, v are on {q.device}, {k.device}, {v.device}; use one device")
    if q.device.type == "cpu" and not _INTERPRET:
        raise ValueError(
            "flash_attention: got CPU tensors, but the Triton kernel needs a GPU. Use the 'sdpa' attention "
            "backend on CPU, or set TRITON_INTERPRET=1 before importing minsdxl.kernels to run Triton's "
            "(slow) interpreter"
        )


def _describe(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor) -> None:
    """Write attention(q, k, v) into o, all [B, H, L, D] with any strides (inputs checked by _check)."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    if q.numel() == 0:
        return
    args = (
        q, k, v, o, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        h, lq, lk, d**-0.5 * _LOG2E,  # exp(x * scale) = exp2(x * scale * log2(e))
    )  # fmt: skip
    consts = {
        "HEAD_DIM": d,
        "D_PAD": max(16, triton.next_power_of_2(d)),  # tl.dot needs a power of 2, at least 16
        # fp32 is for exactness tests: no tf32 rounding (fp16/bf16 inputs ignore this)
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }

    def grid(meta):
        return (triton.cdiv(lq, meta["BLOCK_M"]), b * h)

    with torch.cuda.device_of(q):  # triton launches on the current device, not q's (no-op on CPU)
        if _INTERPRET:  # no GPU to time configs on: one fixed config
            _attn_fwd[grid](*args, **consts, **_INTERPRET_BLOCKS)
        else:
            _attn_fwd_tuned[grid](*args, **consts)


def _empty_out(q: torch.Tensor) -> torch.Tensor:
    # [B, Lq, H, D] memory seen as [B, H, Lq, D]: the layout attention() reshapes back to for free
    b, h, lq, d = q.shape
    return q.new_empty(b, lq, h, d).transpose(1, 2)


# An opaque custom op rather than triton_op: triton_op's fake impl traces the launch through
# wrap_triton, which cannot trace the interpreter's kernels, so torch.compile could not be tested on CPU.
@torch.library.custom_op("minsdxl::flash_attention", mutates_args=())
def _flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    o = _empty_out(q)
    _launch(q, k, v, o)
    return o


@_flash_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _empty_out(q)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for q [B, H, Lq, D], k and v [B, H, Lk, D] (any strides, D <= 128,
    float16 / bfloat16 / float32) -> [B, H, Lq, D], = F.scaled_dot_product_attention(q, k, v)."""
    _check(q, k, v)
    return torch.ops.minsdxl.flash_attention(q, k, v)
