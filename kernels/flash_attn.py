"""Flash-attention forward in Triton for the UNet's attention: softmax(q k^T / sqrt(d)) v, non-causal.

One program computes BLOCK_M query rows of one (batch, head) and streams the keys in blocks of BLOCK_N
with the online softmax (running max m, running sum l, rescaled accumulator), so the [Lq, Lk] score
matrix never reaches memory. Follows Dao et al., "FlashAttention" (2022) and the Triton tutorial
06-fused-attention; written for minsdxl's layout:

- q, k, v come as [B, H, L, D] views of [B, L, H*D] projections, non-contiguous: we pass strides and
  never copy. On Hopper (and in the interpreter), from TMA_MIN_KEYS keys, tiles move by TMA through 4-d
  tensor descriptors over that view (`_attn_fwd_tma`): no per-element pointer tensors in registers, no
  spills (the pointer version spills at most tile sizes, ptxas for sm_90), and rows past the end are
  zero-filled on load and clipped on store by the copy engine itself. The pointer version `_attn_fwd`
  serves short key loops (where writing the descriptors does not pay), older GPUs and layouts TMA
  cannot describe. H200, bf16, 4096 tokens: 401 TFLOP/s (docs/performance.md).
- the output is allocated as [B, Lq, H, D] and returned as its [B, H, Lq, D] view, so `attention()`'s
  transpose(1, 2).reshape(...) back to [B, Lq, H*D] is free.
- any Lq / Lk (cross-attention has 77 keys): loads past the end are masked, never padded in memory.
- head dims that are not a power of 2 (40, 80) are padded to one in registers, with masked loads.
- fp16 / bf16 (and fp32, for the CPU interpreter tests) with fp32 accumulation; exp2 with the
  softmax scale folded into log2(e).

Registered as the custom op torch.ops.minsdxl.flash_attention with a fake impl, so torch.compile
(fullgraph=True) traces through it without a graph break. With TRITON_INTERPRET=1 set before triton is
first imported, the kernel runs in Triton's interpreter on CPU tensors (slow: tests only).
"""

import functools

import torch
import triton
import triton.language as tl

# @triton.jit picks the interpreter when this module is imported; remember what it picked.
_INTERPRET = bool(triton.knobs.runtime.interpret)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634


def _configs(tiles):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in tiles]


# Short lists for Hopper (H100); the autotuner times each config once per (Lq, Lk, head dim, dtype) in the
# process and keeps nothing on disk. Compiled for sm_90, all use wgmma. TMA (BLOCK_M, BLOCK_N, warps,
# stages): none spills at head dims 64 / 80 / 128 (ptxas -v); (128, 64, 8, 3) needs 106 registers at
# d = 64, so two programs share an SM.
_TMA_CONFIGS = _configs(
    [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (256, 64, 8, 3)]
    + [(128, 32, 4, 4), (128, 64, 8, 4)]
)
# Pointer version: its 64-bit pointer tensors make most tiles spill (ptxas -v at d = 64: 368 bytes at
# (128, 64, 4, 3), none at (128, 64, 8, 3) or (128, 32, 4, 4)); the autotuner keeps the fastest.
_CONFIGS = _configs(
    [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4)]
)

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
def _softmax_step(acc, m_i, l_i, q, k, v, cols, Lk, qk_scale, MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold softmax(q k^T) v over one [BLOCK_N, D_PAD] slice of keys k and values v into (acc, m_i, l_i)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N], raw scores
    if MASK_N:
        s = tl.where(cols[None, :] < Lk, s, float("-inf"))
    # Scale inside the max and the exponent (log2 units) rather than as a pass of its own: s * scale - m
    # is one FMA per score, and at head dim 64 the softmax, not the matmuls, bounds the loop.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)  # rescales what was summed under the old max
    l_i = l_i * alpha + tl.sum(p, 1)
    # accumulate into acc (the tensor cores' accumulator) instead of adding a second product to it
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attn_block(
    acc, m_i, l_i, q, k_ptrs, v_ptrs, offs_n, Lk, offs_d, qk_scale,
    HEAD_DIM: tl.constexpr, MASK_N: tl.constexpr, PAD_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One BLOCK_N slice of keys through pointers (masked loads where it can run past the end)."""
    k = _load_tile(k_ptrs, offs_n, Lk, offs_d, HEAD_DIM, MASK_N, PAD_D)  # [BLOCK_N, D_PAD]
    v = _load_tile(v_ptrs, offs_n, Lk, offs_d, HEAD_DIM, MASK_N, PAD_D)
    return _softmax_step(acc, m_i, l_i, q, k, v, offs_n, Lk, qk_scale, MASK_N, DOT_PRECISION)


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


@triton.jit
def _heads_desc(
    X, B, H, L, stride_b, stride_h, stride_l, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, D_PAD: tl.constexpr
):
    """TMA descriptor of a [B, H, L, HEAD_DIM] view, moved in [1, 1, BLOCK, D_PAD] tiles."""
    return tl.make_tensor_descriptor(X, [B, H, L, HEAD_DIM], [stride_b, stride_h, stride_l, 1], [1, 1, BLOCK, D_PAD])


@triton.jit
def _attn_fwd_tma(
    Q, K, V, O,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    B, H, Lq, Lk, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """_attn_fwd with tiles moved by TMA: 4-d descriptors over the [B, H, L, D] views (head dim contiguous).
    Out-of-range rows and padded head-dim columns load as zeros and are not stored; padded key columns
    still need -inf scores (a zero key scores 0, not nothing), hence MASK_N on the ragged block."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    m0 = pid_m * BLOCK_M
    q_desc = _heads_desc(Q, B, H, Lq, stride_qb, stride_qh, stride_qm, HEAD_DIM, BLOCK_M, D_PAD)
    k_desc = _heads_desc(K, B, H, Lk, stride_kb, stride_kh, stride_kn, HEAD_DIM, BLOCK_N, D_PAD)
    v_desc = _heads_desc(V, B, H, Lk, stride_vb, stride_vh, stride_vn, HEAD_DIM, BLOCK_N, D_PAD)
    o_desc = _heads_desc(O, B, H, Lq, stride_ob, stride_oh, stride_om, HEAD_DIM, BLOCK_M, D_PAD)
    q = q_desc.load([b, h, m0, 0]).reshape(BLOCK_M, D_PAD)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    n_full = (Lk // BLOCK_N) * BLOCK_N
    for n in range(0, n_full, BLOCK_N):
        k = k_desc.load([b, h, n, 0]).reshape(BLOCK_N, D_PAD)
        v = v_desc.load([b, h, n, 0]).reshape(BLOCK_N, D_PAD)
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, n + offs_n, Lk, qk_scale, False, DOT_PRECISION)
    if n_full < Lk:
        k = k_desc.load([b, h, n_full, 0]).reshape(BLOCK_N, D_PAD)
        v = v_desc.load([b, h, n_full, 0]).reshape(BLOCK_N, D_PAD)
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, n_full + offs_n, Lk, qk_scale, True, DOT_PRECISION)

    o = (acc / l_i[:, None]).to(O.dtype.element_ty)
    o_desc.store([b, h, m0, 0], o.reshape(1, 1, BLOCK_M, D_PAD))


