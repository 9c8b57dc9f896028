"""End-to-end parity with diffusers' SDXL pipelines: same tiny random weights, same seed, fp32 CPU.

Bounds (the issue's): final latents max|delta| <= 1e-4 * max|ref| (a few steps of fp32 arithmetic in
a different association order compound to ~1e-6; the bound leaves room for that, not for a wrong
formula), and uint8 images within 1 level on >= 99.9 % of pixels (rounding at .5 boundaries).
"""

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from sdxl_testing import minsdxl_from_pipe, rel_err

import minsdxl

LATENT_TOL = 1e-4
SIZE = dict(height=64, width=64)


@pytest.fixture(scope="module")
def models(tiny_base, tiny_refiner, tiny_inpaint):
    base = minsdxl.load(tiny_base[1])
    return {
        "base": (tiny_base[0], base),
        # the refiner sharing the base's text_encoder_2 and VAE, in both libraries (the fixtures' differ)
        "refiner": (_refiner_sharing_base(tiny_refiner[0], tiny_base[0]), minsdxl.load(tiny_refiner[1], share=base)),
        "refiner_own": (tiny_refiner[0], minsdxl.load(tiny_refiner[1])),
        "inpaint": (tiny_inpaint[0], minsdxl.load(tiny_inpaint[1])),
    }


def _with_scheduler(pipe, name):
    cfg = pipe.scheduler.config
    sched = {
        "euler": lambda: diffusers.EulerDiscreteScheduler.from_config(cfg),
        "euler_a": lambda: diffusers.EulerAncestralDiscreteScheduler.from_config(cfg),
        "ddim": lambda: diffusers.DDIMScheduler.from_config(cfg),
        "dpmpp_2m": lambda: diffusers.DPMSolverMultistepScheduler.from_config(cfg),
        "dpmpp_2m_karras": lambda: diffusers.DPMSolverMultistepScheduler.from_config(cfg, use_karras_sigmas=True),
        "heun": lambda: diffusers.HeunDiscreteScheduler.from_config(cfg),
        "unipc": lambda: diffusers.UniPCMultistepScheduler.from_config(cfg),
        "deis": lambda: diffusers.DEISMultistepScheduler.from_config(cfg),
        "dpm2_karras": lambda: diffusers.KDPM2DiscreteScheduler.from_config(cfg, use_karras_sigmas=True),
        "dpm2_a": lambda: diffusers.KDPM2AncestralDiscreteScheduler.from_config(cfg),
        "lms": lambda: diffusers.LMSDiscreteScheduler.from_config(cfg),
        "lms_karras": lambda: diffusers.LMSDiscreteScheduler.from_config(cfg, use_karras_sigmas=True),
        "lcm": lambda: diffusers.LCMScheduler.from_config(cfg),
        "tcd": lambda: diffusers.TCDScheduler.from_config(cfg),
        "dpmpp_2m_sde_karras": lambda: diffusers.DPMSolverMultistepScheduler.from_config(
            cfg, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++"
        ),
        "dpmpp_3m": lambda: diffusers.DPMSolverMultistepScheduler.from_config(cfg, solver_order=3),
        "dpmpp_2s_karras": lambda: diffusers.DPMSolverSinglestepScheduler.from_config(cfg, use_karras_sigmas=True),
        "dpmpp_3s_sde": lambda: diffusers.DPMSolverSinglestepScheduler.from_config(
            cfg, solver_order=3, algorithm_type="sde-dpmsolver++"
        ),
        "dpmpp_3m_sde_karras": lambda: diffusers.DPMSolverMultistepScheduler.from_config(
            cfg, solver_order=3, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++"
        ),
    }[name]()
    return type(pipe)(**{**pipe.components, "scheduler": sched})


def _run_both(pipe, model, fn, seed=0, scheduler=None, **kw):
    if scheduler is not None:
        pipe = _with_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(**kw, generator=torch.Generator().manual_seed(seed), output_type="latent").images
    got = fn(
        model,
        **kw,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        progress=False,
        scheduler=scheduler,
    )
    return ref, got


