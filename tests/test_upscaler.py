"""ESRGAN-family upscalers (minsdxl.upscaler) against spandrel, the loader A1111 (>= 1.8) and ComfyUI run
these files with.

Random weights are written in each on-disk layout by this file's own key generator (not minsdxl's table):
old ESRGAN x4 / x2 / x1 (and x4 at 4x-UltraSharp's real shapes), Real-ESRGAN x4plus, x2plus and x1
(pixel-unshuffle, odd image sizes so the padding is exercised), the 6-block anime model, the ESRGAN-repo /
KAIR names; as .pth, .safetensors, wrapped in params_ema / params. Compared:
- the inferred config and scale, against the generator's and spandrel's;
- the network on a random [0, 1] tensor: spandrel's ImageModelDescriptor call (pad, model, clamp) against
  ours clamped, and spandrel's bare model unclamped on a size it needs no padding for. fp32: bit-identical
  (the same ops in the same order; max abs diff 0.0, asserted < 1e-6); fp16 and bf16 too (asserted equal);
- `upscale()` on a PIL image against spandrel's model fed A1111's conversion (np.array / 255, clamp, 255 *,
  round, uint8), RGB and A1111's BGR: identical bytes;
- tiling against the untiled result: one tile = identical; 3x3 tiles with overlap 12 differ near seams by
  at most 1 level of 255, overlap 36 = identical (test_tiled_close_to_untiled);
- scale != the model's (A1111's hires fix): the LANCZOS size, repeated passes for scales above the model's;
- errors: LoRA-like, random and other-architecture files, ESRGAN+, misfit tensors; missing, truncated,
  garbage, empty, pickled-object files and a folder.
"""

import pickle

import numpy as np
import PIL.Image
import pytest
import spandrel
import torch
from safetensors.torch import save_file

from minsdxl.checkpoint import CheckpointError
from minsdxl.upscaler import ESRGANConfig, load_upscaler, upscale

# layout -> (conv_first, one dense-block conv, trunk conv, x2 stage i, HR conv, last conv) for n_up stages
_NAMES = {
    "old": lambda nb, n_up: (
        "model.0",
        "model.1.sub.{b}.RDB{r}.conv{c}.0",
        f"model.1.sub.{nb}",
        "model.{i3}",
        f"model.{3 * n_up + 2}",
        f"model.{3 * n_up + 4}",
    ),
    "new": lambda nb, n_up: (
        "conv_first",
        "body.{b}.rdb{r}.conv{c}",
        "conv_body",
        "conv_up{i}",
        "conv_hr",
        "conv_last",
    ),
    "kair": lambda nb, n_up: (
        "conv_first",
        "RRDB_trunk.{b}.RDB{r}.conv{c}",
        "trunk_conv",
        "upconv{i}",
        "HRconv",
        "conv_last",
    ),
}


def random_esrgan(layout, *, nf=16, nb=2, gc=32, n_up=2, unshuffle=1, in_nc=3, out_nc=3, seed=0, calibrate=True):
    """A random RRDBNet state dict in `layout`, weights ~ N(0, 1/fan_in). calibrate: conv_last rescaled per
    channel (it is linear) so outputs on random images are ~ 0.5 +- 0.35 whatever the depth (measured with
    spandrel's network): mostly in [0, 1], some clipped, so the clamp and rounding are exercised."""
    g = torch.Generator().manual_seed(seed)
    first, rdb, trunk, up, hr, last = _NAMES[layout](nb, n_up)
    sd = {}

    def conv(name, cin, cout):
        sd[name + ".weight"] = torch.randn(cout, cin, 3, 3, generator=g) / (9 * cin) ** 0.5
        sd[name + ".bias"] = torch.randn(cout, generator=g) * 0.05

    conv(first, in_nc * unshuffle**2, nf)
    for b in range(nb):
        for r in (1, 2, 3):
            for c in range(1, 6):
                conv(rdb.format(b=b, r=r, c=c), nf + (c - 1) * gc, gc if c < 5 else nf)
    conv(trunk, nf, nf)
    for i in range(1, n_up + 1):
        conv(up.format(i=i, i3=3 * i), nf, nf)
    conv(hr, nf, nf)
    conv(last, nf, out_nc)
    if calibrate:
        net = spandrel.ModelLoader().load_from_state_dict(sd).model.eval()
        with torch.inference_mode():
            y = net(torch.rand(1, in_nc, 16, 16, generator=g)) - sd[last + ".bias"][:, None, None]
        m, k = y.mean((0, 2, 3)), 0.35 / y.std((0, 2, 3))
        sd[last + ".weight"] *= k[:, None, None, None]
        sd[last + ".bias"] = 0.5 - m * k
    return sd


