"""Perturbed-Attention Guidance (arXiv:2403.17377) parity with diffusers' StableDiffusionXLPAGPipeline,
-Img2Img and -Inpaint on tiny random weights: pag_scale / pag_adaptive_scale / pag_applied_layers as
call arguments of text2img, img2img and inpaint. Bound: final latents within 1e-4 relative, as
test_pipelines (~1e-6 measured)."""

import copy

import diffusers
import pytest
import torch
from sdxl_testing import box_mask as _mask
from sdxl_testing import rel_err
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
    assert rel_err(plain, ref) > 1e-4
    assert all(m.pag == 0 for m in model.unet.modules() if hasattr(m, "pag"))


def test_bad_pag_arguments(models, tmp_path):
    model = models["base"][1]
    kw = dict(prompt="a cat", num_inference_steps=2, output_type="latent", progress=False, **SIZE)
    cases = [
        (dict(pag_scale=3.0, pag_applied_layers="down_blocks.7"), "no self-attention layer of the UNet matches"),
        (dict(pag_scale=-1.0), "must be >= 0"),
        (dict(pag_scale=3.0, pag_applied_layers=[3]), "layer names are strings"),
        (dict(pag_scale="3"), "pag_scale must be a number"),
    ]
    for extra, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            minsdxl.text2img(model, **kw, **extra)
