"""Token Merging (minsdxl.tome) against the tomesd package on diffusers' UNet: the same random weights, the same
settings and, for its random destination cells, the same global RNG seed (tomesd forks it)."""

import numpy as np
import PIL.Image
import pytest
import tomesd
import torch
from sdxl_testing import TINY_UNET, random_state_dict, rel_err
from test_unet import _inputs, _pair, diffusers_unet_config_model

import minsdxl
from minsdxl import tome

SETTINGS = {  # tomesd.apply_patch arguments (max_downsample 2 or more: SDXL's first level has no attention)
    "fixed_cells": dict(ratio=0.5, max_downsample=2, use_rand=False),
    "random_cells": dict(ratio=0.5, max_downsample=2),
    "all_levels_all_parts": dict(ratio=0.6, max_downsample=4, merge_crossattn=True, merge_mlp=True),
    "level_one_only": dict(ratio=0.5),  # tomesd's default: no SDXL level qualifies, the UNet is unchanged
}


@pytest.fixture(scope="module")
def pair():
    return _pair(TINY_UNET, random_state_dict(diffusers_unet_config_model(TINY_UNET), seed=1))


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("batch,h,w", [(2, 16, 16), (2, 20, 12), (1, 16, 16)])  # 20 x 12: cells off the grid
def test_unet_equals_tomesd(pair, name, batch, h, w):
    ref, ours = pair
    x, ctx, text, ids = _inputs(TINY_UNET, batch, h, w, 0)
    plain = ours(x, 500.0, ctx, text, ids)
    tomesd.apply_patch(ref, **SETTINGS[name])
    tome.apply_patch(ours, **SETTINGS[name])
    try:
        torch.manual_seed(5)
        expected = ref(x, 500.0, ctx, added_cond_kwargs={"text_embeds": text, "time_ids": ids}).sample
        torch.manual_seed(5)
        got = ours(x, 500.0, ctx, text, ids)
    finally:
        tomesd.remove_patch(ref)
        tome.remove_patch(ours)
    assert rel_err(got, expected) <= 1e-6  # measured 0.0: the same ops in the same order
    changed = rel_err(got, plain)
    assert changed == 0.0 if name == "level_one_only" else changed > 1e-3
    assert torch.equal(ours(x, 500.0, ctx, text, ids), plain)  # remove_patch: as before


def test_text2img_equals_diffusers_with_tomesd(tiny_base):
    pipe = tiny_base[0]
    pipe.set_progress_bar_config(disable=True)
    model = minsdxl.load(tiny_base[1])
    kw = dict(prompt="a red box", num_inference_steps=3, height=64, width=64, output_type="latent")
    tomesd.apply_patch(pipe, ratio=0.5, max_downsample=2, use_rand=False)
    tome.apply_patch(model, ratio=0.5, max_downsample=2, use_rand=False)
    try:
        expected = pipe(**kw, generator=torch.Generator().manual_seed(1)).images
        got = minsdxl.text2img(model, **kw, seed=1, progress=False)
    finally:
        tomesd.remove_patch(pipe)
    assert rel_err(got, expected) <= 1e-4
    assert rel_err(got, minsdxl.text2img(model, **kw, seed=1, progress=False)) == 0.0  # (still patched)
    tome.remove_patch(model)
    assert rel_err(got, minsdxl.text2img(model, **kw, seed=1, progress=False)) > 1e-3


def test_bad_settings_and_the_command_line(tmp_path, capsys):
    model = minsdxl.load("tiny")
    with pytest.raises(ValueError, match="ratio must be in"):
        tome.apply_patch(model, ratio=0.9)
    with pytest.raises(ValueError, match="max_downsample must be 1, 2, 4 or 8"):
        tome.apply_patch(model, max_downsample=3)
    from minsdxl.cli import main, read_png_metadata

    out = tmp_path / "t.png"
    argv = ["-p", "a red box", "--steps", "2", "-W", "64", "-H", "64", "-s", "3", "-q", "--no-watermark"]
    assert main([*argv, "--tome", "0.5", "-o", str(out)]) == 0
    tome.apply_patch(model, ratio=0.5, max_downsample=2, use_rand=False)
    made = minsdxl.text2img(model, "a red box", num_inference_steps=2, width=64, height=64, seed=3, progress=False)[0]
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(made))
    assert read_png_metadata(out)["minsdxl"]["args"]["tome"] == 0.5
    assert main(["--from-png", str(out), "-q", "-o", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "again.png")), np.asarray(made))
    assert main([*argv, "--tome", "0.9"]) == 1
    assert "--tome 0.9: the share of tokens merged is in [0, 0.75]" in capsys.readouterr().err
