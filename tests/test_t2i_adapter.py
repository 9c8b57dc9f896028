"""T2I-Adapter parity with diffusers: T2IAdapter (full_adapter_xl) itself, the UNet's
down_intrablock_additional_residuals, and StableDiffusionXLAdapterPipeline against minsdxl.text2img
with adapter=, on tiny random weights (every weight randomised).

Bounds as test_controlnet: the features equal (the same convs in the same order), the UNet within
1e-5 relative, final latents within 1e-4 relative.
"""

import copy

import diffusers
import pytest
import torch
from sdxl_testing import offload_moves, randomize_, rel_err
from sdxl_testing import smooth_image as _image

import minsdxl
from minsdxl.checkpoint import CheckpointError, save_safetensors

LATENT_TOL = 1e-4


def _diffusers_adapter(unet, seed, in_channels=3):
    ch = list(unet.config.block_out_channels)
    net = diffusers.T2IAdapter(
        in_channels=in_channels,
        channels=ch + ch[-1:],
        num_res_blocks=2,
        downscale_factor=16,  # TencentARC's SDXL adapters' (diffusers' default is SD 1.x's 8)
        adapter_type="full_adapter_xl",
    )
    return randomize_(net, seed).eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_base):
    """Three diffusers T2I-Adapters for the tiny base UNet (the third reads grey images, as the sketch
    adapter), saved as diffusers folders, and minsdxl's loads of them."""
    root = tmp_path_factory.mktemp("t2i_adapter")
    pipe = tiny_base[0]
    refs, ours = [], []
    for i, channels in enumerate((3, 3, 1)):
        net = _diffusers_adapter(pipe.unet, 20 + i, channels)
        net.save_pretrained(root / f"adapter{i}")
        refs.append(net)
        ours.append(minsdxl.load_t2i_adapter(root / f"adapter{i}"))
    eight = diffusers.T2IAdapter(channels=[32, 64, 64, 64], downscale_factor=8, adapter_type="full_adapter_xl")
    eight.save_pretrained(root / "eight")
    model = minsdxl.load(tiny_base[1])
    return dict(
        root=root, refs=refs, ours=ours, pipe=pipe, model=model, sd15_shaped=minsdxl.load_t2i_adapter(root / "eight")
    )