def _assert_close(ref, got):
    assert got.shape == ref.shape
    err = rel_err(got, ref)
    assert err <= LATENT_TOL, f"final latents differ: relative error {err:.2e}"


def _assert_images_close(ref_pil, got_pil):
    a = np.stack([np.asarray(i, dtype=np.int16) for i in ref_pil])
    b = np.stack([np.asarray(i, dtype=np.int16) for i in got_pil])
    assert a.shape == b.shape
    diff = np.abs(a - b)
    # 1e-6 latent noise flips a value sitting at .5 by one level, on at most 0.1 % of them; never more than 2
    assert diff.max() <= 2 and (diff > 1).mean() <= 0.001


def _image(seed=0, size=(64, 64)):
    rng = np.random.default_rng(seed)
    # smooth random picture: a coarse grid upsampled, so the VAE sees structure, not white noise
    coarse = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return PIL.Image.fromarray(coarse).resize(size, PIL.Image.BILINEAR)


def _mask(size=(64, 64)):
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    m[size[1] // 4 : 3 * size[1] // 4, size[0] // 4 : 3 * size[0] // 2 // 2 + size[0] // 4] = 255
    return PIL.Image.fromarray(m)


TEXT2IMG_CASES = {
    "default": dict(prompt="a red circle"),
    "non_square": dict(prompt="a red circle", height=64, width=96),
    "negative_empty": dict(prompt="a red circle", negative_prompt=""),
    "negative_text": dict(prompt="a red circle", negative_prompt="blurry", negative_prompt_2="dark"),
    "prompt_2": dict(prompt="a red circle", prompt_2="on a white background"),
    "micro_conditioning": dict(
        prompt="a cat",
        original_size=(512, 768),
        crops_coords_top_left=(16, 32),
        target_size=(64, 64),
        negative_original_size=(256, 256),
        negative_crops_coords_top_left=(8, 0),
        negative_target_size=(128, 128),
    ),
    "guidance_rescale": dict(prompt="a cat", guidance_rescale=0.7),
    "no_cfg": dict(prompt="a cat", guidance_scale=1.0),
    "batch": dict(prompt=["a cat", "a dog"], negative_prompt=["ugly", "blurry"], num_images_per_prompt=2),
    "clip_skip": dict(prompt="a cat", clip_skip=1),
}


@pytest.mark.parametrize("case", list(TEXT2IMG_CASES))
def test_text2img(models, case):
    pipe, model = models["base"]
    kw = {**SIZE, "num_inference_steps": 3, **TEXT2IMG_CASES[case]}
    _assert_close(*_run_both(pipe, model, minsdxl.text2img, **kw))


@pytest.mark.parametrize(
    "scheduler",
    [
        "euler",
        "euler_a",
        "ddim",
        "dpmpp_2m",
        "dpmpp_2m_karras",
        "dpmpp_2m_sde_karras",
        "dpmpp_3m",
        "dpmpp_3m_sde_karras",
        "dpmpp_2s_karras",
        "dpmpp_3s_sde",
        "heun",
        "unipc",
        "deis",
        "dpm2_karras",
        "dpm2_a",
        "lms",
        "lms_karras",
        "lcm",
        "tcd",
    ],
)
def test_text2img_every_scheduler(models, scheduler):
    pipe, model = models["base"]
    steps = (
        6 if "3m" in scheduler or "3s" in scheduler else 4
    )  # 4 steps run 3M at orders 1, 2, 2, 1; 6 at 1, 2, 3, 3, 2, 1
    _assert_close(
        *_run_both(
            pipe, model, minsdxl.text2img, scheduler=scheduler, prompt="a cat", num_inference_steps=steps, **SIZE
        )
    )


def test_tcd_takes_the_calls_eta(models):
    # = prepare_extra_step_kwargs: a pipeline passes its eta to TCD's step (its gamma; 0 by default)
    pipe, model = models["base"]
    kw = dict(scheduler="tcd", prompt="a cat", num_inference_steps=4, **SIZE)
    ref, got = _run_both(pipe, model, minsdxl.text2img, eta=0.3, **kw)
    _assert_close(ref, got)
    assert rel_err(got, _run_both(pipe, model, minsdxl.text2img, **kw)[1]) > 1e-3  # eta changed the path


def test_text2img_images_and_seed(models):
    """PIL output within one level of diffusers'; seed= equals a CPU generator with that seed."""
    pipe, model = models["base"]
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red circle", num_inference_steps=3, **SIZE)
    ref = pipe(**kw, generator=torch.Generator().manual_seed(5)).images
    got = minsdxl.text2img(model, **kw, seed=5, progress=False)
    assert isinstance(got[0], PIL.Image.Image) and got[0].size == (64, 64)
    _assert_images_close(ref, got)
    a = minsdxl.text2img(model, **kw, seed=5, output_type="np", progress=False)
    b = minsdxl.text2img(model, **kw, seed=6, output_type="np", progress=False)
    assert a.shape == (1, 64, 64, 3) and not np.array_equal(a, b)


@pytest.mark.parametrize("scheduler", ["euler", "ddim", "dpmpp_2m"])
def test_zero_terminal_snr_v_prediction(models, scheduler):
    """A v-prediction model trained with zero terminal SNR, as its scheduler_config.json says (NoobAI-XL
    v-pred's: rescale_betas_zero_snr, "trailing"), with guidance_rescale as arXiv:2305.08891 recommends."""
    pipe, _ = models["base"]
    zero_snr = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    euler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, **zero_snr)
    pipe = type(pipe)(**{**pipe.components, "scheduler": euler})
    model = minsdxl_from_pipe(pipe)  # _run_both makes `scheduler` from this config on both sides
    assert model.scheduler_config["rescale_betas_zero_snr"]
    kw = dict(prompt="a cat", num_inference_steps=4, guidance_rescale=0.7, **SIZE)
    _assert_close(*_run_both(pipe, model, minsdxl.text2img, scheduler=scheduler, **kw))


