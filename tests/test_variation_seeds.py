"""A1111's variation seeds (variation_seed / variation_strength; --variation-seed / --variation-strength): the
starting noise turned toward another seed's by spherical interpolation; and its seed resize (seed_resize_from_h /
_w; --seed-resize-from): another size's noise pasted in the middle. diffusers has none; the checks are
against the formula (an independent per-column slerp) and the properties a user relies on."""

import math

import numpy as np
import PIL.Image
import pytest
import torch

import minsdxl
from minsdxl.rng import slerp


def _slerp_columns(t, a, b):
    """The textbook slerp of each (channel, column) vector of two [C, H, W] noises, one at a time."""
    out = np.empty_like(a)
    for c in range(a.shape[0]):
        for w in range(a.shape[2]):
            x, y = a[c, :, w], b[c, :, w]
            omega = math.acos(np.dot(x / np.linalg.norm(x), y / np.linalg.norm(y)))
            out[c, :, w] = (math.sin((1 - t) * omega) * x + math.sin(t * omega) * y) / math.sin(omega)
    return out


def test_slerp_is_the_per_column_formula():
    g = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(4, 8, 6, generator=g, dtype=torch.float64),
        torch.randn(4, 8, 6, generator=g, dtype=torch.float64),
    )
    for t in (0.0, 0.25, 0.7, 1.0):
        assert np.allclose(slerp(t, a, b).numpy(), _slerp_columns(t, a.numpy(), b.numpy()), atol=1e-12)
    assert torch.equal(slerp(0.0, a, b), a)
    assert torch.equal(slerp(0.5, a, a), a)  # the same noise twice: A1111's near-parallel branch


@pytest.fixture(scope="module")
def model():
    return minsdxl.load("tiny")


KW = dict(prompt="a green circle", num_inference_steps=3, height=64, width=64, output_type="latent", progress=False)


def test_text2img_variations(model):
    plain = minsdxl.text2img(model, **KW, seed=1)
    assert torch.equal(minsdxl.text2img(model, **KW, seed=1, variation_seed=7, variation_strength=0.0), plain)
    # all the way: the variation seed's noise (Euler draws nothing more, so seed 7's result)
    full = minsdxl.text2img(model, **KW, seed=1, variation_seed=7, variation_strength=1.0)
    assert (full - minsdxl.text2img(model, **KW, seed=7)).abs().max() <= 1e-5
    some = minsdxl.text2img(model, **KW, seed=1, variation_seed=7, variation_strength=0.3)
    assert (some - plain).abs().max() > 1e-2 and (some - full).abs().max() > 1e-2
    # the seed's generator is consumed as without a variation: an ancestral sampler draws the same later noise
    seen = {}
    for v in (0.0, 1e-9):
        seen[v] = minsdxl.text2img(model, **KW, seed=1, variation_seed=7, variation_strength=v, scheduler="euler_a")
    assert (seen[1e-9] - seen[0.0]).abs().max() <= 1e-5


def test_img2img_and_inpaint_vary_their_noise(model):
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = PIL.Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    kw = {k: v for k, v in KW.items() if k not in ("height", "width")}
    for fn, extra in ((minsdxl.img2img, {}), (minsdxl.inpaint, {"mask_image": mask})):
        plain = fn(model, **kw, image=image, strength=0.7, seed=2, **extra)
        same = fn(model, **kw, image=image, strength=0.7, seed=2, variation_seed=5, variation_strength=0.0, **extra)
        varied = fn(model, **kw, image=image, strength=0.7, seed=2, variation_seed=5, variation_strength=0.5, **extra)
        assert torch.equal(same, plain) and (varied - plain).abs().max() > 1e-2, fn.__name__


def test_bad_variation_arguments(model):
    with pytest.raises(ValueError, match="variation_strength must be in"):
        minsdxl.text2img(model, **KW, variation_seed=1, variation_strength=1.5)
    with pytest.raises(ValueError, match="give it"):
        minsdxl.text2img(model, **KW, variation_strength=0.5)
    with pytest.raises(ValueError, match="with latents= nothing is drawn"):
        minsdxl.text2img(model, **KW, variation_seed=1, variation_strength=0.5, latents=torch.zeros(1, 4, 8, 8))


def test_command_line_variation_seeds_infotext_and_replay(tmp_path, capsys):
    from minsdxl.cli import _from_a1111, main, read_png_metadata

    argv = ["-p", "a green circle", "--steps", "2", "-W", "64", "-H", "64", "-s", "3", "-q", "--no-watermark"]
    argv += ["--variation-seed", "10", "--variation-strength", "0.4", "-b", "2", "-o", str(tmp_path / "v.png")]
    assert main(argv) == 0
    model = minsdxl.load("tiny")
    for k, name in enumerate(("v-0.png", "v-1.png")):  # the batch's second image: seed 4, variation seed 11
        made = minsdxl.text2img(model, "a green circle", num_inference_steps=2, width=64, height=64, seed=3 + k,
                                variation_seed=10 + k, variation_strength=0.4, progress=False)[0]  # fmt: skip
        assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / name)), np.asarray(made)), name
        info = read_png_metadata(tmp_path / name)["infotext"]
        assert info["Variation seed"] == str(10 + k) and info["Variation seed strength"] == "0.4"
    assert main(["--from-png", str(tmp_path / "v-1.png"), "-q", "-o", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "again.png")), np.asarray(made))
    text = "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Variation seed: 9, "
    text += "Variation seed strength: 0.2"
    args = _from_a1111("x.png", text)["args"]
    assert args["variation_seed"] == 9 and args["variation_strength"] == 0.2
    assert main(["-p", "x", "--variation-strength", "0.5"]) == 1
    assert "give it as --variation-seed N" in capsys.readouterr().err