def test_features_and_unet_match_diffusers(adapters):
    ref, ours = adapters["refs"][0], adapters["ours"][0]
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        theirs, mine = ref(image), ours(image)
    assert [tuple(f.shape) for f in mine] == [(2, 32, 4, 4), (2, 64, 4, 4), (2, 64, 2, 2), (2, 64, 2, 2)]
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 48, generator=g)
    pooled, ids = torch.randn(2, 32, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    unet = adapters["model"].unet
    with torch.no_grad():
        expected = (
            adapters["pipe"]
            .unet(
                x,
                400,
                ctx,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": ids},
                down_intrablock_additional_residuals=[f.clone() for f in theirs],  # diffusers adds in place
            )
            .sample
        )
        got = unet(x, 400, ctx, pooled, ids, down_intrablock_additional_residuals=mine)
        plain = unet(x, 400, ctx, pooled, ids)
    assert rel_err(got, expected) <= 1e-5
    assert rel_err(plain, expected) > 1e-2  # the features matter


CASES = {
    "default": dict(),
    "scale_and_factor": dict(adapter_conditioning_scale=0.7, adapter_conditioning_factor=0.5),
    "size_from_image": dict(image=_image(3, (96, 64))),  # 96x64: multiples of the adapter's 16
    "height_width": dict(image=_image(3, (96, 80)), height=64, width=80),
    "images_per_prompt": dict(num_images_per_prompt=2),
    "no_cfg": dict(guidance_scale=1.0),
    "denoising_end": dict(denoising_end=0.6, adapter_conditioning_factor=0.5),  # the factor counts the cut steps
    "two_adapters": dict(nets=2, image=[_image(1), _image(2)], adapter_conditioning_scale=[0.6, 0.9]),
    "grey_sketch": dict(nets="grey", image=_image(4, mode="L")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_text2img_matches_diffusers(adapters, case):
    kw = dict(prompt="a cat", num_inference_steps=4, image=_image(1)) | CASES[case]
    nets = kw.pop("nets", 1)
    pick = {1: [0], 2: [0, 1], "grey": [2]}[nets]
    refs = [adapters["refs"][i] for i in pick]
    ours = [adapters["ours"][i] for i in pick]
    refs, ours = (refs, ours) if nets == 2 else (refs[0], ours[0])
    pipe = diffusers.StableDiffusionXLAdapterPipeline(
        **adapters["pipe"].components, adapter=diffusers.MultiAdapter(refs) if nets == 2 else refs
    )
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="latent").images
    got = minsdxl.text2img(
        adapters["model"],
        **kw,
        adapter=ours,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        progress=False,
    )
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= LATENT_TOL


def test_adapter_changes_the_image_and_scale_zero_adds_zeros(adapters, tiny_base):
    model, ad = adapters["model"], adapters["ours"][0]
    kw = dict(prompt="a cat", num_inference_steps=3, output_type="latent", progress=False, seed=0)
    plain = minsdxl.text2img(model, **kw, height=64, width=64)
    assert rel_err(minsdxl.text2img(model, **kw, image=_image(1), adapter=ad), plain) > 1e-2
    assert torch.equal(
        minsdxl.text2img(model, **kw, image=_image(1), adapter=ad, adapter_conditioning_scale=0.0), plain
    )
    # beside a ControlNet (which then takes control_image=): at scale 0 the ControlNet's image exactly
    unet = adapters["pipe"].unet
    cnet = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    randomize_(cnet, 5).save_pretrained(adapters["root"] / "controlnet")
    cnet = minsdxl.load_controlnet(adapters["root"] / "controlnet")
    control = minsdxl.text2img(model, **kw, image=_image(2), controlnet=cnet)
    both = dict(image=_image(1), adapter=ad, control_image=_image(2), controlnet=cnet)
    assert torch.equal(minsdxl.text2img(model, **kw, **both, adapter_conditioning_scale=0.0), control)
    assert rel_err(minsdxl.text2img(model, **kw, **both), control) > 1e-2


def test_loading(adapters, tmp_path):
    ref = adapters["refs"][0]
    sd = ref.state_dict()
    save_safetensors(sd, tmp_path / "adapter.safetensors")
    one = minsdxl.load_t2i_adapter(tmp_path / "adapter.safetensors")
    assert all(torch.equal(one.state_dict()[k], sd[k]) for k in sd)
    copy.deepcopy(ref).to(torch.float16).save_pretrained(tmp_path / "fp16", variant="fp16")
    half = minsdxl.load_t2i_adapter(tmp_path / "fp16", dtype=torch.float16)
    assert half.dtype == torch.float16 and all(torch.equal(half.state_dict()[k], sd[k].half()) for k in sd)
    sd15 = diffusers.T2IAdapter(channels=[32, 64, 64, 64], adapter_type="full_adapter")
    sd15.save_pretrained(tmp_path / "sd15")
    with pytest.raises(CheckpointError, match="'full_adapter' is a Stable Diffusion 1.x adapter"):
        minsdxl.load_t2i_adapter(tmp_path / "sd15")
    save_safetensors({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match="not a T2I-Adapter"):
        minsdxl.load_t2i_adapter(tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        minsdxl.load_t2i_adapter(tmp_path / "nope")


def test_bad_inputs(adapters, tiny_refiner):
    model, ad, grey = adapters["model"], adapters["ours"][0], adapters["ours"][2]
    kw = dict(prompt="a cat", num_inference_steps=2, output_type="latent", progress=False)
    cases = [
        (dict(adapter=ad), "needs its control image: pass image="),
        (dict(adapter=[ad, ad], image=_image(1)), "2 T2I-Adapters need a list of 2 images"),
        (dict(adapter=ad, image=_image(1), height=72, width=64), r"multiples of 16 \(>= 16\); got 72x64"),
        (dict(adapter=ad, image=_image(1), adapter_conditioning_factor=1.5), r"must be in \[0, 1\]"),
        (dict(adapter="canny", image=_image(1)), "must be a minsdxl T2IAdapter"),
        (dict(adapter_conditioning_scale=0.5), "is for a T2I-Adapter: pass adapter="),
        (dict(adapter=adapters["sd15_shaped"], image=_image(1)), "downscales by 8; an SDXL UNet needs 16"),
        (dict(adapter=grey, image=_image(1)), r"reads a grey image: pass image.convert\('L'\)"),
    ]
    for extra, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            minsdxl.text2img(model, **kw, **extra)
    refiner_unet = minsdxl.load(tiny_refiner[1], share=model)
    refiner_unet.requires_aesthetics_score = False  # only to reach the adapter check with a 4-level UNet
    with pytest.raises(ValueError, match="the model's UNet needs"):
        minsdxl.text2img(refiner_unet, **kw, adapter=ad, image=_image(1))


def test_model_offload_moves_the_adapter_while_it_runs(adapters, tiny_base):
    model, ad = minsdxl.load(tiny_base[1]), minsdxl.load_t2i_adapter(adapters["root"] / "adapter0")
    kw = dict(prompt="a cat", num_inference_steps=2, seed=0, output_type="latent", progress=False, image=_image(1))
    moves, want, got = offload_moves(model, ad, lambda: minsdxl.text2img(model, **kw, adapter=ad))
    assert moves == ["cpu:0"] and ad.device == torch.device("cpu")
    assert rel_err(got, want) <= 1e-5  # the move copies weights into new buffers: last-bit changes at most