@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("source", ["pil", "latents"])
def test_img2img(models, strength, source):
    pipe, model = models["base"]
    image = _image(1)
    if source == "latents":
        image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    _assert_close(
        *_run_both(
            pipe_img2img(pipe),
            model,
            minsdxl.img2img,
            prompt="a cat",
            image=image,
            strength=strength,
            num_inference_steps=4,
        )
    )


# diffusers' retrieve_timesteps: "Align Your Steps" SDXL sigmas (Euler), a custom timestep list (DPM++ 2M)
CUSTOM_SCHEDULES = {
    "euler-sigmas": ("euler", dict(sigmas=[14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.0])),
    "dpmpp_2m-timesteps": ("dpmpp_2m", dict(timesteps=[999, 750, 500, 250, 50])),
}


@pytest.mark.parametrize("case", list(CUSTOM_SCHEDULES))
def test_custom_schedules(models, case):
    scheduler, custom = CUSTOM_SCHEDULES[case]
    pipe, model = models["base"]
    # num_inference_steps is ignored once a custom schedule is given, as in diffusers
    kw = dict(prompt="a cat", scheduler=scheduler, num_inference_steps=3, **custom)
    _assert_close(*_run_both(pipe, model, minsdxl.text2img, **kw, **SIZE))
    # img2img's strength cut counts the custom steps
    _assert_close(*_run_both(pipe_img2img(pipe), model, minsdxl.img2img, **kw, image=_image(1), strength=0.6))
    with pytest.raises(ValueError, match="either timesteps= or sigmas="):
        minsdxl.text2img(model, "a cat", timesteps=[999, 500], sigmas=[14.6, 0.0], **SIZE)
    with pytest.raises(ValueError, match="the euler_a scheduler takes no custom"):
        minsdxl.text2img(model, "a cat", scheduler="euler_a", **custom, **SIZE)