def save(sd, path, wrap=None):
    sd = {wrap: sd} if wrap else sd
    if str(path).endswith(".safetensors"):
        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    return path


def spandrel_model(path):
    desc = spandrel.ModelLoader().load_from_file(str(path))
    assert desc.architecture.id == "ESRGAN"
    return desc.eval()


# (id, layout, generator kwargs, file name, wrapper, image size (w, h))
VARIANTS = [
    ("old-x4", "old", dict(), "4x_small.pth", None, (21, 18)),
    ("old-x2", "old", dict(n_up=1), "2x_small.safetensors", None, (20, 17)),
    ("old-x1", "old", dict(n_up=0, nb=1), "1x_small.pth", None, (19, 22)),
    ("realesrgan-x4plus", "new", dict(), "RealESRGAN_x4plus.pth", "params_ema", (21, 18)),
    ("realesrgan-x2plus", "new", dict(unshuffle=2), "RealESRGAN_x2plus.pth", "params", (21, 19)),
    ("realesrgan-x1", "new", dict(unshuffle=4), "x1.pth", "params_ema", (23, 18)),
    ("anime-6B", "new", dict(nf=64, nb=6), "RealESRGAN_x4plus_anime_6B.pth", "params_ema", (13, 11)),
    ("kair-x4", "kair", dict(), "ESRGAN.pth", None, (21, 18)),
]


@pytest.mark.parametrize("layout,kw,name,wrap,size", [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
def test_parity_with_spandrel(tmp_path, layout, kw, name, wrap, size):
    path = save(random_esrgan(layout, **kw), tmp_path / name, wrap)
    ours, ref = load_upscaler(path), spandrel_model(path)
    n_up, unshuffle = kw.get("n_up", 2), kw.get("unshuffle", 1)
    expected = ESRGANConfig(nf=kw.get("nf", 16), nb=kw.get("nb", 2), gc=32, n_up=n_up, unshuffle=unshuffle)
    assert ours.config == expected
    assert ours.scale == ref.scale == 2**n_up // unshuffle
    assert ref.input_channels == ours.config.in_nc and ref.output_channels == ours.config.out_nc
    hp = ref.model.hyperparameters
    assert (hp["num_filters"], hp["num_blocks"], hp["shuffle_factor"]) == (
        expected.nf,
        expected.nb,
        unshuffle if unshuffle > 1 else None,
    )

    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, size[1], size[0], generator=g)  # odd sizes: the x2 / x1 models pad
    with torch.inference_mode():
        a, b = ours(x), ref(x)
        assert a.shape == (1, 3, size[1] * ours.scale, size[0] * ours.scale)
        assert (a.clamp(0, 1) - b).abs().max().item() < 1e-6
        assert 0.02 < ((a < 0) | (a > 1)).float().mean() < 0.5  # the clamp is exercised, not everywhere
        x = x[..., :16, :16]  # no padding anywhere: the bare spandrel network, unclamped
        assert (ours(x) - ref.model(x)).abs().max().item() < 1e-6


def test_parity_at_ultrasharp_shapes(tmp_path):
    """4x-UltraSharp / NMKD Siax / AnimeSharp: old layout, nf=64, nb=23, gc=32, x4 (16.7M parameters), on a
    16x16 image (32x32 takes ~10 s here on 2 cores)."""
    path = save(random_esrgan("old", nf=64, nb=23), tmp_path / "4x-UltraSharp.pth")
    ours, ref = load_upscaler(path), spandrel_model(path)
    assert ours.config == ESRGANConfig(nf=64, nb=23, gc=32, n_up=2) and ours.scale == ref.scale == 4
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert (ours(x) - ref.model(x)).abs().max().item() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_parity(tmp_path, dtype):
    """load_upscaler(dtype=...) against spandrel's model cast the same way: bit-identical too."""
    path = save(random_esrgan("new", unshuffle=2), tmp_path / "x2.pth", "params")
    ours, ref = load_upscaler(path, dtype=dtype), spandrel_model(path).to(dtype)
    assert next(ours.parameters()).dtype == dtype
    x = torch.rand(1, 3, 19, 21, generator=torch.Generator().manual_seed(1), dtype=dtype)
    with torch.inference_mode():
        assert torch.equal(ours(x).clamp(0, 1), ref(x))


def test_growth_channels_read_from_shapes(tmp_path):
    """gc is read off the file (spandrel assumes 32): a gc=16 network loads and runs."""
    path = save(random_esrgan("new", gc=16, calibrate=False), tmp_path / "gc16.safetensors")
    model = load_upscaler(path, dtype=torch.float64)
    assert model.config.gc == 16 and next(model.parameters()).dtype == torch.float64
    assert model(torch.rand(1, 3, 5, 7, dtype=torch.float64)).shape == (1, 3, 20, 28)


def _image(w, h, seed=0):
    """A smooth-ish RGB image: random colours, bilinearly enlarged."""
    rng = np.random.default_rng(seed)
    small = PIL.Image.fromarray(rng.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3), dtype=np.uint8))
    return small.resize((w, h), PIL.Image.Resampling.BILINEAR)