_attn_fwd_tma_tuned = triton.autotune(configs=_TMA_CONFIGS, key=["Lq", "Lk", "HEAD_DIM"])(_attn_fwd_tma)


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


# Tests and the GPU benchmark switch this off to run the pointer version where TMA would be used.
_TMA = True
# Each TMA program first writes its 4 descriptors to global memory: that pays off over a long key loop
# only. H200, bf16, GPU time: 4096 keys TMA 0.214 ms vs pointers 0.220; 1024 keys 0.041 vs 0.034; 77
# keys 0.022 vs 0.013 (docs/performance.md). Tests set it to 0 to run TMA at every size.
TMA_MIN_KEYS = 2048


@functools.cache
def _has_tma(device: torch.device) -> bool:
    return device.type == "cpu" or torch.cuda.get_device_capability(device)[0] >= 9  # the CPU: interpreter


def _tma_fits(*tensors: torch.Tensor) -> bool:
    """What a TMA descriptor can describe: head dim contiguous, base and the other strides 16-byte aligned."""
    if not (_TMA and _has_tma(tensors[0].device)):
        return False
    for x in tensors:
        size = x.element_size()
        if x.stride(-1) != 1 or x.data_ptr() % 16 or any(st * size % 16 for st in x.stride()[:-1]):
            return False
    return True


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # global memory in which each program of _attn_fwd_tma writes its tensor descriptors
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _ensure_allocator() -> None:
    """Device-side descriptors need triton's allocator; set ours only where none is (it is per thread)."""
    from triton.runtime import _allocation

    try:
        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except AttributeError:  # another triton version's internals: set ours
        unset = True
    if unset:
        triton.set_allocator(_scratch)


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor) -> None:
    """Write attention(q, k, v) into o, all [B, H, L, D] with any strides (inputs checked by _check)."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    if q.numel() == 0:
        return
    consts = {
        "HEAD_DIM": d,
        "D_PAD": max(16, triton.next_power_of_2(d)),  # tl.dot needs a power of 2, at least 16
        # fp32 is for exactness tests: no tf32 rounding (fp16/bf16 inputs ignore this)
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }
    scale = d**-0.5 * _LOG2E  # exp(x * scale) = exp2(x * scale * log2(e))
    if lk >= TMA_MIN_KEYS and _tma_fits(q, k, v, o):
        kernel, tuned = _attn_fwd_tma, _attn_fwd_tma_tuned
        args = (q, k, v, o, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], b, h, lq, lk, scale)
        if q.is_cuda:
            _ensure_allocator()
    else:
        kernel, tuned = _attn_fwd, _attn_fwd_tuned
        args = (q, k, v, o, *q.stride(), *k.stride(), *v.stride(), *o.stride(), h, lq, lk, scale)

    def grid(meta):
        return (triton.cdiv(lq, meta["BLOCK_M"]), b * h)

    with torch.cuda.device_of(q):  # triton launches on the current device, not q's (no-op on CPU)
        if _INTERPRET:  # no GPU to time configs on: one fixed config
            kernel[grid](*args, **consts, **_INTERPRET_BLOCKS)
        else:
            tuned[grid](*args, **consts)


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