def pipe_img2img(pipe):
    return diffusers.StableDiffusionXLImg2ImgPipeline(**pipe.components)


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("kind", ["inpaint", "base"])  # 9-channel UNet, and 4-channel latent blending
def test_inpaint(models, kind, strength):
    pipe, model = models[kind]
    if kind == "base":
        pipe = diffusers.StableDiffusionXLInpaintPipeline(**pipe.components)
    _assert_close(
        *_run_both(
            pipe,
            model,
            minsdxl.inpaint,
            prompt="a cat",
            image=_image(2),
            mask_image=_mask(),
            strength=strength,
            num_inference_steps=4,
            **SIZE,
        )
    )


@pytest.mark.parametrize(
    "kind,size,box",
    [
        ("inpaint", (120, 88), (70, 20, 100, 40)),  # wide box in a landscape image: grown in height
        ("base", (80, 112), (10, 30, 24, 90)),  # tall box near the left edge: grown in width, shifted inside
    ],
)
def test_inpaint_padding_mask_crop(models, kind, size, box):
    """padding_mask_crop: the box around the mask (padded, grown to height:width) is inpainted at
    height x width and pasted back where the mask is white; the rest of the image is the original."""
    pipe, model = models[kind]
    if kind == "base":
        pipe = diffusers.StableDiffusionXLInpaintPipeline(**pipe.components)
    pipe.set_progress_bar_config(disable=True)
    image = _image(4, size)
    m = np.zeros(size[::-1], dtype=np.uint8)
    m[box[1] : box[3], box[0] : box[2]] = 255
    m[box[1] : box[1] + 3, box[0] : box[2]] = 128  # a soft edge: blended, not cut
    mask = PIL.Image.fromarray(m)
    kw = dict(prompt="a cat", image=image, mask_image=mask, padding_mask_crop=6, strength=0.8, num_inference_steps=3)
    region = pipe.mask_processor.get_crop_region(mask, 64, 64, pad=6)
    assert minsdxl.image.mask_crop_region(mask, 64, 64, 6) == region
    ref = pipe(**kw, **SIZE, generator=torch.Generator().manual_seed(2)).images
    got = minsdxl.inpaint(model, **kw, **SIZE, seed=2, progress=False)
    assert got[0].size == size
    _assert_images_close(ref, got)
    unmasked = m == 0
    assert np.array_equal(np.asarray(got[0])[unmasked], np.asarray(image)[unmasked])
    assert not np.array_equal(np.asarray(got[0])[~unmasked], np.asarray(image)[~unmasked])
    for bad, match in (
        (dict(padding_mask_crop=-1), "padding_mask_crop must be a whole number"),
        (dict(output_type="latent"), "use output_type='pil'"),
        (dict(image=np.asarray(image) / 255.0), "needs image as one PIL image"),
        (dict(mask_image=PIL.Image.new("L", size)), "all black"),
    ):
        with pytest.raises(ValueError, match=match):
            minsdxl.inpaint(model, **{**kw, **bad}, **SIZE)


def test_mask_crop_region_matches_diffusers():
    # random boxes (at edges too), pads and processing sizes: the box equals get_crop_region's
    rng = np.random.default_rng(0)
    get = diffusers.image_processor.VaeImageProcessor.get_crop_region
    for _ in range(400):
        w, h = (int(v) for v in rng.integers(8, 160, 2))
        x1, y1 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x2, y2 = int(rng.integers(x1 + 1, w + 1)), int(rng.integers(y1 + 1, h + 1))
        m = np.zeros((h, w), dtype=np.uint8)
        m[y1:y2, x1:x2] = rng.integers(1, 256)
        mask = PIL.Image.fromarray(m)
        width, height, pad = int(rng.integers(1, 17)) * 8, int(rng.integers(1, 17)) * 8, int(rng.integers(0, 40))
        assert minsdxl.image.mask_crop_region(mask, width, height, pad) == get(mask, width, height, pad=pad)


