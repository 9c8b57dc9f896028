"""minsdxl.kernels on CPU in Triton's interpreter: flash_attention vs torch's scaled_dot_product_attention,
geglu (GEGLU as one GEMM) vs diffusers' GEGLU formula.

TRITON_INTERPRET=1 must be set before triton.language is first imported (@triton.jit picks the
interpreter at decoration time), hence the environment line above the imports; in a pytest run whose
conftest imports triton first, set it in the environment instead. The interpreter's bf16 tl.dot is broken
(triton-lang/triton#11584), so these tests use fp32 (and one fp16 case); bf16 is checked on a GPU.
"""

import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from minsdxl import attention as attention_module  # noqa: E402
from minsdxl.kernels import flash_attention, flash_attn, geglu, geglu_gemm  # noqa: E402

if not (flash_attn._INTERPRET and isinstance(tl.zeros, InterpretedFunction)):
    raise RuntimeError(
        "triton was imported before this file could set TRITON_INTERPRET=1 (tests/conftest.py imports "
        "diffusers, which imports triton.language), so its kernels need a GPU: set TRITON_INTERPRET=1 in "
        "the environment, or at the top of tests/conftest.py before any import of diffusers or minsdxl.kernels"
    )

# fp32 on both sides; the online softmax only changes the summation order (errors seen: ~2e-6)
ATOL, RTOL = 2e-5, 1e-5


@pytest.fixture(params=["tma", "pointers"])
def kernel(request, monkeypatch):
    """Both kernels: TMA descriptors (Hopper, and every layout the UNet makes) and the pointer version."""
    monkeypatch.setattr(flash_attn, "_TMA", request.param == "tma")
    monkeypatch.setattr(flash_attn, "TMA_MIN_KEYS", 0)
    return request.param


def _heads(b: int, length: int, h: int, d: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """[B, H, L, D] as minsdxl.attention makes it: a transposed view of a [B, L, H*D] projection."""
    return torch.randn(b, length, h * d, generator=gen).to(dtype).view(b, length, h, d).transpose(1, 2)


def _attend_poisoned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None):
    """The kernel writing into a NaN-filled output (by default laid out as flash_attention allocates
    it): any element it fails to write stays NaN and fails the comparison."""
    b, h, lq, d = q.shape
    if out is None:
        out = torch.empty(b, lq, h, d, dtype=q.dtype).transpose(1, 2)
    out.fill_(float("nan"))
    flash_attn._launch(q, k, v, out)
    return out


@pytest.mark.parametrize(
    "b, h, lq, lk, d",
    [
        (2, 10, 4096, 77, 64),  # SDXL level-1 cross-attention at 1024^2: ragged 77-key block only
        (2, 20, 1000, 1000, 64),  # self-attention, ragged query and key blocks
        (1, 2, 300, 512, 40),  # head dims padded to a power of 2; 512 keys: whole blocks, no tail
        (1, 2, 300, 200, 80),
        (1, 2, 300, 200, 128),
        (1, 2, 50, 30, 8),  # below tl.dot's minimum of 16
    ],
)
def test_matches_sdpa(b, h, lq, lk, d, kernel):
    gen = torch.Generator().manual_seed(lq + lk + d)
    q, k, v = _heads(b, lq, h, d, gen), _heads(b, lk, h, d, gen), _heads(b, lk, h, d, gen)
    assert not q.is_contiguous()
    o = _attend_poisoned(q, k, v)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v), atol=ATOL, rtol=RTOL)


def test_many_small_blocks(monkeypatch, kernel):
    # Small blocks: several query blocks with a ragged last one, several whole key blocks plus a tail.
    monkeypatch.setitem(flash_attn._INTERPRET_BLOCKS, "BLOCK_M", 32)
    monkeypatch.setitem(flash_attn._INTERPRET_BLOCKS, "BLOCK_N", 16)
    gen = torch.Generator().manual_seed(0)
    q, k, v = _heads(1, 100, 3, 40, gen), _heads(1, 57, 3, 40, gen), _heads(1, 57, 3, 40, gen)
    o = _attend_poisoned(q, k, v)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v), atol=ATOL, rtol=RTOL)


