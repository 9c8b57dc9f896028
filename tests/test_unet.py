"""UNet parity with diffusers' UNet2DConditionModel on the same random weights (fp32, CPU).

Tolerance: max|delta| <= 1e-5 * max|reference| (the issue's bound). Both sides run the same fp32
ops in a different association order (e.g. our fused attention view vs diffusers' reshapes), which
gives ~1e-7 relative differences; 1e-5 leaves room for that and nothing else.
"""

import gc
import hashlib
import types
from dataclasses import replace

import diffusers
import pytest
import torch
from sdxl_testing import (
    TINY_REFINER,
    TINY_UNET,
    diffusers_unet_config,
    meta_diffusers,
    pooled_dim,
    random_state_dict,
    rel_err,
)

import minsdxl
from minsdxl.checkpoint import diffusers_to_sgm, load_component, save_safetensors
from minsdxl.config import UNET_PRESETS
from minsdxl.unet import GEGLU, UNet2DConditionModel

TOL = 1e-5


def _pair(cfg, sd):
    ref = meta_diffusers(diffusers.UNet2DConditionModel, diffusers_unet_config(cfg), sd)
    with torch.device("meta"):
        ours = UNet2DConditionModel(cfg)
    ours.load_state_dict(sd, strict=True, assign=True)  # diffusers' keys, no renaming
    return ref, ours.eval()


def _inputs(cfg, batch, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    pooled = pooled_dim(cfg)
    n_ids = (cfg.projection_class_embeddings_input_dim - pooled) // cfg.addition_time_embed_dim  # 6 base, 5 refiner
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
    text = torch.randn(batch, pooled, generator=g)
    # realistic micro-conditioning: sizes/crops in pixels (and an aesthetic score for the refiner)
    ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 768.0][:n_ids]]).repeat(batch, 1)
    ids = ids + torch.randint(0, 64, ids.shape, generator=g) * 8
    return x, ctx, text, ids


def _check(ref, ours, cfg, batch, h, w, timestep, seed=0):
    x, ctx, text, ids = _inputs(cfg, batch, h, w, seed)
    with torch.no_grad():
        expected = ref(x, timestep, ctx, added_cond_kwargs={"text_embeds": text, "time_ids": ids}).sample
        got = ours(x, timestep, ctx, text, ids)
    assert got.shape == expected.shape
    err = rel_err(got, expected)
    assert err <= TOL, f"relative error {err:.2e} (timestep {timestep}, batch {batch}, {h}x{w})"
    return expected


TINY_INPAINT = replace(TINY_UNET, in_channels=9)


@pytest.mark.parametrize("cfg", [TINY_UNET, TINY_REFINER, TINY_INPAINT], ids=["base", "refiner", "inpaint"])
def test_tiny_unet_matches_diffusers(cfg):
    ref, ours = _pair(cfg, random_state_dict(diffusers_unet_config_model(cfg), seed=1))
    outs = []
    for batch, (h, w), t in [
        (1, (16, 16), 999.0),
        (2, (16, 12), torch.tensor([500.0, 1.0])),
        (3, (8, 24), torch.tensor(250)),
        (2, (20, 12), 37.5),
    ]:
        outs.append(_check(ref, ours, cfg, batch, h, w, t, seed=batch))
    # the inputs above are not degenerate: time and conditioning change the output
    assert outs[0].abs().max() > 0.1


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_tiny_unet_with_triton_attention_matches_diffusers(tma, monkeypatch):
    # attention="triton" on CPU tensors runs minsdxl's kernel in Triton's interpreter (TRITON_INTERPRET=1,
    # set by conftest): the kernel inside a whole UNet, judged by diffusers' UNet on the same weights
    from minsdxl.kernels import flash_attn

    monkeypatch.setattr(flash_attn, "TMA_MIN_KEYS", 0 if tma else 10**9)
    calls = []
    launch = flash_attn._launch
    monkeypatch.setattr(flash_attn, "_launch", lambda *a: calls.append(a[1].shape) or launch(*a))
    ref, ours = _pair(TINY_UNET, random_state_dict(diffusers_unet_config_model(TINY_UNET), seed=2))
    layers = [m for m in ours.modules() if hasattr(m, "attention_backend")]
    for m in layers:
        m.attention_backend = "triton"
    _check(ref, ours, TINY_UNET, 2, 16, 12, torch.tensor([500.0, 1.0]), seed=3)
    # every attention layer (self and cross) of the 17 transformer layers went through the kernel once:
    # level 1: 1 layer x (2 down + 3 up blocks), level 2: 2 x (2 + 3), mid: 2
    assert len(calls) == len(layers) == 2 * (1 * 5 + 2 * 5 + 2)
    assert {s[-2] for s in calls} >= {77, 8 * 6, 4 * 3}  # cross-attention keys and both token counts


