"""Guidance-distilled UNets (diffusers' time_cond_proj_dim, e.g. latent-consistency/lcm-sdxl): the guidance
scale enters the UNet as an embedding added to the time embedding's input, and there is no classifier-free
guidance. Against diffusers' SDXL pipelines (their step 9, get_guidance_scale_embedding) on a tiny UNet with
random weights, loaded by minsdxl from the saved diffusers folder."""

import diffusers
import pytest
import torch
from sdxl_testing import box_mask, randomize_, rel_err, smooth_image, tiny_pipeline

import minsdxl
from minsdxl.unet import guidance_scale_embedding

COND_DIM = 32


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lcm_unet")
    pipe = tiny_pipeline("base", root / "tokenizers")
    unet = diffusers.UNet2DConditionModel(**{**pipe.unet.config, "time_cond_proj_dim": COND_DIM})
    pipe = diffusers.StableDiffusionXLPipeline(**{**pipe.components, "unet": randomize_(unet, 5).eval()})
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "model", safe_serialization=True)
    return pipe, minsdxl.load(root / "model"), root


@pytest.mark.parametrize("dim", [32, 33, 256])
def test_guidance_scale_embedding_equals_diffusers(dim):
    w = torch.tensor([0.0, 1.5, 7.0])
    ref = diffusers.StableDiffusionXLPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    assert torch.equal(guidance_scale_embedding(w, dim), ref)


KW = dict(prompt="a red circle", num_inference_steps=3, height=64, width=64)


@pytest.mark.parametrize("scheduler", ["euler", "lcm"])
def test_text2img_equals_diffusers(lcm, scheduler):
    pipe, model, _ = lcm
    assert model.unet.config.time_cond_proj_dim == COND_DIM  # read from the folder's weights and config
    if scheduler == "lcm":
        pipe = diffusers.StableDiffusionXLPipeline(
            **{**pipe.components, "scheduler": diffusers.LCMScheduler.from_config(pipe.scheduler.config)}
        )
        pipe.set_progress_bar_config(disable=True)
    kw = dict(KW, guidance_scale=6.0, negative_prompt="blue")  # no CFG: the negative prompt is not used
    ref = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="latent").images
    got = minsdxl.text2img(model, **kw, scheduler=scheduler, seed=0, output_type="latent", progress=False)
    assert rel_err(got, ref) <= 1e-5
    other = minsdxl.text2img(model, **dict(kw, guidance_scale=2.0), scheduler=scheduler, seed=0, output_type="latent",
                             progress=False)  # fmt: skip
    assert rel_err(other, got) > 1e-3  # the scale is the UNet's input now


@pytest.mark.parametrize("fn", ["img2img", "inpaint"])
def test_img2img_and_inpaint_equal_diffusers(lcm, fn):
    pipe, model, _ = lcm
    cls = diffusers.StableDiffusionXLImg2ImgPipeline if fn == "img2img" else diffusers.StableDiffusionXLInpaintPipeline
    ref_pipe = cls(**pipe.components)
    ref_pipe.set_progress_bar_config(disable=True)
    kw = dict(KW, guidance_scale=4.0, image=smooth_image(3), strength=0.7)
    if fn == "inpaint":
        kw["mask_image"] = box_mask()
    ref = ref_pipe(**kw, generator=torch.Generator().manual_seed(1), output_type="latent").images
    got = getattr(minsdxl, fn)(model, **kw, seed=1, output_type="latent", progress=False)
    assert rel_err(got, ref) <= 1e-5


def test_text2img_with_a_controlnet_equals_diffusers(lcm):
    """StableDiffusionXLControlNetPipeline embeds the scale for the UNet (not for the ControlNet, which gets no
    timestep_cond) and runs no CFG: so does minsdxl. (diffusers' ControlNet img2img / inpaint pipelines do not
    read time_cond_proj_dim: they run CFG and no embedding, which minsdxl does not copy: there it embeds as in
    the plain img2img / inpaint pipelines.)"""
    pipe, model, root = lcm
    # (from_unet cannot copy a guidance-distilled UNet: the ControlNet it makes has no cond_proj to load)
    plain_unet = diffusers.UNet2DConditionModel(**{**pipe.unet.config, "time_cond_proj_dim": None})
    net = diffusers.ControlNetModel.from_unet(plain_unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    net = randomize_(net, 6)
    net.eval().save_pretrained(root / "cn")
    ref_pipe = diffusers.StableDiffusionXLControlNetPipeline(**pipe.components, controlnet=net)
    ref_pipe.set_progress_bar_config(disable=True)
    kw = dict(KW, guidance_scale=5.0, image=smooth_image(4), controlnet_conditioning_scale=0.8)
    ref = ref_pipe(**kw, generator=torch.Generator().manual_seed(2), output_type="latent").images
    ours = minsdxl.load_controlnet(root / "cn")
    got = minsdxl.text2img(model, **kw, controlnet=ours, seed=2, output_type="latent", progress=False)
    assert rel_err(got, ref) <= 1e-5
    plain = minsdxl.text2img(model, **dict(KW, guidance_scale=5.0), seed=2, output_type="latent", progress=False)
    assert rel_err(got, plain) > 1e-3  # the ControlNet took part


def test_saving_and_the_unet_call(lcm, tmp_path):
    pipe, model, root = lcm
    minsdxl.checkpoint.save(model, tmp_path / "again")
    again = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "again" / "unet")
    assert again.config.time_cond_proj_dim == COND_DIM
    with pytest.raises(ValueError, match="single-file layout has no name for its time_embedding.cond_proj"):
        minsdxl.checkpoint.save_single_file(model, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, model.unet.config.cross_attention_dim)
    pooled, ids = torch.randn(1, 32), torch.tensor([[64.0, 64, 0, 0, 64, 64]])
    with pytest.raises(ValueError, match="timestep_cond .* goes with a guidance-distilled UNet"):
        model.unet(x, 999, ctx, pooled, ids)
