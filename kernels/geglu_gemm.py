"""GEGLU as one GEMM in Triton: out = (x W_h^T + b_h) * gelu(x W_g^T + b_g), W = [W_h; W_g] = GEGLU.proj.

diffusers' GEGLU (and minsdxl's eager one) runs proj as a GEMM writing [M, 2N], then reads it back for
h * gelu(gate): under torch.compile, one cuBLAS GEMM and one fused pointwise kernel. Here each program
computes the same [BLOCK_M, BLOCK_N] tile of both halves (two accumulators over one pass of x's K loop)
and applies bias, gelu and the product in registers before its one store, so the [M, 2N] intermediate
never reaches memory: 2 x 2N x M bytes of traffic and a kernel launch per transformer block saved. The
H100 profile (docs/performance.md, `gpu_bench.py` section 1b) bounds the gain at 1.55 ms per UNet step,
reached only if this GEMM runs at cuBLAS's speed.

Tiles move by TMA (2-d tensor descriptors; rows past the end are zero-filled on load and clipped on store),
so it runs where descriptors do: Hopper and later, and Triton's interpreter on CPU tensors (tests); on an
older GPU the op computes diffusers' formula in PyTorch. The gate half's descriptor starts N rows into the
weight: no copy or split of GEGLU.proj.weight, so a LoRA written into it in place is seen. fp16 / bf16
(fp32 accumulation, one rounding at the store, where eager rounds h and gate first) and fp32 for the
interpreter tests. gelu is the exact (erf) one, F.gelu's default.

Registered as the custom op torch.ops.minsdxl.geglu with a fake impl (torch.compile, fullgraph=True).
"""

import functools

import torch
import triton
import triton.language as tl

from minsdxl.kernels.flash_attn import _DTYPES, _INTERPRET, _describe, _ensure_allocator, _has_tma

_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2): gelu(g) = g / 2 * (1 + erf(g / sqrt(2)))


def _configs(tiles):
    return [
        triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "PERSISTENT": p}, num_warps=w, num_stages=st
        )
        for m, n, k, w, st, p in tiles
    ]


# (BLOCK_M, BLOCK_N of each half, BLOCK_K, warps, stages, persistent) for Hopper, untimed on a GPU so far: the
# tiles of Triton's Hopper matmul tutorials with N halved (two accumulators), so each program does the work
# of a [BLOCK_M, 2 BLOCK_N] GEMM tile. Shared memory per stage at (128, 128, 64): 48 KiB (x, W_h, W_g tiles).
# Persistent: one program per SM walks the tiles, its loop flattened so the next tile's loads overlap this
# tile's epilogue (the erf); SDXL's 1280-wide GEMM has 4.8 waves of 128 x 128 tiles on 132 SMs.
_CONFIGS = _configs(
    [(128, 128, 64, 8, 3, False), (128, 128, 64, 8, 4, False), (128, 64, 64, 4, 4, False), (128, 64, 64, 8, 4, False)]
    + [(64, 128, 64, 4, 4, False), (256, 64, 64, 8, 3, False), (128, 128, 32, 8, 4, False)]
    + [(128, 128, 64, 8, 3, True), (128, 64, 64, 8, 4, True), (128, 128, 32, 8, 4, True)]
)
# The interpreter runs programs one at a time at a fixed Python cost each: few, large ones.
_INTERPRET_BLOCKS = {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "PERSISTENT": False}


