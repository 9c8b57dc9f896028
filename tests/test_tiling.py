"""tiling=True (A1111's "Tiling"): circular padding in the UNet and the VAE for one call, so the image wraps
around and tiles seamlessly. diffusers has no such switch, so the checks are of the property itself: with
circular padding the whole text2img is equivariant to a circular shift of the starting noise (the image
comes out shifted, nothing else changes), which zero padding is not."""

import numpy as np
import PIL.Image
import pytest
import torch

import minsdxl
from minsdxl.sampler import circular


@pytest.fixture(scope="module")
def model():
    return minsdxl.load("tiny")  # 3 UNet levels: shifts by 4 latent pixels pass both downsamplers whole


def _modes(model):
    return {
        m.padding_mode for part in (model.unet, model.vae) for m in part.modules() if isinstance(m, torch.nn.Conv2d)
    }


KW = dict(prompt="a brick wall", num_inference_steps=4, output_type="pt", progress=False, height=64, width=64)


def test_text2img_wraps_around(model):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    shifted = latents.roll((4, -4), (-1, -2))

    def roll(image):  # 4 latent pixels = 32 image pixels
        return image.roll((32, -32), (-1, -2))

    plain = minsdxl.text2img(model, latents=latents, **KW)
    tiled = minsdxl.text2img(model, latents=latents, tiling=True, **KW)
    tiled_shifted = minsdxl.text2img(model, latents=shifted, tiling=True, **KW)
    plain_shifted = minsdxl.text2img(model, latents=shifted, **KW)
    # measured 1.4e-6: the same arithmetic, only attention sums its keys in another order
    assert (tiled_shifted - roll(tiled)).abs().max() <= 1e-4
    # zero padding sees the borders (measured 0.48), and tiling changes the image (0.36)
    assert (plain_shifted - roll(plain)).abs().max() > 0.05
    assert (tiled - plain).abs().max() > 0.05
    assert _modes(model) == {"zeros"}  # back as it was


def test_every_function_pads_circularly_for_its_call_only(model):
    seen = []

    def spy(pipe, i, t, kw):
        seen.append(model.unet.conv_in.padding_mode + "/" + model.vae.decoder.conv_in.padding_mode)
        return {}

    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = PIL.Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    calls = {
        "text2img": lambda **k: minsdxl.text2img(model, **k),
        "img2img": lambda **k: minsdxl.img2img(model, image=image, strength=0.5, **k),
        "inpaint": lambda **k: minsdxl.inpaint(model, image=image, mask_image=mask, strength=0.8, **k),
    }
    kw = KW | {"num_inference_steps": 2}
    for name, call in calls.items():
        seen.clear()
        call(**kw, tiling=True, callback_on_step_end=spy)
        assert seen and set(seen) == {"circular/circular"}, name
    seen.clear()
    minsdxl.text2img(model, **kw, callback_on_step_end=spy)
    assert set(seen) == {"zeros/zeros"}
    # the VAE encoder's asymmetric downsampling pad (F.pad, then an unpadded conv) is not a padded conv
    with circular(model):
        assert {
            m.padding_mode
            for m in model.vae.encoder.down_blocks[0].downsamplers.modules()
            if hasattr(m, "padding_mode")
        } == {"zeros"}


def test_a_failing_call_restores_the_padding_and_vae_tiling_is_refused(model):
    with pytest.raises(ValueError, match="strength"):
        minsdxl.img2img(model, image=torch.rand(1, 3, 64, 64), strength=1.5, tiling=True, **KW)
    assert _modes(model) == {"zeros"}
    model.vae.enable_tiling()
    try:
        with pytest.raises(ValueError, match="disable_tiling"):
            minsdxl.text2img(model, tiling=True, **KW)
    finally:
        model.vae.disable_tiling()
    assert _modes(model) == {"zeros"}


def test_command_line_tiling_is_recorded_and_replayed(tmp_path):
    """--tiling: A1111's "Tiling: True" in the PNG, --from-png makes the same image again, and an A1111 PNG's
    Tiling turns it on."""
    from minsdxl.cli import _from_a1111, main, read_png_metadata

    argv = ["-p", "a brick wall", "--steps", "2", "-W", "64", "-H", "64", "-s", "5", "-q", "--no-watermark"]
    assert main([*argv, "--tiling", "-o", str(tmp_path / "tiled.png")]) == 0
    assert main([*argv, "-o", str(tmp_path / "plain.png")]) == 0
    assert read_png_metadata(tmp_path / "tiled.png")["infotext"]["Tiling"] == "True"
    assert "Tiling" not in read_png_metadata(tmp_path / "plain.png")["infotext"]
    assert main(["--from-png", str(tmp_path / "tiled.png"), "-q", "-o", str(tmp_path / "again.png")]) == 0
    pixels = {n: np.asarray(PIL.Image.open(tmp_path / f"{n}.png")) for n in ("tiled", "plain", "again")}
    assert np.array_equal(pixels["again"], pixels["tiled"]) and not np.array_equal(pixels["plain"], pixels["tiled"])
    text = "a brick wall\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Tiling: True"
    assert _from_a1111("x.png", text)["args"]["tiling"] is True