def test_fill_resize_and_paste_back_match_diffusers():
    # resize_mode "fill" (bars filled from the edge rows/columns) and apply_overlay (resize_mode "crop",
    # soft-mask blend) on random sizes and aspect ratios: pixel for pixel
    rng = np.random.default_rng(1)
    proc = diffusers.image_processor.VaeImageProcessor()
    for _ in range(30):
        w, h, width, height = (int(v) for v in rng.integers(8, 96, 4))
        img = _image(int(rng.integers(100)), (w, h))
        ours, ref = minsdxl.image.resize_fill(img, width, height), proc._resize_and_fill(img, width, height)
        assert np.array_equal(np.asarray(ours), np.asarray(ref))
        mask = PIL.Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
        x1, y1 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        box = (x1, y1, x1 + int(rng.integers(1, w - x1 + 1)), y1 + int(rng.integers(1, h - y1 + 1)))
        inpainted = _image(int(rng.integers(100)), (width, height))
        ours = minsdxl.image.paste_inpainted(mask, img, inpainted, box)
        assert np.array_equal(np.asarray(ours), np.asarray(proc.apply_overlay(mask, img, inpainted, box)))


def _refiner_sharing_base(rpipe, bpipe):
    """The diffusers refiner with the base's text_encoder_2 and vae, as minsdxl.load(share=base) does."""
    return type(rpipe)(
        **{**rpipe.components, "vae": bpipe.vae, "text_encoder_2": bpipe.text_encoder_2},
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )


def test_base_to_refiner_ensemble(models):
    """denoising_end=0.8 on the base, denoising_start=0.8 on the refiner sharing text_encoder_2 and vae."""
    (bpipe, base), (rpipe, refiner) = models["base"], models["refiner"]  # sharing the base's, both libraries
    kw = dict(prompt="a cat", num_inference_steps=10)
    ref_lat, got_lat = _run_both(bpipe, base, minsdxl.text2img, denoising_end=0.8, **kw, **SIZE)
    _assert_close(ref_lat, got_lat)
    ref, got = _run_both(rpipe, refiner, minsdxl.img2img, image=ref_lat, denoising_start=0.8, **kw)
    _assert_close(ref, got)


def test_base_then_refiner_img2img(models):
    """The second SDXL workflow: a finished base image, refined by img2img at strength 0.3."""
    (bpipe, base), (rpipe, refiner) = models["base"], models["refiner"]  # sharing the base's, both libraries
    bpipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a cat", num_inference_steps=4)
    image = bpipe(**kw, **SIZE, generator=torch.Generator().manual_seed(8)).images
    ours = minsdxl.text2img(base, **kw, **SIZE, seed=8, progress=False)
    _assert_images_close(image, ours)
    _assert_close(*_run_both(rpipe, refiner, minsdxl.img2img, image=image[0], strength=0.3, **kw))


def test_refiner_img2img_and_aesthetic_score(models):
    """Shared with the base (load(share=)) and with its own text_encoder_2 and VAE: each equals diffusers' refiner
    with those components, and the two differ (the fixtures' components do)."""
    outs = []
    for which in ("refiner", "refiner_own"):
        rpipe, refiner = models[which]
        for kw in (dict(), dict(aesthetic_score=7.0, negative_aesthetic_score=2.0)):
            kw |= dict(prompt="a cat", image=_image(3), strength=0.5, num_inference_steps=4)
            ref, got = _run_both(rpipe, refiner, minsdxl.img2img, **kw)
            _assert_close(ref, got)
        outs.append(got)
    assert rel_err(outs[0], outs[1]) > 1e-2