@triton.jit
def _geglu_fwd(
    X, W, Bias, O,
    M, N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr,
):  # fmt: skip
    x_desc = tl.make_tensor_descriptor(X, [M, K], [stride_xm, 1], [BLOCK_M, BLOCK_K])
    h_desc = tl.make_tensor_descriptor(W, [N, K], [stride_wn, 1], [BLOCK_N, BLOCK_K])
    g_desc = tl.make_tensor_descriptor(W + N * stride_wn, [N, K], [stride_wn, 1], [BLOCK_N, BLOCK_K])
    o_desc = tl.make_tensor_descriptor(O, [M, N], [stride_om, 1], [BLOCK_M, BLOCK_N])
    n_blocks = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_blocks
    tiles = tl.cdiv(M, BLOCK_M) * n_blocks
    # one tile per program, or (persistent) every num_programs-th tile
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=PERSISTENT):
        # tiles in groups of GROUP_M row blocks: programs running together share W's tiles in L2
        first_m = (tile // per_group) * GROUP_M
        group_rows = min(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
        m0 = (first_m + (tile % per_group) % group_rows) * BLOCK_M
        n0 = ((tile % per_group) // group_rows) * BLOCK_N

        acc_h = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k in range(0, K, BLOCK_K):  # columns past K load as zeros: any K
            x = x_desc.load([m0, k])
            acc_h = tl.dot(x, tl.trans(h_desc.load([n0, k])), acc_h, input_precision=DOT_PRECISION)
            acc_g = tl.dot(x, tl.trans(g_desc.load([n0, k])), acc_g, input_precision=DOT_PRECISION)

        if HAS_BIAS:
            cols = n0 + tl.arange(0, BLOCK_N)
            acc_h += tl.load(Bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            acc_g += tl.load(Bias + N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        out = acc_h * (0.5 * acc_g * (1.0 + tl.math.erf(acc_g * _SQRT1_2)))  # h * gelu(gate), exact gelu
        o_desc.store([m0, n0], out.to(O.dtype.element_ty))


_geglu_fwd_tuned = triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])(_geglu_fwd)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"geglu: expected x [..., K] and weight [2N, K], got x {_describe(x)}, weight {_describe(weight)}"
        )
    if weight.shape[0] % 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"geglu: weight must be [2N, K] with K = x's last dim {x.shape[-1]}, got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"geglu: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if len({t.dtype for t in tensors}) != 1 or x.dtype not in _DTYPES:
        raise TypeError(
            f"geglu: x, weight, bias must share one dtype out of float16, bfloat16, float32; got "
            f"{', '.join(str(t.dtype) for t in tensors)} (cast them first)"
        )
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"geglu: x, weight, bias are on {', '.join(str(t.device) for t in tensors)}; use one device")
    if not fits(x, weight):
        raise ValueError(
            "geglu: the kernel needs a CUDA GPU, or CPU tensors with TRITON_INTERPRET=1 set before "
            "minsdxl.kernels is imported, and rows of x and of the weight's halves whose sizes are multiples of "
            "16 bytes (TMA); use GEGLU's PyTorch path (GEGLU.fused = False) otherwise"
        )


def _describable(t: torch.Tensor) -> bool:
    """A 2-d tensor a TMA descriptor can describe: last dim contiguous, base and row stride 16-byte aligned."""
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0


def _describable_copy(t: torch.Tensor) -> torch.Tensor:
    # never for the UNet's tokens and parameters (contiguous, allocations aligned): a fallback, not a path
    return t if _describable(t) else t.clone(memory_format=torch.contiguous_format)


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the op can take these: a CUDA device (the kernel from Hopper on), and rows of x, of the weight's
    halves and of the output whose sizes are multiples of 16 bytes. Only shapes, dtypes and devices are
    read, so torch.compile traces it (a layout descriptors cannot describe is copied inside the op)."""
    if not (x.is_cuda or (x.device.type == "cpu" and _INTERPRET)):  # a GPU without TMA: see _geglu_op
        return False
    size = weight.element_size()
    return x.shape[-1] * size % 16 == 0 and weight.shape[0] // 2 * size % 16 == 0


@functools.cache
def _processors(device: torch.device) -> int:
    """Programs of a persistent launch: the GPU's SMs (3 in the interpreter: several tiles per program)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3


def _launch(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out [M, N] = geglu of x2 [M, K] (inputs checked by _check)."""
    m, k = x2.shape
    n = weight.shape[0] // 2
    if out.numel() == 0:
        return
    consts = {"HAS_BIAS": bias is not None, "DOT_PRECISION": "ieee" if x2.dtype == torch.float32 else "tf32"}
    strides = (x2.stride(0), weight.stride(0), out.stride(0))
    args = (x2, weight, weight if bias is None else bias, out, m, n, k, *strides)  # (bias unread without one)

    def grid(meta):
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        return (min(tiles, _processors(x2.device)) if meta["PERSISTENT"] else tiles,)

    if x2.is_cuda:
        _ensure_allocator()  # device-side descriptors
    with torch.cuda.device_of(x2):
        if _INTERPRET:
            _geglu_fwd[grid](*args, **consts, **_INTERPRET_BLOCKS)
        else:
            _geglu_fwd_tuned[grid](*args, **consts)


@torch.library.custom_op("minsdxl::geglu", mutates_args=())
def _geglu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.new_empty(*x.shape[:-1], weight.shape[0] // 2)
    x2 = x.reshape(-1, x.shape[-1])  # a view for the UNet's contiguous [B, L, C] tokens
    if not _has_tma(x.device):  # a GPU before Hopper: PyTorch (checked here, where torch.compile does not trace)
        h, gate = torch.nn.functional.linear(x2, weight, bias).chunk(2, dim=-1)
        out.view(-1, out.shape[-1]).copy_(h * torch.nn.functional.gelu(gate))
        return out
    _launch(_describable_copy(x2), _describable_copy(weight), bias, out.view(-1, out.shape[-1]))
    return out


@_geglu_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0] // 2)


def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """h * gelu(gate) for h, gate = F.linear(x, weight, bias).chunk(2, -1), in one kernel: x [..., K],
    weight [2N, K], bias [2N] or None -> [..., N] (= diffusers' GEGLU.forward with proj's parameters)."""
    _check(x, weight, bias)
    return torch.ops.minsdxl.geglu(x, weight, bias)
