"""Bad input found by an audit of the public API and CLI (each once a stack trace from inside torch / numpy / PIL,
or silently wrong): now a clear error naming the argument and the fix, raised before the UNet runs."""

import math

import numpy as np
import PIL.Image
import pytest
import torch

import minsdxl
import minsdxl.guidance as mg
from minsdxl import deepcache, tome
from minsdxl.checkpoint import CheckpointError

KW = dict(prompt="a red circle", num_inference_steps=2, height=64, width=64, output_type="latent", progress=False)
IMG = PIL.Image.new("RGB", (64, 64), (120, 30, 200))


@pytest.fixture(scope="module")
def model():
    return minsdxl.load("tiny")


@pytest.fixture
def no_unet(model, monkeypatch):
    """Errors must come before any denoising: the UNet explodes if it is reached."""
    monkeypatch.setattr(model.unet, "forward", lambda *a, **k: pytest.fail("the UNet ran before the error"))
    return model


TEXT2IMG = [
    (dict(latents=torch.zeros(1, 4, 8, 8, dtype=torch.int64)), TypeError, "floating-point torch.Tensor"),
    (dict(latents=np.zeros((1, 4, 8, 8), np.float32)), TypeError, "got ndarray"),
    (dict(latents=[[0.0]]), TypeError, "got list"),
    (dict(seed=None, generator="abc"), TypeError, "generator must be a torch.Generator"),
    (dict(seed=None, generator=[torch.Generator(), "x"], num_images_per_prompt=2), TypeError, "torch.Generator"),
    (dict(seed=2**70), ValueError, r"seed must be a whole number in \[0, 2\*\*64\)"),
    (dict(seed="x"), ValueError, "seed must be a whole number"),
    (dict(seed=1.5), ValueError, "seed must be a whole number"),
    (dict(seed=True), ValueError, "seed must be a whole number"),
    (dict(guidance_scale=math.nan), ValueError, "guidance_scale must be a finite number"),
    (dict(guidance_scale=math.inf), ValueError, "guidance_scale must be a finite number"),
    (dict(guidance_rescale="x"), TypeError, "guidance_rescale must be a number"),
    (dict(pag_scale=1.0, pag_applied_layers="["), ValueError, "is not a regular expression"),
    (dict(pag_scale=1.0, pag_applied_layers=5), ValueError, "a layer name or a list of them"),
    (dict(pag_scale=1.0, pag_applied_layers=[]), ValueError, "a layer name or a list of them"),
    (dict(original_size=(64,)), ValueError, r"original_size must be a pair \(height, width\)"),
    (dict(original_size=64), ValueError, "original_size must be a pair"),
    (dict(target_size=(0, 0)), ValueError, "target_size must be a pair .* >= 1"),
    (dict(crops_coords_top_left=(0,)), ValueError, r"crops_coords_top_left must be a pair \(top, left\)"),
    (dict(negative_original_size=(64,), negative_target_size=(64, 64)), ValueError, "negative_original_size"),
    (dict(callback_on_step_end_tensor_inputs=None), ValueError, "a list of names such as"),
    (dict(cross_attention_kwargs={"scale": math.nan}), ValueError, "a LoRA scale must be a finite number"),
]


@pytest.mark.parametrize("kwargs,error,match", TEXT2IMG)
def test_text2img_arguments(no_unet, kwargs, error, match):
    with pytest.raises(error, match=match):
        minsdxl.text2img(no_unet, **{"seed": 1, **KW, **kwargs})


def test_latents_of_another_dtype_and_one_tensor_input_name_are_taken(model):
    want = minsdxl.text2img(model, **KW, seed=1)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a = minsdxl.text2img(model, **KW, latents=latents)
    b = minsdxl.text2img(model, **KW, latents=latents.double(), callback_on_step_end_tensor_inputs="latents")
    assert torch.equal(a, b) and a.dtype == want.dtype