def _a1111_resized(seed_noise, full_noise, small_hw):
    """A1111's ImageRNG.first for one image, transcribed: the small noise pasted into the full one."""
    x, noise = full_noise.clone(), seed_noise
    shape, noise_shape = x.shape, (x.shape[0], *small_hw)
    dx = (shape[2] - noise_shape[2]) // 2
    dy = (shape[1] - noise_shape[1]) // 2
    w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
    h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
    tx = 0 if dx < 0 else dx
    ty = 0 if dy < 0 else dy
    dx = max(-dx, 0)
    dy = max(-dy, 0)
    x[:, ty : ty + h, tx : tx + w] = noise[:, dy : dy + h, dx : dx + w]
    return x


@pytest.mark.parametrize("small", [(6, 5), (11, 8), (13, 12)])  # smaller; taller by an odd 3; larger both ways
def test_seed_resize_is_a1111s_paste(small):
    from minsdxl.sampler import _noise

    shape = (2, 4, 8, 8)
    a = dict(variation_strength=0.3, variation_seed=7, seed_resize_from_h=8 * small[0], seed_resize_from_w=8 * small[1])
    got = _noise(shape, torch.Generator().manual_seed(3), "cpu", torch.float32, a)
    seed_noise = torch.randn((2, 4, *small), generator=torch.Generator().manual_seed(3))
    other = torch.randn((2, 4, *small), generator=torch.Generator().manual_seed(7))  # A1111: the subseed's, small
    full = torch.randn(shape, generator=torch.Generator().manual_seed(3))  # the same seed again, full size
    for i in range(2):
        expected = _a1111_resized(slerp(0.3, seed_noise[i], other[i]), full[i], small)
        assert torch.equal(got[i], expected)
    # one generator per image: each rewound to its own state
    gens = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    got = _noise(shape, gens, "cpu", torch.float32, {**a, "variation_strength": 0.0})
    for i, seed in enumerate((3, 4)):
        one, full = (torch.randn((4, *hw), generator=torch.Generator().manual_seed(seed)) for hw in (small, (8, 8)))
        assert torch.equal(got[i], _a1111_resized(one, full, small))


def test_seed_resize_in_the_functions(model):
    plain = minsdxl.text2img(model, **KW, seed=1)
    same = minsdxl.text2img(model, **KW, seed=1, seed_resize_from_h=64, seed_resize_from_w=64)
    assert torch.equal(plain, same)  # its own size: nothing to paste
    resized = minsdxl.text2img(model, **KW, seed=1, seed_resize_from_h=48, seed_resize_from_w=48)
    assert not torch.equal(plain, resized)
    kw = dict(prompt="a cat", image=PIL.Image.new("RGB", (64, 64), "red"), strength=0.6, num_inference_steps=2, seed=1)
    a = minsdxl.img2img(model, **kw, output_type="latent")
    b = minsdxl.img2img(model, **kw, output_type="latent", seed_resize_from_h=32, seed_resize_from_w=32)
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="go together"):
        minsdxl.text2img(model, **KW, seed_resize_from_h=48)
    with pytest.raises(ValueError, match="whole number of pixels"):
        minsdxl.text2img(model, **KW, seed_resize_from_h=48.0, seed_resize_from_w=48)
    with pytest.raises(ValueError, match="with latents= none is drawn"):
        minsdxl.text2img(model, **KW, seed_resize_from_h=48, seed_resize_from_w=48, latents=torch.zeros(1, 4, 8, 8))


def test_command_line_seed_resize_infotext_and_replay(tmp_path):
    from minsdxl.cli import _from_a1111, main, read_png_metadata

    out = tmp_path / "r.png"
    argv = ["-p", "a green circle", "--steps", "2", "-W", "64", "-H", "64", "-s", "3", "-q", "--no-watermark"]
    assert main([*argv, "--seed-resize-from", "48x40", "-o", str(out)]) == 0
    made = minsdxl.text2img(minsdxl.load("tiny"), "a green circle", num_inference_steps=2, width=64, height=64, seed=3,
                            seed_resize_from_h=40, seed_resize_from_w=48)[0]  # fmt: skip
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(made))
    assert read_png_metadata(out)["infotext"]["Seed resize from"] == "48x40"
    assert main(["--from-png", str(out), "-q", "-o", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "again.png")), np.asarray(made))
    text = "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Seed resize from: 512x768"
    assert _from_a1111("x.png", text)["args"]["seed_resize_from"] == (768, 512)