def test_peaked_scores():
    # Large logits: the running max must move between key blocks without overflow or lost mass.
    gen = torch.Generator().manual_seed(1)
    q, k, v = _heads(1, 300, 2, 64, gen) * 30, _heads(1, 600, 2, 64, gen), _heads(1, 600, 2, 64, gen)
    o = _attend_poisoned(q, k, v)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
    # scores reach ~160 (exp overflows fp32 past 88 without the max); fp32 rounds them by ~1e-5 absolute
    torch.testing.assert_close(o, ref, atol=1e-4, rtol=1e-4)


def test_any_strides(kernel):
    # q, k, v as slices of one fused [B, L, 3*H*D] projection, a contiguous [B, H, Lq, D] out.
    b, h, lq, d = 2, 3, 130, 64
    qkv = torch.randn(b, lq, 3, h, d, generator=torch.Generator().manual_seed(2)).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    o = _attend_poisoned(q, k, v, out=torch.empty(b, h, lq, d))
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v), atol=ATOL, rtol=RTOL)


def test_fp16(kernel):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (_heads(2, n, 2, 64, gen, torch.float16) for n in (200, 77, 77))
    o = _attend_poisoned(q, k, v)
    assert o.dtype == torch.float16
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    # p and the output are rounded to fp16 (ulp ~1e-3 near 1), sums are fp32: a couple of ulps
    torch.testing.assert_close(o.float(), ref, atol=2e-3, rtol=2e-3)


def test_kernel_choice():
    # the UNet's layout ([B, L, H*D] projections seen as [B, H, L, D]) goes through TMA; a head dim that is
    # not contiguous, or rows not 16-byte aligned, cannot be described by a TMA descriptor: pointers
    gen = torch.Generator().manual_seed(8)
    q = _heads(2, 70, 4, 32, gen)
    assert flash_attn._tma_fits(q, q, q, flash_attn._empty_out(q))
    assert not flash_attn._tma_fits(q.transpose(-1, -2), q, q, q)
    odd = torch.randn(2, 70, 4 * 3).view(2, 70, 4, 3).transpose(1, 2)  # rows of 12 bytes
    assert not flash_attn._tma_fits(odd, odd, odd, odd)
    o = _attend_poisoned(odd, odd, odd)  # and the pointer kernel takes it
    torch.testing.assert_close(o, F.scaled_dot_product_attention(odd, odd, odd), atol=ATOL, rtol=RTOL)
    qt = torch.randn(2, 4, 32, 70, generator=gen).transpose(-1, -2)  # head dim strided
    o = _attend_poisoned(qt, qt, qt)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(qt, qt, qt), atol=ATOL, rtol=RTOL)


def test_output_layout_feeds_attention_reshape_for_free():
    gen = torch.Generator().manual_seed(4)
    q, k, v = _heads(2, 70, 4, 32, gen), _heads(2, 77, 4, 32, gen), _heads(2, 77, 4, 32, gen)
    o = flash_attention(q, k, v)
    assert o.shape == (2, 4, 70, 32) and o.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v), atol=ATOL, rtol=RTOL)


def test_attention_seam_triton_backend(monkeypatch):
    # minsdxl.attention.attention with the triton backend: [B, L, H*D] in and out, = the sdpa backend,
    # and the kernel really ran (not the SDPA fallback outside its envelope)
    calls = []
    launch = flash_attn._launch
    monkeypatch.setattr(flash_attn, "_launch", lambda *a: calls.append(a[0].shape) or launch(*a))
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, n, 5 * 64, generator=gen) for n in (120, 77, 77))
    ref = attention_module.attention(q, k, v, heads=5)
    previous = attention_module.get_backend()
    attention_module.set_backend("triton")
    try:
        o = attention_module.attention(q, k, v, heads=5)
    finally:
        attention_module.set_backend(previous)
    assert calls == [(2, 5, 120, 64)]
    torch.testing.assert_close(o, ref, atol=ATOL, rtol=RTOL)