IMAGES = [
    (np.zeros((3, 64, 64), np.float32), r"channels last\) and at least 8x8 pixels"),  # CHW numpy
    (np.zeros((1, 1, 64, 64, 3), np.float32), "a numpy image must be"),
    (np.zeros((0, 64, 3), np.float32), "a numpy image must be"),
    (np.full((64, 64, 3), 200, np.uint8), r"uint8 values: pass floats in \[0, 1\]"),
    (np.full((64, 64, 3), 200.0, np.float32), r"values must be in \[0, 1\], its largest is 200"),
    (torch.full((1, 3, 64, 64), 7, dtype=torch.uint8), "torch.uint8 values"),
    (torch.zeros(1, 3, 4, 4), "at least 8x8 pixels"),
    (torch.zeros(1, 3, 0, 0), "at least 8x8 pixels"),
    (PIL.Image.new("RGB", (4, 4)), "the image is 4x4; it must be at least 8x8"),
    ([np.zeros((64, 64, 3), np.float32), np.zeros((32, 32, 3), np.float32)], "arrays of one shape"),
]


@pytest.mark.parametrize("image,match", IMAGES)
def test_img2img_images(no_unet, image, match):
    with pytest.raises(ValueError, match=match):
        minsdxl.img2img(no_unet, "a cat", image=image, strength=0.5, num_inference_steps=2, seed=1, progress=False)


def test_integer_masks_and_the_images_latents(model, no_unet):
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255  # a 0/255 mask reads as diffusers' binarised one
    with pytest.raises(pytest.fail.Exception, match="the UNet ran"):  # (got as far as the UNet: accepted)
        minsdxl.inpaint(no_unet, "a cat", image=IMG, mask_image=mask, num_inference_steps=2, seed=1, progress=False)
    with pytest.raises(ValueError, match=r"this image needs \(1, 4, 8, 8\)"):  # (diffusers: a 32x32 image)
        minsdxl.img2img(no_unet, "a", image=IMG, latents=torch.zeros(1, 4, 4, 4), strength=1.0, progress=False)


def test_an_all_black_mask_warns_at_the_callers_line(model):
    with pytest.warns(UserWarning, match="no white pixels") as caught:
        minsdxl.inpaint(model, "a", image=IMG, mask_image=PIL.Image.new("L", (64, 64)), num_inference_steps=2, seed=1,
                        output_type="latent", progress=False)  # fmt: skip
    assert caught[0].filename == __file__


GUIDERS = [
    (lambda: mg.ClassifierFreeGuidance(guidance_rescale=5.0), r"guidance_rescale must be in \[0, 1\]"),
    (lambda: mg.ClassifierFreeGuidance("x"), "guidance_scale must be a finite number"),
    (lambda: mg.AdaptiveProjectedGuidance(eta="x"), "eta must be a finite number"),
    (lambda: mg.ClassifierFreeGuidance(use_original_formulation=1), "is True or False"),
    (lambda: mg.ClassifierFreeZeroStarGuidance(zero_init_steps=-1), "zero_init_steps must be a whole number"),
    (lambda: mg.FrequencyDecoupledGuidance(guidance_scales=[]), "guidance_scales is a number per level"),
    (lambda: mg.SmoothedEnergyGuidance(seg_blur_sigma=-1, seg_guidance_layers=[0]), "seg_blur_sigma must be > 0"),
]


@pytest.mark.parametrize("make,match", GUIDERS)
def test_guiders_name_their_bad_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_guiders_that_do_not_fit_the_call(model):
    """(found at the first step, where the predictions' shape is known: still a clear error)"""
    apg = mg.AdaptiveProjectedGuidance(adaptive_projected_guidance_norm_dim=9)
    fdg = mg.FrequencyDecoupledGuidance(guidance_scales=(5.0, 3.0, 2.0, 1.5))  # 8x8 latents: 4 levels too many
    for guider, match in ((apg, "norm_dim 9: dims of the 4-D predictions"), (fdg, "4 levels halve")):
        with pytest.raises(ValueError, match=match):
            minsdxl.text2img(model, **KW, seed=1, guidance_scale=5.0, guider=guider)