def test_tiny_unet_with_fused_geglu_matches_diffusers(monkeypatch):
    # minsdxl.compile(model, fused_geglu=True)'s GEMM in Triton's interpreter inside a whole UNet, judged by
    # diffusers' UNet on the same weights; then traced by torch.compile(fullgraph=True) through GEGLU's
    # dispatch and the custom op (aot_eager: dynamo, the fake impl and functionalization, no C++ build)
    from minsdxl.kernels import geglu_gemm

    calls = []
    launch = geglu_gemm._launch
    monkeypatch.setattr(geglu_gemm, "_launch", lambda *a: calls.append(tuple(a[0].shape)) or launch(*a))
    ref, ours = _pair(TINY_UNET, random_state_dict(diffusers_unet_config_model(TINY_UNET), seed=2))
    vae = types.SimpleNamespace(decoder=torch.nn.Identity())
    model = types.SimpleNamespace(unet=ours, vae=vae, text_encoder=None, text_encoder_2=None)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: None)  # the flags only, here
    minsdxl.compile(model, attention_backend=None, fused_geglu=True)
    layers = [m for m in ours.modules() if isinstance(m, GEGLU)]
    assert len(layers) == 17 and all(m.fused for m in layers)
    _check(ref, ours, TINY_UNET, 2, 16, 12, torch.tensor([500.0, 1.0]), seed=3)
    # every feed-forward of the 17 transformer layers went through the kernel once, at both token counts
    assert len(calls) == 17 and {c[0] for c in calls} == {2 * 8 * 6, 2 * 4 * 3}
    # one transformer block compiled (the whole UNet would only add ~17 s of tracing): = the block unfused
    block = ours.mid_block.attentions[0].transformer_blocks[0]
    tokens = torch.randn(2, 12, block.norm1.normalized_shape[0], generator=torch.Generator().manual_seed(4))
    ctx = torch.randn(2, 77, TINY_UNET.cross_attention_dim, generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            got = torch.compile(block, fullgraph=True, backend="aot_eager")(tokens, ctx)
            assert len(calls) == 18  # the compiled block ran the kernel
            block.ff.net[0].fused = False
            want = block(tokens, ctx)
    finally:
        torch._dynamo.reset()
    assert rel_err(got, want) <= TOL
    monkeypatch.setattr(minsdxl.speed.importlib.util, "find_spec", lambda name: None)  # no triton installed
    with pytest.raises(ImportError, match=r"fused_geglu=True\) needs triton"):
        minsdxl.compile(model, attention_backend=None, fused_geglu=True)


def diffusers_unet_config_model(cfg):
    with torch.device("meta"):
        return diffusers.UNet2DConditionModel(**diffusers_unet_config(cfg))


def test_state_dict_keys_equal_diffusers():
    for cfg in (UNET_PRESETS["base"], UNET_PRESETS["refiner"], UNET_PRESETS["inpaint"]):
        ref = diffusers_unet_config_model(cfg)
        with torch.device("meta"):
            ours = UNet2DConditionModel(cfg)
        a, b = ref.state_dict(), ours.state_dict()
        assert set(a) == set(b)
        assert all(a[k].shape == b[k].shape for k in a)


def test_timestep_forms_agree():
    cfg = TINY_UNET
    _, ours = _pair(cfg, random_state_dict(diffusers_unet_config_model(cfg), seed=2))
    x, ctx, text, ids = _inputs(cfg, 2, 16, 16, 0)
    with torch.no_grad():
        a = ours(x, 321.0, ctx, text, ids)
        b = ours(x, torch.tensor(321.0), ctx, text, ids)
        c = ours(x, torch.tensor([321.0, 321.0]), ctx, text, ids)
        d = ours(x, 321, ctx, text, ids)
        e = ours(x, 322.0, ctx, text, ids)
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    assert not torch.equal(a, e)


def test_projected_context_equals_the_prompt_tokens():
    """project_context (the sampler's once-per-run k, v of the prompt) gives the same output bit for
    bit, in forward order (each layer's own pair: a shuffled list changes the output); a list made for
    another UNet is refused by name."""
    cfg = TINY_UNET
    _, ours = _pair(cfg, random_state_dict(diffusers_unet_config_model(cfg), seed=2))
    x, ctx, text, ids = _inputs(cfg, 2, 16, 12, 0)
    with torch.no_grad():
        kv = ours.project_context(ctx)
        assert len(kv) == ours.num_cross_attentions == 17  # 1 x (2 down + 3 up) + 2 x (2 + 3) + 2 mid
        a = ours(x, 321.0, ctx, text, ids)
        assert torch.equal(ours(x, 321.0, kv, text, ids), a)
        assert not torch.equal(ours(x, 321.0, kv[1:] + kv[:1], text, ids), a)
        with pytest.raises(ValueError, match="list of 16; this UNet needs one .k, v, zeros, ip. for each of its 17"):
            ours(x, 321.0, kv[1:], text, ids)
        with pytest.raises(ValueError, match="for a batch of 3: make it with this UNet's project_context"):
            ours(torch.cat([x, x[:1]]), 321.0, kv, torch.cat([text, text[:1]]), torch.cat([ids, ids[:1]]))


@pytest.mark.parametrize("zeros", [1, 2, 3])
def test_all_zero_prompts_skip_cross_attention_with_the_same_output(zeros):
    """CFG's negative prompt is all zeros with force_zeros_for_empty_prompt (SDXL base's default), so
    k = v = 0 and each attn2 gives its to_out bias there. project_context leaves those leading rows out
    and attn2 skips them (no to_q, attention or to_out), with the output of the full computation and of
    diffusers on the prompt tokens."""
    cfg = TINY_UNET
    ref, ours = _pair(cfg, random_state_dict(diffusers_unet_config_model(cfg), seed=4))
    x, ctx, text, ids = _inputs(cfg, 3, 16, 12, 0)
    ctx[:zeros] = 0
    ctx[zeros : zeros + 1, 5] = 0  # a zero token in a live prompt is not a zero prompt
    rows = []
    count = lambda m, args: rows.append(len(args[0]))  # noqa: E731
    hooks = [a.to_q.register_forward_pre_hook(count) for a in ours.cross_attentions()]
    with torch.no_grad():
        kv = ours.project_context(ctx)
        assert {n for _, _, n, _ in kv} == {zeros} and {len(k) for k, _, _, _ in kv} == {3 - zeros}
        got = ours(x, 321.0, kv, text, ids)
        assert rows == ([3 - zeros] * 17 if zeros < 3 else [])  # the zero rows never reach to_q
        for h in hooks:
            h.remove()
        full = ours(x, 321.0, ctx, text, ids)
        expected = ref(x, 321.0, ctx, added_cond_kwargs={"text_embeds": text, "time_ids": ids}).sample
    assert torch.equal(got, full)
    assert rel_err(got, expected) <= TOL


def test_every_conv_gets_nchw_input():
    """Activations stay NCHW-contiguous, as in diffusers. A channels_last tensor (e.g. the transformer's
    tokens permuted back without a copy) makes torch reorder the conv's weights at every call: on the
    full UNet at 512x512 that was 0.8 s of weight copies per CPU step, and a different conv algorithm
    than diffusers'."""
    cfg = TINY_UNET
    _, ours = _pair(cfg, random_state_dict(diffusers_unet_config_model(cfg), seed=3))
    seen = []
    hooks = [
        m.register_forward_pre_hook(lambda m, args: seen.append((m, args[0].is_contiguous())))
        for m in ours.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    x, ctx, text, ids = _inputs(cfg, 2, 16, 12, 0)
    with torch.no_grad():
        out = ours(x, 500.0, ctx, text, ids)
    for h in hooks:
        h.remove()
    assert len(seen) == sum(isinstance(m, torch.nn.Conv2d) for m in ours.modules())
    assert [name for name, m in ours.named_modules() for n, ok in seen if n is m and not ok] == []
    assert out.is_contiguous()


def _digest(t: torch.Tensor) -> str:
    """sha1 of a tensor's bytes: bit-identity checks without keeping a second copy in memory."""
    return hashlib.sha1(t.contiguous().reshape(-1).view(torch.uint8).numpy().data).hexdigest()


def _digests(sd: dict, dtype=None) -> dict:
    return {k: _digest(v if dtype is None else v.to(dtype)) for k, v in sd.items()}  # one tensor at a time


@pytest.mark.parametrize("variant", ["base", "refiner", "inpaint"])
def test_full_size_unet_matches_diffusers_and_single_file(variant, tmp_path):
    """The real SDXL shapes (2.6 B / 2.3 B parameters) at small latents (16x16 and non-square 32x24);
    then the same weights as an sgm single file (fp16, as Stability ships them): diffusers'
    from_single_file reads it bit-identically, and minsdxl infers the config from shapes alone."""
    cfg = UNET_PRESETS[variant]
    sd = random_state_dict(diffusers_unet_config_model(cfg), seed=3)
    ref, ours = _pair(cfg, sd)
    _check(ref, ours, cfg, 2, 16, 16, torch.tensor([999.0, 10.0]), seed=1)
    _check(ref, ours, cfg, 1, 32, 24, 500.0, seed=2)
    ref.save_config(tmp_path / "config" / "unet")
    del ref, ours
    path = tmp_path / "unet.safetensors"
    save_safetensors(diffusers_to_sgm({"unet": sd}), path, dtype=torch.float16)
    expected = _digests(sd, torch.float16)
    del sd
    gc.collect()
    judge = diffusers.UNet2DConditionModel.from_single_file(
        str(path), config=str(tmp_path / "config"), subfolder="unet", local_files_only=True, torch_dtype=torch.float16
    )
    assert _digests(judge.state_dict()) == expected
    del judge
    gc.collect()
    unet = load_component(path, dtype=torch.float16)  # no config: head size, groups etc. from shapes
    assert unet.config == replace(cfg, sample_size=unet.config.sample_size)
    assert _digests(unet.state_dict()) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_freeu_matches_diffusers(dtype):
    """enable_freeu (SDXL's recommended factors) = diffusers' enable_freeu: the first two decoder levels'
    backbone halves and skip filters, at power-of-2 and other latent sizes (diffusers' FFT upcast
    branches); bf16 through the fp32 FFT. disable_freeu restores the plain output bit for bit, and a
    factor of 0 leaves FreeU off as in diffusers."""
    cfg = TINY_UNET
    ref, ours = _pair(cfg, random_state_dict(diffusers_unet_config_model(cfg), seed=5, dtype=dtype))
    plain = {}
    for h, w in ((16, 16), (16, 12)):
        x, ctx, text, ids = (t.to(dtype) for t in _inputs(cfg, 2, h, w, 1))
        plain[h, w] = ours(x, 400.0, ctx, text, ids)
        ref.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)
        ours.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)
        expected = ref(x, 400.0, ctx, added_cond_kwargs={"text_embeds": text, "time_ids": ids}).sample
        got = ours(x, 400.0, ctx, text, ids)
        # measured 0.0 in both dtypes; bf16's bound is the plain bf16 UNet's (without FreeU it differs from
        # diffusers by up to 1.1e-2 at 16x12 here: one bf16 rounding per op, in another association order)
        assert rel_err(got, expected) <= (TOL if dtype == torch.float32 else 2e-2)
        assert rel_err(got, plain[h, w]) > 1e-2  # FreeU changes the output
        ours.disable_freeu()
        ref.disable_freeu()
        assert torch.equal(ours(x, 400.0, ctx, text, ids), plain[h, w])
    ours.enable_freeu(s1=0.0, s2=0.2, b1=1.3, b2=1.4)
    assert torch.equal(ours(x, 400.0, ctx, text, ids), plain[16, 12])