def test_torch_compile_fullgraph():
    def f(x, ctx):
        return flash_attention(x * 2, ctx, ctx + 1).sum(-1)

    gen = torch.Generator().manual_seed(6)
    x, ctx = _heads(2, 64, 2, 32, gen), _heads(2, 77, 2, 32, gen)
    torch._dynamo.reset()
    # aot_eager: dynamo + the fake impl + AOT functionalization, without inductor's C++ build time
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ref = F.scaled_dot_product_attention(x * 2, ctx, ctx + 1).sum(-1)
    torch.testing.assert_close(compiled(x, ctx), ref, atol=1e-4, rtol=RTOL)  # a sum of 32 outputs


def test_opcheck():
    # schema, fake impl (shapes and strides) vs the real kernel, and dynamic-shape tracing
    gen = torch.Generator().manual_seed(7)
    args = (_heads(1, 40, 2, 16, gen), _heads(1, 30, 2, 16, gen), _heads(1, 30, 2, 16, gen))
    torch.library.opcheck(torch.ops.minsdxl.flash_attention.default, args)


# The interpreter never runs Triton's compiler. Compile the real kernel for Hopper (sm_90) in a process
# without TRITON_INTERPRET: no GPU is needed, triton ships ptxas. Uses triton's ASTSource (as inductor does).
_COMPILE_FOR_HOPPER = """
import os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from minsdxl.kernels.flash_attn import _CONFIGS, _TMA_CONFIGS, _attn_fwd, _attn_fwd_tma

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
from minsdxl.kernels.geglu_gemm import _CONFIGS as _GEGLU_CONFIGS, _geglu_fwd

cases = [(_attn_fwd, "bf16", 64, _CONFIGS[2]), (_attn_fwd, "fp16", 80, _CONFIGS[1])]
cases += [(_attn_fwd_tma, "bf16", 64, c) for c in _TMA_CONFIGS] + [(_attn_fwd_tma, "fp16", 80, _TMA_CONFIGS[0])]
cases += [(_geglu_fwd, "bf16", None, c) for c in _GEGLU_CONFIGS]
for fn, dtype, d, config in cases:
    if fn is _geglu_fwd:
        consts = dict(HAS_BIAS=True, DOT_PRECISION="tf32", **config.kwargs)
        types = {n: "*" + dtype for n in ("X", "W", "Bias", "O")}
    else:
        consts = dict(HEAD_DIM=d, D_PAD=triton.next_power_of_2(d), DOT_PRECISION="tf32", **config.kwargs)
        types = {n: "*" + dtype for n in ("Q", "K", "V", "O")} | {"qk_scale": "fp32"}
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    constexprs = {(i,): consts[n] for i, n in enumerate(fn.arg_names) if n in consts}
    kernel = triton.compile(
        ASTSource(fn, signature, constexprs),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
    )
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx, "no Hopper tensor-core instructions"
    if fn is not _attn_fwd:
        assert "cp.async.bulk.tensor" in ptx, "no TMA copies"
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        report = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
        spills = [int(n) for n in re.findall(r"(\\d+) bytes spill stores", report.stderr)]
        assert spills and max(spills) == 0, (config, report.stderr)
    print(fn.__name__, dtype, d, config, "compiled", flush=True)
"""


def test_compiles_for_hopper():
    # the attention kernels compile for sm_90 with wgmma; the TMA one with TMA copies and, at every
    # autotuning config for head dim 64 (ptxas's report), no register spills: the reason it exists. The
    # GEGLU GEMM likewise at every config (two [BLOCK_M, BLOCK_N] fp32 accumulators: up to 220 registers)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    assert run.stdout.count("compiled") == 3 + len(flash_attn._TMA_CONFIGS) + len(geglu_gemm._CONFIGS)


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(flash_attn, "_INTERPRET", False)
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises(ValueError, match="'sdpa'.*TRITON_INTERPRET=1"):
        flash_attention(q, q, q)