def test_tome_deepcache_and_functions_given_something_else(model):
    with pytest.raises(ValueError, match="sx must be a whole number >= 1"):
        tome.apply_patch(model, sx=0)
    with pytest.raises(ValueError, match="ratio must be a number"):
        tome.apply_patch(model, ratio="0.5")
    for call, what in (
        (lambda: minsdxl.text2img("tiny", "a"), "text2img takes a model loaded by minsdxl.load"),
        (lambda: minsdxl.encode_prompt(None, "a"), "encode_prompt takes a model"),
        (lambda: minsdxl.load_lora_weights("tiny", {}), "load_lora_weights takes a model"),
        (lambda: minsdxl.compile("tiny"), "minsdxl.compile takes a model from minsdxl.load"),
        (lambda: minsdxl.load("tiny", share=5), r"load\(share=\) takes a model"),
        (lambda: tome.apply_patch("tiny"), "Token Merging takes a model"),
        (lambda: deepcache.enable(None), "DeepCache takes a model"),
    ):
        with pytest.raises(TypeError, match=what):
            call()


def test_load_placement_and_a_single_file_of_other_sizes(tmp_path):
    for kw, match in (
        (dict(dtype="fp16"), "dtype must be a floating torch dtype"),
        (dict(dtype=torch.int8), "dtype must be a floating torch dtype"),
        (dict(device="bogus"), "device 'bogus' is not a torch device"),
    ):
        with pytest.raises(ValueError, match=match):
            minsdxl.load("tiny", **kw)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch finds no CUDA GPU here"):
            minsdxl.load("tiny", device="cuda")
    # the tiny model in one file: its sizes are not SDXL's, so its configs must come along
    from minsdxl.checkpoint import save_single_file

    save_single_file(minsdxl.load("tiny"), tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="needs its config.json files"):
        minsdxl.load(tmp_path / "tiny.safetensors")


def test_command_line(tmp_path, capsys):
    from minsdxl.cli import main

    argv = ["-p", "a red circle", "--steps", "2", "-W", "64", "-H", "64", "-s", "3", "-q"]
    IMG.save(tmp_path / "in.png")
    for extra, message in (
        (["-o", str(tmp_path / "{seed.foo}.png")], "only {seed} and {index} may be used"),
        (["--hires-scale", "2", "--hires-steps", "0", "-o", str(tmp_path / "h.png")], "--hires-steps 0 (>= 1)"),
        (["--xyz", "cfg=1,2", "--xyz", "cfg=3,4", "-o", str(tmp_path / "x.png")], "cfg is on two axes"),
        (["--xyz", "W=64,72", "-o", str(tmp_path / "x.png")], "by its long name"),
        (["-s", str(2**70), "-o", str(tmp_path / "s.png")], "-s/--seed must be in [0, 2**64)"),
        (["-o", "/proc/a.png"], "cannot write to /proc"),  # (found before the run, not after it)
        (["--cfg", "nan", "-o", str(tmp_path / "c.png")], "--cfg must be a finite number"),
        # an X/Y/Z cell out of range is found before the first cell is made (no partial outputs)
        (["--xyz", "cfg=4,inf", "-o", str(tmp_path / "x.png")], "--cfg must be a finite number"),
        (["-i", str(tmp_path / "in.png"), "--xyz", "strength=0.5,2", "-o", str(tmp_path / "x.png")], "in (0, 1]"),
    ):
        assert main([*argv, *extra]) != 0
        assert message in capsys.readouterr().err
    assert main(["convert", "tiny", str(tmp_path / "no" / "x.safetensors")]) != 0
    assert "its folder" in capsys.readouterr().err and not (tmp_path / "no").exists()
    assert [p.name for p in tmp_path.glob("*.png")] == ["in.png"]


def test_step_callbacks_returning_the_wrong_things(model):
    for returned, error, match in (
        (5, TypeError, "returned int; it returns a dict"),
        ({"latents": "x"}, ValueError, "returned latents of str"),
        ({"latents": torch.zeros(1)}, ValueError, r"returned latents of \(1,\); they must keep \(1, 4, 8, 8\)"),
    ):
        with pytest.raises(error, match=match):
            minsdxl.text2img(model, **KW, seed=1, callback_on_step_end=lambda *a, r=returned: r)