def _a1111(ref, image, bgr=False):
    """A1111's upscale_pil_patch around spandrel's model (upscaler_utils: its BGR flip optional here)."""
    arr = np.array(image.convert("RGB"))
    arr = arr[:, :, ::-1] if bgr else arr
    x = torch.from_numpy(np.ascontiguousarray(np.transpose(arr, (2, 0, 1))) / 255).float()[None]
    with torch.inference_mode():
        out = ref(x)[0].float().cpu().clamp_(0, 1).numpy()
    out = (255.0 * np.moveaxis(out, 0, 2)).round().astype(np.uint8)
    return out[:, :, ::-1] if bgr else out


@pytest.fixture(scope="module")
def x4(tmp_path_factory):
    path = save(random_esrgan("old", seed=3), tmp_path_factory.mktemp("x4") / "4x.pth")
    return load_upscaler(path), spandrel_model(path)


@pytest.fixture(scope="module")
def x2(tmp_path_factory):
    path = save(random_esrgan("new", unshuffle=2, seed=4), tmp_path_factory.mktemp("x2") / "x2.pth", "params_ema")
    return load_upscaler(path), spandrel_model(path)


@pytest.mark.parametrize("bgr", [False, True])
@pytest.mark.parametrize("which", ["x4", "x2"])
def test_upscale_matches_a1111_conversion(request, which, bgr):
    ours, ref = request.getfixturevalue(which)
    image = _image(30, 21).convert("RGBA")  # alpha is dropped, as A1111's convert("RGB")
    out = upscale(ours, image, bgr=bgr)
    assert out.mode == "RGB" and out.size == (30 * ours.scale, 21 * ours.scale)
    expected = _a1111(ref, image, bgr)
    assert np.array_equal(np.asarray(out), expected)
    assert 0 < (expected == 0).mean() + (expected == 255).mean() < 0.5  # some clipping, not all
    assert np.array_equal(np.asarray(upscale(ours, image, tile=32, bgr=bgr)), expected)  # one tile = untiled


@pytest.mark.parametrize("which", ["x4", "x2"])
def test_tiled_close_to_untiled(request, which):
    """3x3 tiles of 16 px on a 44x39 image (2x2 tiles of 24 px for the largest overlap). An output near a seam
    moves when its tile gives it less context than the network reaches (these 2-block nets: 32 convs at the
    input resolution, ~33 px; the x2 net at half resolution). Measured, in 8-bit levels: overlap 12 -> max 1,
    on 0.006% (x4) / 0.9% (x2) of values; overlap 36 -> identical; no overlap -> seams up to 255 levels off.
    A 23-block model reaches ~350 px; how much that far context matters with trained weights is not
    measured here (no real weights in the tests)."""
    ours, _ = request.getfixturevalue(which)
    image = _image(44, 39, seed=5)
    whole = np.asarray(upscale(ours, image, tile=0)).astype(int)
    diff = np.abs(np.asarray(upscale(ours, image, tile=16, overlap=12)).astype(int) - whole)
    assert diff.max() <= 1 and diff.mean() < 0.01
    assert np.abs(np.asarray(upscale(ours, image, tile=16, overlap=0)).astype(int) - whole).max() > 50
    assert np.array_equal(np.asarray(upscale(ours, image, tile=24, overlap=36)), whole)