@pytest.mark.parametrize(
    "q_shape, k_shape, dtype, error, match",
    [
        ((2, 8, 64), (2, 8, 64), torch.float32, ValueError, "4-d"),
        ((1, 2, 8, 160), (1, 2, 8, 160), torch.float32, ValueError, "head dim 160"),
        ((1, 2, 8, 64), (1, 3, 8, 64), torch.float32, ValueError, "expected q"),
        ((1, 2, 8, 64), (1, 2, 0, 64), torch.float32, ValueError, "no keys"),
        ((1, 65536, 1, 16), (1, 65536, 1, 16), torch.float32, ValueError, "65535"),
        ((1, 2, 8, 64), (1, 2, 8, 64), torch.float64, TypeError, "dtype"),
    ],
)
def test_bad_inputs(q_shape, k_shape, dtype, error, match):
    q, k = torch.zeros(q_shape, dtype=dtype), torch.zeros(k_shape, dtype=dtype)
    with pytest.raises(error, match=match):
        flash_attention(q, k, k)


# ------------------------------------------------------------------------------------------------
# geglu: GEGLU.proj and h * gelu(gate) as one GEMM


def _geglu_ref(x, w, b):  # diffusers' GEGLU.forward
    h, gate = F.linear(x, w, b).chunk(2, dim=-1)
    return h * F.gelu(gate)


def _geglu_inputs(m: int, k: int, n: int, bias: bool = True, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(2 * n, k, generator=gen) * k**-0.5  # unit-scale outputs, as a trained proj gives
    b = torch.randn(2 * n, generator=gen) if bias else None
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)


