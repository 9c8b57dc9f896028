"""The bundled tiny SDXL (`minsdxl.load("tiny")`): shipped as promised, equal to diffusers on its trained
weights, and it behaves: prompted colour and position on prompts it never saw, guidance that matters,
img2img that keeps the layout, inpainting that repaints only the mask.

Measuring a picture (minsdxl.tiny.describe, plain pixel statistics): the prompt names the background, so
the foreground is every pixel farther than 80 (RGB distance) from that background colour; its dominant
colour is the palette colour most of those pixels are nearest to; its position is the named position
nearest its centroid. Prompts come from the triples scripts/train_tiny.py held out of training (listed
in the model's training.json), so every test prompt is a colour/shape/position combination the model
never saw, in a caption never used verbatim.
"""

import json

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import minsdxl
from minsdxl import tiny

STEPS = 25


@pytest.fixture(scope="module")
def model():
    return minsdxl.load("tiny", add_watermarker=False)


@pytest.fixture(scope="module")
def held_out():
    return [tuple(t) for t in json.loads((tiny.PATH / "training.json").read_text())["held_out"]]


def _cases(held_out, n=48):
    """n (prompt, colour, position, background): every held-out triple on two of the three backgrounds."""
    bgs = list(tiny.BACKGROUNDS)
    out = []
    for k, (c, s, p) in enumerate(held_out):
        for bg in (bgs[k % 3], bgs[(k + 1) % 3]):
            out.append((tiny.caption(c, s, p, bg), c, p, bg))
    return out[:n]


def _generate(model, prompts, seed=0, **kw):
    return minsdxl.text2img(model, prompts, num_inference_steps=STEPS, seed=seed, progress=False, **kw)


def _scores(images, cases):
    found = [tiny.describe(img, bg) for img, (_, _, _, bg) in zip(images, cases)]
    colour = np.mean([f["color"] == c for f, (_, c, _, _) in zip(found, cases)])
    position = np.mean([f["position"] == p for f, (_, _, p, _) in zip(found, cases)])
    return colour, position, found