def test_refiner_inpaint(models):
    rpipe, refiner = models["refiner"]
    pipe = diffusers.StableDiffusionXLInpaintPipeline(
        **{**rpipe.components, "text_encoder": None, "tokenizer": None},
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    _assert_close(
        *_run_both(
            pipe,
            refiner,
            minsdxl.inpaint,
            prompt="a cat",
            image=_image(4),
            mask_image=_mask(),
            strength=0.6,
            num_inference_steps=4,
            **SIZE,
        )
    )


@pytest.mark.parametrize("kind", ["base", "refiner", "inpaint"])
def test_full_size_pipelines(kind, tmp_path):
    """All three real SDXL UNet variants with the real-shape text encoders and VAE, a 128x128 image,
    2 steps: text2img (base), img2img (refiner), inpaint (9-channel). Weights are shared, not copied."""
    import gc

    from sdxl_testing import full_size_pipeline, minsdxl_from_pipe

    pipe = full_size_pipeline(kind, tokenizer_root=tmp_path)
    pipe.set_progress_bar_config(disable=True)
    model = minsdxl_from_pipe(pipe)
    assert model.unet.conv_in.weight.data_ptr() == pipe.unet.conv_in.weight.data_ptr()
    kw = dict(prompt="a photo of a cat", num_inference_steps=2)
    if kind == "base":
        ref, got = _run_both(pipe, model, minsdxl.text2img, height=128, width=128, **kw)
    elif kind == "refiner":
        ref, got = _run_both(pipe, model, minsdxl.img2img, image=_image(5, (128, 128)), strength=0.6, **kw)
    else:
        ref, got = _run_both(
            pipe,
            model,
            minsdxl.inpaint,
            image=_image(6, (128, 128)),
            mask_image=_mask((128, 128)),
            height=128,
            width=128,
            strength=1.0,
            **kw,
        )
    _assert_close(ref, got)
    del pipe, model
    gc.collect()


def test_watermark_matches_diffusers(models):
    """invisible-watermark installed: on by default (as diffusers), same bits and method; off with
    add_watermarker=False. diffusers skips images narrower than 256 px, so this runs at 256."""
    pipe, model = models["base"]
    assert minsdxl.image.watermark_available()
    wpipe = diffusers.StableDiffusionXLPipeline(**pipe.components, add_watermarker=True)
    wpipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a cat", num_inference_steps=2, height=256, width=256, output_type="pil")
    ref = wpipe(**kw, generator=torch.Generator().manual_seed(3)).images
    got = minsdxl.text2img(model, **kw, seed=3, progress=False)
    _assert_images_close(ref, got)
    model.add_watermarker = False
    try:
        plain = minsdxl.text2img(model, **kw, seed=3, progress=False)
    finally:
        model.add_watermarker = None
    assert not np.array_equal(np.asarray(plain[0]), np.asarray(got[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("output_type", ["pil", "np", "pt"])
def test_postprocess_equals_diffusers_bit_for_bit(dtype, output_type):
    """Our uint8 conversion runs in torch before the copy to the host; diffusers' in numpy after it.
    Exact equality, including out-of-range values and values that land exactly on .5 after * 255 (191
    of the 256 planted in fp32; round half to even in both)."""
    from diffusers.image_processor import VaeImageProcessor

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 40, generator=g) * 2.4 - 1.2
    halves = (torch.arange(256.0) + 0.5) / 255 * 2 - 1
    x.view(-1)[:256] = halves
    x = x.to(dtype)
    ref = VaeImageProcessor().postprocess(x, output_type=output_type)
    got = minsdxl.image.postprocess(x, output_type)
    if output_type == "pil":
        assert [i.size for i in got] == [i.size for i in ref]
        ref, got = np.stack([np.asarray(i) for i in ref]), np.stack([np.asarray(i) for i in got])
    assert type(got) is type(ref) and got.dtype == ref.dtype
    assert (torch.as_tensor(got) == torch.as_tensor(ref)).all()


@pytest.mark.parametrize("in_place", [False, True])
def test_callback_on_step_end_changes_latents_and_conditioning(models, in_place):
    """diffusers' semantics: called after each step with the asked-for tensors; what it returns
    replaces them from the next step on. The prompt's cross-attention k, v are projected once per run,
    so changing prompt_embeds (returned, or modified in place) must project them again."""
    pipe, model = models["base"]
    seen = {"diffusers": [], "minsdxl": []}

    def callback(who):
        def cb(_, i, t, kw):
            seen[who].append((i, float(t), sorted(kw)))
            if i == 0:
                return {"latents": kw["latents"] * 0.9}
            if i == 1 and in_place:
                kw["prompt_embeds"].mul_(0.5)
                return {}
            if i == 1:
                return {"prompt_embeds": kw["prompt_embeds"] * 0.5}
            return {"add_text_embeds": kw["add_text_embeds"] * 2.0}

        return cb

    inputs = ["latents", "prompt_embeds", "add_text_embeds"]
    kw = dict(prompt="a red circle", num_inference_steps=4, callback_on_step_end_tensor_inputs=inputs, **SIZE)
    ref = pipe(
        **kw,
        callback_on_step_end=callback("diffusers"),
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    got = minsdxl.text2img(
        model, **kw, callback_on_step_end=callback("minsdxl"), seed=0, output_type="latent", progress=False
    )
    assert seen["minsdxl"] == seen["diffusers"] and len(seen["minsdxl"]) == 4
    _assert_close(ref, got)
    plain = minsdxl.text2img(model, **{**kw, "output_type": "latent"}, seed=0, progress=False)
    assert rel_err(plain, got) > 1e-3  # the callback's changes took effect


def test_callbacks_end_guidance_change_it_and_interrupt_as_in_diffusers(models):
    """The callback's `pipeline`: diffusers' SDXLCFGCutoffCallback (a PipelineCallback naming its own
    tensor inputs, setting pipeline._guidance_scale = 0 and cutting the prompt's tensors to the positive
    row), a new guidance scale mid-run, and `_interrupt` (the remaining steps skipped)."""
    from diffusers.callbacks import SDXLCFGCutoffCallback

    pipe, model = models["base"]
    kw = dict(prompt="a red circle", negative_prompt="blue", num_inference_steps=5, **SIZE)

    def both(callback):
        ref = pipe(
            **kw, callback_on_step_end=callback, generator=torch.Generator().manual_seed(0), output_type="latent"
        )
        got = minsdxl.text2img(model, **kw, callback_on_step_end=callback, seed=0, output_type="latent", progress=False)
        _assert_close(ref.images, got)
        return got

    cutoff = both(SDXLCFGCutoffCallback(cutoff_step_ratio=0.4))

    def lower_then_stop(p, i, t, tensors):
        assert p.num_timesteps == 5 and p.do_classifier_free_guidance
        if i == 1:
            p._guidance_scale = 2.5
        if i == 2:
            p._interrupt = True
        return {}

    stopped = both(lower_then_stop)

    def end_guidance_only(p, i, t, tensors):  # the prompt's tensors are left for minsdxl to cut
        if i == int(p.num_timesteps * 0.4):
            p._guidance_scale = 0.0
        return {}

    ours = minsdxl.text2img(model, **kw, callback_on_step_end=end_guidance_only, seed=0, output_type="latent",
                            progress=False)  # fmt: skip
    assert torch.equal(ours, cutoff)
    plain = minsdxl.text2img(model, **kw, seed=0, output_type="latent", progress=False)
    assert rel_err(plain, cutoff) > 1e-3 and rel_err(plain, stopped) > 1e-3

    def guidance_on(p, i, t, tensors):
        p._guidance_scale = 5.0
        return {}

    with pytest.raises(ValueError, match="turning classifier-free guidance on"):
        minsdxl.text2img(model, **dict(kw, guidance_scale=1.0), callback_on_step_end=guidance_on, progress=False)


def test_progress_bar_shown_by_default_and_hidden_on_request(models, capsys):
    _, model = models["base"]
    kw = dict(prompt="a cat", num_inference_steps=3, output_type="latent", seed=0, **SIZE)
    minsdxl.text2img(model, **kw)
    err = capsys.readouterr().err
    assert "denoising" in err and "/3" in err
    minsdxl.text2img(model, **kw, progress=False)
    assert "denoising" not in capsys.readouterr().err