def _geglu_poisoned(x, w, b):
    """The kernel writing into a NaN-filled output: an element it fails to write fails the comparison."""
    out = torch.full((x.shape[0], w.shape[0] // 2), float("nan"), dtype=x.dtype)
    geglu_gemm._launch(x, w, b, out)
    return out


@pytest.mark.parametrize(
    "m, k, n, bias",
    [
        (2 * 77, 1280, 5120, True),  # SDXL's 1280-wide feed-forward (inner 5120), few tokens
        (2 * 1000, 64, 256, True),  # many row blocks, ragged last one
        (130, 96, 48, False),  # K not a multiple of BLOCK_K, N smaller than BLOCK_N, no bias
    ],
)
@pytest.mark.parametrize("persistent", [False, True], ids=["tile-per-program", "persistent"])
def test_geglu_matches_pytorch(m, k, n, bias, persistent, monkeypatch):
    # persistent: 3 programs in the interpreter (a GPU: one per SM), each walking several tiles
    monkeypatch.setitem(geglu_gemm._INTERPRET_BLOCKS, "PERSISTENT", persistent)
    x, w, b = _geglu_inputs(m, k, n, bias)
    got, ref = _geglu_poisoned(x, w, b), _geglu_ref(x, w, b)
    # fp32 both sides (ieee dots): other summation order, and math.erf (the interpreter's) vs torch's erf
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


def test_geglu_fp16():
    x, w, b = _geglu_inputs(200, 64, 128, dtype=torch.float16, seed=1)
    got = _geglu_poisoned(x, w, b)
    ref = _geglu_ref(x.float(), w.float(), b.float())
    # eager fp16 rounds h and gate before the product, the kernel rounds once at the store: ~1 ulp of 1e-3
    torch.testing.assert_close(got.float(), ref, atol=2e-3, rtol=2e-3)


def test_geglu_layouts():
    # [B, L, C] tokens (the UNet's) as a view; a layout TMA cannot describe (transposed) is copied first
    x, w, b = _geglu_inputs(2 * 70, 64, 128, seed=2)
    tokens = x.view(2, 70, 64)
    assert geglu_gemm.fits(tokens, w)
    torch.testing.assert_close(geglu(tokens, w, b), _geglu_ref(tokens, w, b), atol=ATOL, rtol=RTOL)
    xt = x.T.contiguous().T  # [M, K] with K strided
    torch.testing.assert_close(geglu(xt, w, b), _geglu_ref(xt, w, b), atol=ATOL, rtol=RTOL)
    assert geglu(x[:0], w, b).shape == (0, 128)


def test_geglu_fits(monkeypatch):
    x, w, b = _geglu_inputs(8, 64, 128)
    assert geglu_gemm.fits(x, w)
    assert not geglu_gemm.fits(torch.randn(8, 6), torch.randn(2 * 128, 6))  # rows of 24 bytes
    # output rows of 48 bytes fit, of 52 not
    assert geglu_gemm.fits(x, torch.randn(2 * 12, 64)) and not geglu_gemm.fits(x, torch.randn(2 * 13, 64))
    # layouts a descriptor cannot describe are copied inside the op: still the right answer
    for w_odd in (w.T.contiguous().T, torch.randn(2 * 128 * 64 + 1)[1:].view(2 * 128, 64)):  # strided, 4 bytes off
        assert not geglu_gemm._describable(w_odd) and geglu_gemm.fits(x, w_odd)
        torch.testing.assert_close(geglu(x, w_odd, b), _geglu_ref(x, w_odd, b), atol=ATOL, rtol=RTOL)
    monkeypatch.setattr(geglu_gemm, "_INTERPRET", False)
    assert not geglu_gemm.fits(x, w)  # CPU tensors need the interpreter
    with pytest.raises(ValueError, match="CUDA GPU.*TRITON_INTERPRET=1"):
        geglu(x, w)


def test_geglu_without_tma_computes_pytorchs(monkeypatch):
    # a GPU before Hopper (no TMA descriptors): the op runs diffusers' formula in PyTorch, not the kernel
    monkeypatch.setattr(geglu_gemm, "_has_tma", lambda device: False)
    monkeypatch.setattr(geglu_gemm, "_launch", lambda *a: pytest.fail("the kernel ran without TMA"))
    x, w, b = _geglu_inputs(2 * 35, 64, 128, seed=6)
    tokens = x.view(2, 35, 64)
    assert torch.equal(geglu(tokens, w, b), _geglu_ref(tokens, w, b))


@pytest.mark.parametrize(
    "x_shape, w_shape, b_shape, dtype, error, match",
    [
        ((4, 64), (129, 64), None, torch.float32, ValueError, r"\[2N, K\]"),
        ((4, 64), (128, 32), None, torch.float32, ValueError, "K = x's last dim 64"),
        ((4, 64), (128, 64), (64,), torch.float32, ValueError, r"bias must be \[128\]"),
        ((4, 64), (128,), None, torch.float32, ValueError, "expected x"),
        ((4, 64), (128, 64), None, torch.float64, TypeError, "dtype"),
    ],
)
def test_geglu_bad_inputs(x_shape, w_shape, b_shape, dtype, error, match):
    x, w = torch.zeros(x_shape, dtype=dtype), torch.zeros(w_shape, dtype=dtype)
    b = None if b_shape is None else torch.zeros(b_shape, dtype=dtype)
    with pytest.raises(error, match=match):
        geglu(x, w, b)


def test_geglu_mixed_dtypes_and_devices():
    with pytest.raises(TypeError, match="got torch.float32, torch.float16"):
        geglu(torch.zeros(4, 64), torch.zeros(128, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="on cpu, meta"):
        geglu(torch.zeros(4, 64), torch.zeros(128, 64, device="meta"))


def test_geglu_torch_compile_and_opcheck():
    x, w, b = _geglu_inputs(40, 32, 64, seed=3)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: geglu(x * 2, w, b).sum(-1), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), _geglu_ref(x * 2, w, b).sum(-1), atol=1e-4, rtol=RTOL)
    torch.library.opcheck(torch.ops.minsdxl.geglu.default, (x, w, b))
    torch.library.opcheck(torch.ops.minsdxl.geglu.default, (x.view(4, 10, 32), w, None))
