"""InstructPix2Pix (an 8-channel UNet: the image to edit beside the latents) against diffusers'
StableDiffusionXLInstructPix2PixPipeline on tiny random weights: its three-way guidance, the image's
posterior mean, CosXL Edit (scaled image latents, EDM Euler), and loading / saving such a model."""

import json
from dataclasses import replace

import diffusers
import pytest
import torch
from sdxl_testing import TINY_UNET, diffusers_unet_config, minsdxl_from_pipe, randomize_, rel_err, smooth_image
from test_schedulers_edm import COSXL

import minsdxl

SIZE = dict(height=64, width=64)
TOL = 1e-4  # fp32, a few steps of a tiny random model: the two agree to ~1e-6


@pytest.fixture(scope="module")
def pix2pix(tiny_base, tmp_path_factory):
    """(diffusers pipeline, minsdxl model loaded from its saved folder)."""
    unet = diffusers.UNet2DConditionModel(**diffusers_unet_config(replace(TINY_UNET, in_channels=8)))
    keep = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    components = {k: tiny_base[0].components[k] for k in keep} | {"unet": randomize_(unet, 7).eval()}
    pipe = diffusers.StableDiffusionXLInstructPix2PixPipeline(**components, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("pix2pix") / "model"
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe, minsdxl.load(folder)


def _both(pipe, model, output_type="latent", **kw):
    ref = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type=output_type).images
    got = minsdxl.instruct_pix2pix(
        model, **kw, generator=torch.Generator().manual_seed(0), output_type=output_type, progress=False
    )
    assert got.shape == ref.shape
    return rel_err(got, ref)


CASES = {
    "default": dict(),
    "text_guidance_only": dict(image_guidance_scale=0.8),  # below 1: no CFG at all, as in diffusers
    "no_cfg": dict(guidance_scale=1.0),
    "negative": dict(negative_prompt="blurry", image_guidance_scale=2.0, guidance_rescale=0.5),
    "batch": dict(prompt=["make it red", "make it blue"], num_images_per_prompt=2),
    "micro_conditioning": dict(original_size=(512, 512), crops_coords_top_left=(8, 16), target_size=(96, 96)),
    "denoising_end": dict(denoising_end=0.5),
    "resized": dict(height=96, width=64),  # the image is resized to the call's size, not the other way
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(pix2pix, case):
    pipe, model = pix2pix
    kw = {"prompt": "make it red", "image": smooth_image(3), "num_inference_steps": 3, **SIZE, **CASES[case]}
    assert _both(pipe, model, **kw) <= TOL


def test_images_and_latent_input_match_diffusers(pix2pix):
    pipe, model = pix2pix
    kw = dict(prompt="make it red", num_inference_steps=3, **SIZE)
    assert _both(pipe, model, "pt", image=smooth_image(4), **kw) <= TOL
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))  # taken as the image's latents
    assert _both(pipe, model, image=lat, **kw) <= TOL