def test_scale_other_than_the_model(x4):
    ours, _ = x4
    image = _image(40, 28, seed=6)
    native = upscale(ours, image)
    # A1111 hires fix 1.5x with a 4x model: the model, then LANCZOS to int(w * 1.5)
    out = upscale(ours, image, scale=1.5)
    assert out.size == (60, 42)
    assert np.array_equal(np.asarray(out), np.asarray(native.resize((60, 42), PIL.Image.Resampling.LANCZOS)))
    assert upscale(ours, image, scale=4).size == native.size
    assert upscale(ours, image, scale=1.33).size == (53, 37)  # int(), as A1111's hr_upscale_to_x
    # above the model's scale: the model again on its own output (A1111's Upscaler.upscale, up to 3 passes)
    small = _image(12, 8, seed=7)
    twice = upscale(ours, small, scale=6)
    assert twice.size == (72, 48)
    again = upscale(ours, upscale(ours, small)).resize((72, 48), PIL.Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(twice), np.asarray(again))


# ------------------------------------------------------------------------------------------------
# Errors


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bad")
    lora = {"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 8), "lora_unet_x.alpha": torch.ones(())}
    swinir = {"conv_first.weight": torch.zeros(1), "layers.0.residual_group.blocks.0.norm1.weight": torch.zeros(1)}
    plus = random_esrgan("old", nb=1, calibrate=False)
    plus["model.1.sub.0.RDB1.conv1x1.weight"] = torch.zeros(32, 16, 1, 1)
    misfit = random_esrgan("new", nb=1, calibrate=False)
    del misfit["conv_hr.bias"]
    misfit["conv_body.weight"] = torch.zeros(16, 16, 1, 1)
    good = save(random_esrgan("old", nb=1, calibrate=False), tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(good[: len(good) // 2])
    save_file(random_esrgan("old", nb=1, calibrate=False), str(tmp_path / "good.safetensors"))
    good = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    with open(tmp_path / "plain-pickle.pth", "wb") as f:
        pickle.dump({"net": pickle.PickleError()}, f, protocol=2)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint" * 8)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    torch.save({"x": ESRGANConfig()}, str(tmp_path / "pickled.pth"))
    (tmp_path / "folder").mkdir()
    return {
        "lora": (save(lora, tmp_path / "lora.safetensors"), "looks like a LoRA"),
        "random": (
            save({"foo.weight": torch.zeros(3)}, tmp_path / "r.safetensors"),
            "not a known upscaler.*foo.weight",
        ),
        "swinir": (save(swinir, tmp_path / "swinir.pth"), "looks like SwinIR"),
        "esrgan+": (save(plus, tmp_path / "plus.pth"), "ESRGAN\\+"),
        "misfit": (
            save(misfit, tmp_path / "misfit.pth"),
            "do not fit: 1 missing: conv_hr.bias; 1 misshapen: conv_body",
        ),
        "missing": (tmp_path / "nope.pth", "no such file"),
        "truncated-pth": (tmp_path / "truncated.pth", "truncated or not a PyTorch file .PytorchStreamReader"),
        "truncated-safetensors": (tmp_path / "truncated.safetensors", "truncated.*cut short"),
        "garbage": (tmp_path / "garbage.pth", "truncated or not a PyTorch file .unreadable pickle"),
        "empty": (tmp_path / "empty.safetensors", "is empty"),
        "plain-pickle": (
            tmp_path / "plain-pickle.pth",
            "refusing to load.*pickled pickle.PickleError, not only tensors",
        ),
        "pickled-object": (tmp_path / "pickled.pth", "refusing to load.*pickled minsdxl.upscaler.ESRGANConfig"),
        "folder": (tmp_path / "folder", "is a folder"),
        "suffix": (save({}, tmp_path / "model.onnx"), "unknown file type"),
    }


_BAD = ["lora", "random", "swinir", "esrgan+", "misfit", "missing", "truncated-pth", "truncated-safetensors",
        "garbage", "empty", "plain-pickle", "pickled-object", "folder", "suffix"]  # fmt: skip


@pytest.mark.parametrize("case", _BAD)
def test_errors_name_the_problem(bad_files, case):
    path, message = bad_files[case]
    with pytest.raises(CheckpointError, match=message):
        load_upscaler(path)
