"""DeepCache (minsdxl.deepcache) against the DeepCache package's DeepCacheSDHelper on diffusers' SDXL pipelines:
the same tiny random weights, seed, cache interval and branch (1e-4 on the final latents, test_pipelines.py's
bound: the package caches diffusers' module outputs, minsdxl the features entering the shallow branch)."""

import copy

import diffusers
import pytest
import torch
from DeepCache import DeepCacheSDHelper
from sdxl_testing import box_mask, minsdxl_from_pipe, randomize_, rel_err, smooth_image

import minsdxl
from minsdxl import deepcache

LATENT_TOL = 1e-4
KW = dict(prompt="a red fox", negative_prompt="blurry", num_inference_steps=7, height=64, width=64, guidance_scale=5.0)


@pytest.fixture(scope="module")
def pair(tiny_base):
    pipe = tiny_base[0]
    pipe.set_progress_bar_config(disable=True)
    return pipe, minsdxl_from_pipe(pipe)


def _package(pipe, interval, branch, **kw):
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return pipe(**kw, generator=torch.Generator().manual_seed(1), output_type="latent").images
    finally:
        helper.disable()


def _ours(model, fn, interval, branch, **kw):
    deepcache.enable(model, cache_interval=interval, cache_branch_id=branch)
    try:
        return fn(model, **kw, generator=torch.Generator().manual_seed(1), output_type="latent", progress=False)
    finally:
        deepcache.disable(model)


# every branch of the tiny UNet's 3 levels (0-2 without attention, 3-8 with), intervals 2 to 4
@pytest.mark.parametrize("interval,branch", [(3, 0), (2, 1), (3, 2), (2, 3), (4, 4), (3, 5), (2, 7), (3, 8)])
def test_text2img_equals_the_deepcache_package(pair, interval, branch):
    pipe, model = pair
    expected = _package(pipe, interval, branch, **KW)
    got = _ours(model, minsdxl.text2img, interval, branch, **KW)
    assert rel_err(got, expected) <= LATENT_TOL
    plain = minsdxl.text2img(model, **KW, generator=torch.Generator().manual_seed(1), output_type="latent")
    assert rel_err(got, plain) > 1e-3  # the cached steps did differ
    assert model.unet.deepcache is None


def test_img2img_and_a_controlnet_equal_the_deepcache_package(pair, tmp_path):
    """img2img: the package counts from the first timestep it sees; a ControlNet runs every step, its
    residuals added to the skips the shallow branch computes."""
    pipe, model = pair
    kw = {**KW, "image": smooth_image(3), "strength": 0.7}
    img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    assert rel_err(_ours(model, minsdxl.img2img, 2, 4, **kw), _package(img2img, 2, 4, **kw)) <= LATENT_TOL
    net = diffusers.ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    randomize_(net, 5).eval().save_pretrained(tmp_path / "controlnet")
    components = {**pipe.components, "unet": copy.deepcopy(pipe.unet), "controlnet": net}
    control = diffusers.StableDiffusionXLControlNetPipeline(**components)
    control.set_progress_bar_config(disable=True)
    kw = {**KW, "image": smooth_image(4), "controlnet_conditioning_scale": 0.8}
    model = minsdxl_from_pipe(control)  # (the deepcopied UNet: the package wraps that pipeline's)
    ours = minsdxl.load_controlnet(tmp_path / "controlnet")
    got = _ours(model, minsdxl.text2img, 3, 4, **kw, controlnet=ours)
    assert rel_err(got, _package(control, 3, 4, **kw)) <= LATENT_TOL


def test_the_cache_lives_for_one_call_and_one_batch(pair):
    """A second call starts afresh (not from the last call's features); when a step callback ends CFG the
    batch halves and the next step runs the whole UNet, then caches again."""
    _, model = pair
    deepcache.enable(model, cache_interval=3, cache_branch_id=3)
    reused = []
    unet = model.unet
    hook = unet.register_forward_pre_hook(lambda m, args: reused.append(m.deepcache.reuse(m.conv_in(args[0]))))
    try:
        other = minsdxl.text2img(model, **{**KW, "prompt": "a cat"}, seed=4, output_type="latent")
        first = minsdxl.text2img(model, **KW, seed=2, output_type="latent")
        assert unet.deepcache.features is None  # dropped at the end of the call
        reused.clear()

        def cutoff(pipe, i, t, kw):
            if i == 3:
                pipe._guidance_scale = 1.0
            return {}

        minsdxl.text2img(model, **KW, seed=2, output_type="latent", callback_on_step_end=cutoff)
    finally:
        hook.remove()
        deepcache.disable(model)
    assert reused == [False, True, True, False, False, True, False]  # step 4: a batch of 1, no cache of it
    deepcache.enable(model, cache_interval=3, cache_branch_id=3)
    alone = minsdxl.text2img(model, **KW, seed=2, output_type="latent")
    deepcache.disable(model)
    assert torch.equal(first, alone) and not torch.equal(first, other)


def test_inpaint_runs_and_disable_restores(tiny_inpaint):
    model = minsdxl.load(tiny_inpaint[1])
    kw = dict(prompt="a cat", image=smooth_image(2), mask_image=box_mask(), strength=0.8, seed=0, output_type="latent")
    plain = minsdxl.inpaint(model, **kw)
    deepcache.enable(model, cache_interval=2, cache_branch_id=0)
    cached = minsdxl.inpaint(model, **kw)
    deepcache.disable(model)
    assert rel_err(cached, plain) > 1e-3 and torch.equal(minsdxl.inpaint(model, **kw), plain)


def test_bad_settings_are_refused(pair, tmp_path):
    _, model = pair
    for bad in (dict(cache_interval=0), dict(cache_interval=2.5), dict(cache_branch_id=9), dict(cache_branch_id=-1)):
        with pytest.raises(ValueError, match="cache_interval|cache_branch_id must be in 0..8"):
            deepcache.enable(model, **bad)
    assert model.unet.deepcache is None
    adapter = diffusers.T2IAdapter(channels=[32, 64, 64, 64], downscale_factor=16, adapter_type="full_adapter_xl")
    randomize_(adapter, 3).save_pretrained(tmp_path / "adapter")
    deepcache.enable(model)
    try:
        with pytest.raises(ValueError, match="T2I-Adapter with DeepCache"):
            minsdxl.text2img(model, **KW, image=smooth_image(1), adapter=minsdxl.load_t2i_adapter(tmp_path / "adapter"))
    finally:
        deepcache.disable(model)


def test_the_command_line(tiny_base, tmp_path, capsys):
    import numpy as np
    import PIL.Image

    from minsdxl.cli import main, read_png_metadata

    out = tmp_path / "d.png"
    argv = ["-p", "a red fox", "--model", str(tiny_base[1]), "--steps", "5", "-s", "3", "-q", "--no-watermark"]
    assert main([*argv, "--deepcache", "2:3", "-o", str(out)]) == 0
    model = deepcache.enable(minsdxl.load(tiny_base[1]), cache_interval=2, cache_branch_id=3)
    made = minsdxl.text2img(model, "a red fox", num_inference_steps=5, seed=3)[0]
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(made))
    assert read_png_metadata(out)["minsdxl"]["args"]["deepcache"] == [2, 3]
    assert main(["--from-png", str(out), "-q", "-o", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "again.png")), np.asarray(made))
    for bad in ("0", "3:9", "x"):
        with pytest.raises(SystemExit):
            main([*argv, "--deepcache", bad])
        assert "--deepcache" in capsys.readouterr().err