@pytest.mark.parametrize("scheduler,steps", [("euler", 2), ("heun", 1)])  # Heun: order 2, 2N - 1 UNet calls
def test_old_style_callback_as_diffusers_calls_it(pix2pix, scheduler, steps):
    pipe, model = pix2pix
    heun = diffusers.HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    ref_pipe = pipe if scheduler == "euler" else type(pipe)(**{**pipe.components, "scheduler": heun})
    calls = {"ref": [], "ours": []}
    kw = dict(prompt="make it red", image=smooth_image(3), num_inference_steps=5, callback_steps=steps, **SIZE)
    for who, run in (("ref", ref_pipe), ("ours", None)):
        record = lambda i, t, latents, who=who: calls[who].append((i, float(t), latents.clone()))  # noqa: E731
        if run is None:
            minsdxl.instruct_pix2pix(model, **kw, callback=record, scheduler=scheduler, seed=0, progress=False)
        else:
            run(**kw, callback=record, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert [c[:2] for c in calls["ours"]] == [c[:2] for c in calls["ref"]] and len(calls["ref"]) >= 2
    assert all(rel_err(a[2], b[2]) <= TOL for a, b in zip(calls["ours"], calls["ref"]))
    with pytest.raises(ValueError, match="not both"):
        minsdxl.instruct_pix2pix(model, **kw, callback=print, callback_on_step_end=print)
    with pytest.raises(ValueError, match="callback_steps has to be a positive integer"):
        minsdxl.instruct_pix2pix(model, **{**kw, "callback_steps": 0}, callback=print)


def test_the_image_steers_the_result(pix2pix):
    _, model = pix2pix
    kw = dict(prompt="make it red", num_inference_steps=3, seed=0, output_type="latent", progress=False, **SIZE)
    a = minsdxl.instruct_pix2pix(model, image=smooth_image(1), **kw)
    b = minsdxl.instruct_pix2pix(model, image=smooth_image(2), **kw)
    assert rel_err(a, b) > 0.01


def test_cosxl_edit_matches_diffusers(pix2pix):
    """CosXL Edit: is_cosxl_edit scales the image latents; EDM Euler, v-prediction, exponential σ."""
    pipe, _ = pix2pix
    scheduler = diffusers.EDMEulerScheduler.from_config(COSXL)
    edit = diffusers.StableDiffusionXLInstructPix2PixPipeline(
        **{**pipe.components, "scheduler": scheduler}, add_watermarker=False, is_cosxl_edit=True
    )
    edit.set_progress_bar_config(disable=True)
    model = minsdxl_from_pipe(edit)
    kw = dict(prompt="make it red", image=smooth_image(3), num_inference_steps=4, **SIZE)
    plain = minsdxl.instruct_pix2pix(model, **kw, seed=0, output_type="latent", progress=False)
    model.is_cosxl_edit = True
    assert _both(edit, model, **kw) <= TOL
    assert rel_err(minsdxl.instruct_pix2pix(model, **kw, seed=0, output_type="latent", progress=False), plain) > 0.01


def test_kind_is_told_saved_and_guarded(pix2pix, tmp_path):
    pipe, model = pix2pix
    assert model.kind == "instruct_pix2pix"
    minsdxl.checkpoint.save(model, tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInstructPix2PixPipeline"
    assert minsdxl.load(tmp_path / "saved").kind == "instruct_pix2pix"
    with pytest.raises(ValueError, match="8-channel InstructPix2Pix UNet: call minsdxl.instruct_pix2pix"):
        minsdxl.text2img(model, "a cat", **SIZE)
    with pytest.raises(ValueError, match="8-channel InstructPix2Pix UNet"):
        minsdxl.img2img(model, "a cat", image=smooth_image(1))
    base = minsdxl_from_pipe(diffusers.StableDiffusionXLPipeline(**{**pipe.components, "unet": _base_unet()}))
    with pytest.raises(ValueError, match="needs an InstructPix2Pix model"):
        minsdxl.instruct_pix2pix(base, "make it red", image=smooth_image(1), **SIZE)
    with pytest.raises(ValueError, match="needs image="):
        minsdxl.instruct_pix2pix(model, "make it red", **SIZE)
    with pytest.raises(TypeError, match="image_guidance_scale"):
        minsdxl.instruct_pix2pix(model, "make it red", image=smooth_image(1), image_guidance_scale="high", **SIZE)


def _base_unet():
    return randomize_(diffusers.UNet2DConditionModel(**diffusers_unet_config(TINY_UNET)), 1).eval()


def test_prompt_editing_swaps_the_prompt_rows(pix2pix):
    """A1111's prompt editing (with prompt_weighting) in the three-row batch [no prompt, no prompt, prompt]:
    the prompt row takes the next text from the schedule's step on."""
    _, model = pix2pix
    seen = []
    spy = lambda p, i, t, k: seen.append(k["prompt_embeds"].clone()) or {}  # noqa: E731
    kw = dict(image=smooth_image(3), num_inference_steps=4, **SIZE, progress=False, output_type="latent", seed=0)
    kw |= dict(callback_on_step_end=spy, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    minsdxl.instruct_pix2pix(model, "make it [red:blue:0.5]", prompt_weighting="a1111", **kw)
    red, blue = (minsdxl.encode_prompt(model, f"make it {c}", prompt_weighting="a1111")[0][0] for c in ("red", "blue"))
    assert [e.shape[0] for e in seen] == [3] * 4
    assert [torch.equal(e[2], red) for e in seen] == [True, True, True, False] and torch.equal(seen[3][2], blue)