def test_prompt_embeddings_of_the_wrong_kinds(model):
    pe, _, ppe, _ = minsdxl.encode_prompt(model, "a cat", do_classifier_free_guidance=False)
    for kw, match in (
        (dict(prompt_embeds="x", pooled_prompt_embeds=ppe), "prompt_embeds` must be a floating-point torch.Tensor"),
        (dict(prompt_embeds=pe[0], pooled_prompt_embeds=ppe), r"\[batch, tokens, width\].*got shape"),
        (dict(prompt_embeds=pe.repeat(2, 1, 1), pooled_prompt_embeds=ppe), "for 2 prompts but pooled ones for 1"),
        (dict(prompt_embeds=pe, pooled_prompt_embeds=ppe[:, :7]), "pooled_prompt_embeds of another width"),
    ):
        with pytest.raises(ValueError, match=match):
            minsdxl.text2img(model, **{**KW, "prompt": None}, **kw, seed=1)


def test_from_png_of_edited_metadata(tmp_path, capsys):
    import json

    from PIL.PngImagePlugin import PngInfo

    from minsdxl.cli import main

    out = tmp_path / "a.png"
    assert main(["-p", "a red circle", "--steps", "2", "-W", "64", "-H", "64", "-s", "3", "-q", "-o", str(out)]) == 0
    with PIL.Image.open(out) as im:
        im.load()
        meta = json.loads(im.text["minsdxl"])
    for change, message in (
        ({"steps": "abc"}, "its stored steps is 'abc'"),
        ({"seed": "x"}, "its stored seed is 'x'"),
        ({"sampler": "nonsense"}, None),  # a choice-less flag: the sampler check names it
        (5, "no settings (args)"),
    ):
        info = PngInfo()
        info.add_text(
            "minsdxl",
            json.dumps({**meta, "args": change if not isinstance(change, dict) else {**meta["args"], **change}}),
        )
        edited = tmp_path / "edited.png"
        PIL.Image.open(out).save(edited, pnginfo=info)
        assert main(["--from-png", str(edited), "-q", "-o", str(tmp_path / "b.png")]) != 0
        err = capsys.readouterr().err
        assert (message or "nonsense") in err and "Traceback" not in err, err


def test_inpaint_batches_and_masked_latents(no_unet):
    kw = dict(num_inference_steps=2, seed=1, progress=False)
    mask = PIL.Image.new("L", (64, 64), 255)
    for extra, match in (
        (dict(prompt="a", image=[IMG, IMG, IMG], mask_image=[mask, mask]), "2 masks for 3 images"),
        (dict(prompt=["a", "b"], image=[IMG, IMG, IMG], mask_image=mask), "cannot spread 3 images over 2"),
        (dict(prompt="a", image=IMG, mask_image=mask, masked_image_latents="x"), "got not a tensor"),
        (
            dict(prompt="a", image=IMG, mask_image=mask, masked_image_latents=torch.zeros(1, 4, 4, 4)),
            r"\[batch, 4, 8, 8\]",
        ),
    ):
        with pytest.raises(ValueError, match=match):
            minsdxl.inpaint(no_unet, **extra, **kw)


def test_a_lora_of_nans_is_refused_unchanged(model):
    from sdxl_testing import lora_layers, peft_lora, random_lora_pairs

    lora = peft_lora(random_lora_pairs(lora_layers(model, only=lambda n: n.endswith("attn1.to_q"))[:2]))
    sd = {k: v.clone() for k, v in lora.items()}
    sd[next(iter(sd))][0, 0] = math.nan
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    with pytest.raises(CheckpointError, match="holds NaN / Inf in 1 tensors"):
        minsdxl.load_lora_weights(model, sd)
    with pytest.raises(ValueError, match="an adapter weight must be a finite number"):
        minsdxl.load_lora_weights(model, lora, weight=math.inf)
    assert all(torch.equal(v, before[k]) for k, v in model.unet.state_dict().items())
