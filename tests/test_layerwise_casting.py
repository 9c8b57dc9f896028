"""Layerwise casting (minsdxl.layerwise; load(storage_dtype=)) against diffusers' enable_layerwise_casting /
apply_layerwise_casting: the same layers stored narrow (key by key, at the real SDXL shapes on the meta device, and
for transformers' CLIP encoders), the same rounded numbers (bit for bit, also through a bf16 load), and text2img's
latents against StableDiffusionXLPipeline with its UNet cast the same way."""

import copy

import diffusers
import pytest
import torch
from diffusers.hooks import apply_layerwise_casting
from sdxl_testing import (
    TINY_UNET,
    TINY_VAE,
    diffusers_unet_config,
    diffusers_vae_config,
    kohya_lora,
    lora_layers,
    minsdxl_from_pipe,
    random_lora_pairs,
    rel_err,
)

import minsdxl
from minsdxl import layerwise
from minsdxl.config import UNET_PRESETS, VAE_PRESETS, ControlNetConfig
from minsdxl.controlnet import ControlNetModel, controlnet_config_json
from minsdxl.unet import UNet2DConditionModel
from minsdxl.vae import AutoencoderKL

CONTROLNET = ControlNetConfig(**vars(UNET_PRESETS["base"]))  # controlnet-canny-sdxl-1.0's shapes
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
KW = dict(prompt="a red fox", negative_prompt="blurry", num_inference_steps=4, height=64, width=64)
# test_pipelines.py's bound on the final latents (fp32 CPU kernels summing in another order); the fp8 rounding
# itself moves them by ~0.1 (asserted below), three orders more
LATENT_TOL = 1e-4


def _narrow(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if v.dtype.itemsize == 1}


# (ours, diffusers') at SDXL's real shapes
BUILDERS = {
    "unet": lambda: (UNet2DConditionModel(UNET_PRESETS["base"]), _diffusers_unet(UNET_PRESETS["base"])),
    "refiner_unet": lambda: (UNet2DConditionModel(UNET_PRESETS["refiner"]), _diffusers_unet(UNET_PRESETS["refiner"])),
    "vae": lambda: (
        AutoencoderKL(VAE_PRESETS["sdxl"]),
        diffusers.AutoencoderKL(**diffusers_vae_config(VAE_PRESETS["sdxl"])),
    ),
    "controlnet": lambda: (ControlNetModel(CONTROLNET), diffusers.ControlNetModel(**controlnet_json(CONTROLNET))),
}


@pytest.mark.parametrize("component", BUILDERS)
def test_same_layers_as_diffusers_at_sdxl_shapes(component):
    """Which tensors go narrow, key by key: diffusers' default skips ("norm", a top-level proj_in / proj_out)."""
    with torch.device("meta"):
        a, b = BUILDERS[component]()
    layerwise.enable(a, torch.float8_e4m3fn, torch.float32)
    b.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    ours_sd, theirs_sd = a.state_dict(), b.state_dict()
    assert set(ours_sd) == set(theirs_sd)
    assert sorted(_narrow(ours_sd)) == sorted(_narrow(theirs_sd))
    assert len(_narrow(ours_sd)) > len(ours_sd) / 2  # not vacuous: most tensors are narrow
    assert all(v.dtype == torch.float32 for k, v in ours_sd.items() if k not in _narrow(ours_sd))


def controlnet_json(cfg):
    return {k: v for k, v in controlnet_config_json(cfg).items() if not k.startswith("_")}


def _diffusers_unet(cfg):
    return diffusers.UNet2DConditionModel(**diffusers_unet_config(cfg))