def test_shipped_folder_is_small_and_sdxl_shaped(model):
    size = sum(f.stat().st_size for f in tiny.PATH.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, f"the bundled model is {size / 2**20:.1f} MiB; the budget is 25 MiB"
    u = model.unet.config
    assert len(u.block_out_channels) == 3 and u.transformer_layers[0] == 0 and all(u.transformer_layers[1:])
    assert len(model.vae.config.block_out_channels) == 4 and model.vae.config.latent_channels == 4
    widths = model.text_encoder.config.hidden_size, model.text_encoder_2.config.hidden_size
    assert widths[0] != widths[1] and u.cross_attention_dim == sum(widths)
    assert model.tokenizer.pad_token == "<|endoftext|>" and model.tokenizer_2.pad_token == "!"  # SDXL's pad rules
    assert model.kind == "base" and model.force_zeros_for_empty_prompt
    assert (u.sample_size * 8, model.vae.config.sample_size) == (tiny.SIZE, tiny.SIZE)
    with pytest.raises(minsdxl.CheckpointError, match="no such file"):
        minsdxl.load("./tiny")  # only the bare name means the bundled model


def test_diffusers_pipeline_gives_the_same_image(model):
    """Parity on a trained model: diffusers' StableDiffusionXLPipeline from the shipped folder."""
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
        tiny.PATH, torch_dtype=torch.float32, local_files_only=True, add_watermarker=False
    )
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=["a blue triangle at the top right on a black background", "a green circle"])
    kw |= dict(num_inference_steps=20, guidance_scale=5.0, original_size=(96, 96), crops_coords_top_left=(4, 0))
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    ref = pipe(**kw, generator=gen(), output_type="latent").images
    got = minsdxl.text2img(model, **kw, generator=gen(), output_type="latent", progress=False)
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    ref_img = np.stack([np.asarray(i) for i in pipe(**kw, generator=gen()).images])
    got_img = np.stack([np.asarray(i) for i in minsdxl.text2img(model, **kw, seed=7, progress=False)])
    diff = np.abs(ref_img.astype(int) - got_img.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.999


def test_prompted_colour_and_position_on_unseen_prompts(model, held_out):
    cases = _cases(held_out)
    assert len(cases) >= 40
    images = _generate(model, [c[0] for c in cases])
    colour, position, found = _scores(images, cases)
    misses = [(c[0], f) for c, f in zip(cases, found) if f["color"] != c[1] or f["position"] != c[2]]
    assert colour >= 0.9, f"colour right in {colour:.0%}; misses: {misses}"
    assert position >= 0.8, f"position right in {position:.0%}; misses: {misses}"


def test_guidance_matters(model, held_out):
    """Same prompts and seed at guidance 1.0 (no CFG: the conditional prediction alone) and 5.0: with
    guidance, more pictures have both colour and position right, and the shapes sit much closer to the
    prompted place (mean centroid distance; measured when the model was trained: 0.83 vs 1.0 right,
    distance 0.10 vs 0.03 of the side)."""
    cases = _cases(held_out, 24)
    prompts = [c[0] for c in cases]
    low = _scores(_generate(model, prompts, guidance_scale=1.0), cases)
    high = _scores(_generate(model, prompts, guidance_scale=5.0), cases)

    def adherence(scores):
        found = scores[2]
        right = np.mean([f["color"] == c and f["position"] == p for f, (_, c, p, _) in zip(found, cases)])
        where = [np.linalg.norm(np.array(f["centroid"]) - tiny.POSITIONS[p]) for f, (_, _, p, _) in zip(found, cases)]
        return right, np.mean(where)

    (right_low, dist_low), (right_high, dist_high) = adherence(low), adherence(high)
    assert right_high >= right_low + 0.1, (right_low, right_high)
    assert dist_high <= 0.5 * dist_low, (dist_low, dist_high)


def test_img2img_low_strength_keeps_the_layout(model):
    """A red square at the top left, re-imagined at strength 0.3 with a prompt that asks for the bottom
    right: the result still has its shape where the input had it."""
    init = tiny.render("red", "square", "top left", "white")
    out = minsdxl.img2img(
        model,
        "a red square at the bottom right on a white background",
        image=init,
        strength=0.3,
        seed=1,
        num_inference_steps=STEPS,
        progress=False,
    )[0]
    a, b = tiny.foreground(init, "white"), tiny.foreground(out, "white")
    iou = (a & b).sum() / (a | b).sum()
    assert iou >= 0.7, f"foreground IoU with the input {iou:.2f}"
    assert tiny.describe(out, "white")["position"] == "top left"


def test_inpaint_repaints_the_mask_only(model):
    """A red circle at the top left; the bottom-right quadrant masked and prompted with a blue square:
    the quadrant turns blue, the rest stays within a small error of the input."""
    init = tiny.render("red", "circle", "top left", "white")
    mask = np.zeros((tiny.SIZE, tiny.SIZE), np.uint8)
    h = tiny.SIZE // 2
    mask[h:, h:] = 255
    out = minsdxl.inpaint(
        model,
        "a blue square at the bottom right on a white background",
        image=init,
        mask_image=Image.fromarray(mask),
        strength=1.0,
        seed=2,
        num_inference_steps=STEPS,
        progress=False,
    )[0]
    quadrant = out.crop((h, h, tiny.SIZE, tiny.SIZE))
    assert tiny.describe(quadrant, "white")["color"] == "blue"
    assert tiny.describe(quadrant, "white")["area"] > 0.1
    # outside the mask, away from its edge (latents are 8x coarser): the input within a small error. The
    # bound is 12 of 255 levels on average, not the VAE's own round-trip error (~2): the whole picture is
    # 8x8 latents, so the decoder's receptive field carries a faint tint of the repainted latents across
    # the background (measured 10.2 when the model was trained; the circle itself stays put, checked below)
    keep = np.ones((tiny.SIZE, tiny.SIZE), bool)
    keep[h - 8 :, h - 8 :] = False
    err = np.abs(np.asarray(out, np.float32) - np.asarray(init, np.float32))[keep]
    assert err.mean() <= 12, err.mean()
    kept, original = (tiny.describe(im.crop((0, 0, h, h)), "white") for im in (out, init))
    assert kept["color"] == "red" and abs(kept["area"] - original["area"]) <= 0.1
    assert np.linalg.norm(np.subtract(kept["centroid"], original["centroid"])) <= 0.06
