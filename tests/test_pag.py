"""Perturbed-Attention Guidance (arXiv:2403.17377) parity with diffusers' StableDiffusionXLPAGPipeline,
-Img2Img and -Inpaint on tiny random weights: pag_scale / pag_adaptive_scale / pag_applied_layers as
call arguments of text2img, img2img and inpaint. Bound: final latents within 1e-4 relative, as
test_pipelines (~1e-6 measured)."""

import copy

import diffusers
import pytest
import torch
from sdxl_testing import box_mask as _mask
from sdxl_testing import randomize_, rel_err
from sdxl_testing import smooth_image as _image

import minsdxl

LATENT_TOL = 1e-4


@pytest.fixture(scope="module")
def models(tiny_base, tiny_inpaint):
    return {
        "base": (tiny_base[0], minsdxl.load(tiny_base[1])),
        "inpaint": (tiny_inpaint[0], minsdxl.load(tiny_inpaint[1])),
    }


CLASSES = {
    minsdxl.text2img: diffusers.StableDiffusionXLPAGPipeline,
    minsdxl.img2img: diffusers.StableDiffusionXLPAGImg2ImgPipeline,
    minsdxl.inpaint: diffusers.StableDiffusionXLPAGInpaintPipeline,
}
SIZE = dict(height=64, width=64)
CASES = {
    "text2img": ("base", minsdxl.text2img, dict(**SIZE)),
    "no_cfg": ("base", minsdxl.text2img, dict(guidance_scale=1.0, pag_scale=2.0, **SIZE)),
    "adaptive_rescale_layers": (
        "base",
        minsdxl.text2img,
        dict(pag_adaptive_scale=0.004, guidance_rescale=0.5, layers=["mid", "up_blocks.0.attentions.1"], **SIZE),
    ),
    "batch": ("base", minsdxl.text2img, dict(prompt=["a cat", "a dog"], num_images_per_prompt=2, **SIZE)),
    "img2img": ("base", minsdxl.img2img, dict(image=_image(1), strength=0.6)),
    "inpaint_nine_channel": ("inpaint", minsdxl.inpaint, dict(image=_image(2), mask_image=_mask(), **SIZE)),
    "inpaint_four_channel": ("base", minsdxl.inpaint, dict(image=_image(2), mask_image=_mask(), strength=0.8, **SIZE)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(models, case):
    kind, fn, kw = CASES[case]
    kw = dict(prompt="a cat", num_inference_steps=4, pag_scale=3.0) | kw
    layers = kw.pop("layers", "mid")
    pipe, model = models[kind]
    # (a copy of the session's diffusers UNet: for output_type="latent" the PAG inpaint pipeline returns before
    # it puts the UNet's own attention processors back)
    pipe = CLASSES[fn](**{**pipe.components, "unet": copy.deepcopy(pipe.unet)}, pag_applied_layers=layers)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="latent").images
    got = fn(
        model,
        **kw,
        pag_applied_layers=layers,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        progress=False,
    )
    assert got.shape == ref.shape and rel_err(got, ref) <= LATENT_TOL
    # PAG matters, and the layers are left unperturbed after the call
    plain = fn(
        model,
        **{**kw, "pag_scale": 0.0},
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        progress=False,
    )
    assert rel_err(plain, ref) > 1e-3  # 10x LATENT_TOL: the parity bound sees PAG (2.7e-3 to 1.2e-2 measured)
    assert all(getattr(m, "perturb", None) is None for m in model.unet.modules())


@pytest.mark.parametrize("kind", ["text2img", "img2img"])
def test_with_a_controlnet_matches_diffusers(models, tmp_path, kind):
    # = StableDiffusionXLControlNetPAGPipeline / -Img2Img: the control image in every chunk of the batch
    pipe, model = models["base"]
    net = diffusers.ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    randomize_(net, 5).eval().save_pretrained(tmp_path / "controlnet")
    ours = minsdxl.load_controlnet(tmp_path / "controlnet")
    kw = dict(prompt="a cat", num_inference_steps=4, pag_scale=3.0, controlnet_conditioning_scale=0.7)
    if kind == "text2img":
        cls, fn, kw = diffusers.StableDiffusionXLControlNetPAGPipeline, minsdxl.text2img, kw | dict(image=_image(1))
    else:
        cls, fn = diffusers.StableDiffusionXLControlNetPAGImg2ImgPipeline, minsdxl.img2img
        kw |= dict(image=_image(2), control_image=_image(1), strength=0.6)
    components = {**pipe.components, "unet": copy.deepcopy(pipe.unet), "controlnet": net}
    ppipe = cls(**components, pag_applied_layers="mid")
    ppipe.set_progress_bar_config(disable=True)
    ref = ppipe(**kw, generator=torch.Generator().manual_seed(0), output_type="latent").images
    got = fn(
        model, **kw, controlnet=ours, generator=torch.Generator().manual_seed(0), output_type="latent", progress=False
    )
    assert got.shape == ref.shape and rel_err(got, ref) <= LATENT_TOL


def test_with_a_t2i_adapter(models, tmp_path):
    # (no diffusers pipeline combines the two) the adapter's features reach every chunk of the batch: at
    # adapter scale 0 the result is PAG alone, bit for bit; at 1 it differs
    pipe, model = models["base"]
    net = diffusers.T2IAdapter(channels=[32, 64, 64, 64], downscale_factor=16, adapter_type="full_adapter_xl")
    randomize_(net, 3).save_pretrained(tmp_path / "adapter")
    adapter = minsdxl.load_t2i_adapter(tmp_path / "adapter")
    kw = dict(prompt="a cat", num_inference_steps=3, pag_scale=3.0, seed=0, output_type="latent", progress=False)
    alone = minsdxl.text2img(model, **kw, **SIZE)
    zero = minsdxl.text2img(model, **kw, image=_image(1), adapter=adapter, adapter_conditioning_scale=0.0)
    assert torch.equal(zero, alone)
    assert rel_err(minsdxl.text2img(model, **kw, image=_image(1), adapter=adapter), alone) > 1e-2


def test_bad_pag_arguments(models, tmp_path):
    pipe, model = models["base"]
    net = diffusers.ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    net.save_pretrained(tmp_path / "controlnet")
    net = minsdxl.load_controlnet(tmp_path / "controlnet")
    kw = dict(prompt="a cat", num_inference_steps=2, output_type="latent", progress=False, **SIZE)
    cases = [
        (dict(pag_scale=3.0, pag_applied_layers="down_blocks.7"), "no self-attention layer of the UNet matches"),
        (dict(pag_scale=-1.0), "must be >= 0"),
        (dict(pag_scale=3.0, pag_applied_layers=[3]), "layer names are strings"),
        (dict(pag_scale="3"), "pag_scale must be a number"),
        (dict(pag_scale=3.0, guess_mode=True, controlnet=net, image=_image(1)), "ControlNet in guess_mode"),
    ]
    for extra, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            minsdxl.text2img(model, **kw, **extra)