def test_unet_weights_in_float8_are_a_quarter():
    """The memory claim of load's docstring: SDXL's UNet holds 2.6 GB of weights in float8 (10.3 GB in fp32)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(UNET_PRESETS["base"])
    full = sum(p.numel() * 4 for p in unet.parameters())
    layerwise.enable(unet, torch.float8_e4m3fn, torch.float32)
    narrow = sum(p.numel() * p.element_size() for p in unet.parameters())
    assert 10.2e9 < full < 10.4e9 and 2.55e9 < narrow < 2.7e9, (full, narrow)


def test_text_encoders_as_apply_layerwise_casting(tiny_base):
    """A text encoder cast with minsdxl.layerwise.enable = transformers' CLIP under diffusers' apply_layerwise_casting
    (the token embedding too: looked up, then upcast), keys, dtypes and hidden states."""
    pipe = tiny_base[0]
    model = minsdxl_from_pipe(pipe)
    for name in ("text_encoder", "text_encoder_2"):
        theirs = copy.deepcopy(getattr(pipe, name))
        apply_layerwise_casting(theirs, torch.float8_e4m3fn, torch.float32, skip_modules_pattern="auto")
        ours = layerwise.enable(getattr(model, name), torch.float8_e4m3fn)
        a, b = ours.state_dict(), theirs.state_dict()
        assert sorted(_narrow(a)) == sorted(_narrow(b)) and _narrow(a)
        assert any("token_embedding" in k for k in _narrow(a))
        assert all(torch.equal(a[k].float(), b[k].float()) for k in _narrow(a))
        ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(0))
        want = theirs(ids, output_hidden_states=True).hidden_states[-2]
        got = ours(ids)[0]  # SDXL's penultimate layer
        assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("storage", FP8, ids=["e4m3fn", "e5m2"])
def test_text2img_equals_diffusers(tiny_base, storage):
    """load(storage_dtype=) against StableDiffusionXLPipeline with unet.enable_layerwise_casting: the same latents."""
    pipe, folder = tiny_base
    unet = copy.deepcopy(pipe.unet)
    unet.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
    theirs = diffusers.StableDiffusionXLPipeline(**{**pipe.components, "unet": unet})
    theirs.set_progress_bar_config(disable=True)
    model = minsdxl.load(folder, storage_dtype=storage)
    assert model.unet.dtype == torch.float32 and model.vae.dtype == torch.float32
    assert {str(p.dtype) for p in model.unet.parameters()} == {str(storage), "torch.float32"}
    gen = torch.Generator
    want = theirs(**KW, generator=gen().manual_seed(3), output_type="latent").images
    got = minsdxl.text2img(model, **KW, generator=gen().manual_seed(3), output_type="latent", progress=False)
    assert rel_err(got, want) < LATENT_TOL
    plain = minsdxl.text2img(minsdxl.load(folder), **KW, generator=gen().manual_seed(3), output_type="latent")
    assert rel_err(got, plain) > 1e-2  # the storage really rounds what the UNet computes with


def test_bf16_load_rounds_as_diffusers(tiny_base):
    """dtype=bfloat16 with float8 storage: each weight rounded to bf16 first, then to float8 (diffusers loads in
    torch_dtype, then casts): bit for bit the state dict diffusers holds, and its UNet's output."""
    folder = tiny_base[1]
    theirs = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.bfloat16)
    theirs.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    model = minsdxl.load(folder, dtype=torch.bfloat16, storage_dtype=torch.float8_e4m3fn)
    a, b = model.unet.state_dict(), theirs.state_dict()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k].float(), b[k].float()) for k in b)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.bfloat16)
    ctx = torch.randn(2, 77, TINY_UNET.cross_attention_dim, generator=g, dtype=torch.bfloat16)
    emb = torch.randn(2, TINY_UNET.projection_class_embeddings_input_dim - 6 * 8, generator=g, dtype=torch.bfloat16)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2, dtype=torch.bfloat16)
    cond = {"text_embeds": emb, "time_ids": ids}
    want = theirs(x, 500, ctx, added_cond_kwargs=cond).sample
    got = model.unet(x, torch.tensor(500), ctx, emb, ids)
    # bf16 on the CPU: the two UNets' kernels round differently (test_unet's bf16 bound)
    assert rel_err(got.float(), want.float()) < 2e-2


def test_lora_merges_into_float8_and_unloads_exactly(tiny_base):
    """A LoRA on a float8-stored UNet: merged in fp32 and rounded into the storage (A1111's FP8 weight with a
    LoRA); unloading gives back the very float8 weights."""
    model = minsdxl.load(tiny_base[1], storage_dtype=torch.float8_e4m3fn)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    layers = [x for x in lora_layers(model) if x[0] == "unet"]
    pairs = random_lora_pairs(layers, rank=4, seed=1)
    minsdxl.load_lora_weights(model, kohya_lora(model, pairs, alpha=4))
    after = model.unet.state_dict()
    changed = [k for k in after if not torch.equal(after[k].float(), before[k].float())]
    assert changed and all(after[k].dtype == before[k].dtype for k in after)
    module, (down, up) = next((m, p) for (_, m), p in pairs.items() if m.endswith("attn1.to_q"))
    w, scale = after[f"{module}.weight"], 4 / down.shape[0]  # alpha / rank
    assert w.dtype == torch.float8_e4m3fn
    want = (before[f"{module}.weight"].float() + scale * up @ down).to(w.dtype)
    assert torch.equal(w.float(), want.float())
    minsdxl.unload_lora_weights(model)
    assert all(torch.equal(v.float(), before[k].float()) for k, v in model.unet.state_dict().items())


def test_compile_equals_eager(tiny_base):
    """minsdxl.compile (fullgraph) over float8-stored layers: the casts trace; no graph break, eager's output."""
    model = minsdxl.load(tiny_base[1], storage_dtype=torch.float8_e4m3fn)
    kw = dict(KW, num_inference_steps=2, output_type="latent", progress=False)
    eager = minsdxl.text2img(model, **kw, generator=torch.Generator().manual_seed(0))
    minsdxl.compile(model, text_encoders=False)
    got = minsdxl.text2img(model, **kw, generator=torch.Generator().manual_seed(0))
    assert rel_err(got, eager) < 1e-5


def test_bad_storage_is_refused(tiny_base):
    folder = tiny_base[1]
    with pytest.raises(ValueError, match=r"storage_dtype must be a floating torch dtype .*torch.int8"):
        minsdxl.load(folder, storage_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"compute dtype must be a floating torch dtype .*None"):
        minsdxl.load(folder, dtype=None, storage_dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"dtype=torch.float8_e4m3fn is the dtype the model computes in"):
        minsdxl.load(folder, dtype=torch.float8_e4m3fn)  # not a stack trace from the first float8 addition
    with pytest.raises(ValueError, match=r"compute dtype must be a floating torch dtype .*float8_e5m2"):
        layerwise.enable(torch.nn.Linear(2, 2), torch.float8_e4m3fn, torch.float8_e5m2)
    with torch.device("meta"):
        vae = AutoencoderKL(TINY_VAE)
    layerwise.enable(vae, torch.float8_e5m2)
    with pytest.raises(ValueError, match="already on for this module .* load the model again"):
        layerwise.enable(vae, torch.float8_e4m3fn)
