"""AutoencoderKL parity with diffusers on the same random weights (fp32, CPU): encoder mean/std,
posterior sample with the same generator, decode; tiny 4-level topology and the real SDXL VAE.

Tolerance: max|delta| <= 1e-5 * max|reference| (the issue's bound; both sides run the same fp32 ops)."""

import diffusers
import pytest
import torch
from sdxl_testing import TINY_VAE, diffusers_vae_config, meta_diffusers, random_state_dict, rel_err

from minsdxl.config import VAE_PRESETS
from minsdxl.vae import AutoencoderKL

TOL = 1e-5


def _pair(cfg, seed):
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
    sd = random_state_dict(ours, seed)
    ref = meta_diffusers(diffusers.AutoencoderKL, diffusers_vae_config(cfg), sd)
    ours.load_state_dict(sd, strict=True, assign=True)  # diffusers' keys, no renaming
    return ref, ours.eval()


@pytest.mark.parametrize("cfg,size", [(TINY_VAE, (32, 24)), (VAE_PRESETS["sdxl"], (64, 48))], ids=["tiny", "sdxl"])
def test_vae_matches_diffusers(cfg, size):
    ref, ours = _pair(cfg, seed=4)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, *size, generator=g) * 2 - 1
    z = torch.randn(2, 4, size[0] // 8, size[1] // 8, generator=g)
    with torch.no_grad():
        a, b = ref.encode(x).latent_dist, ours.encode(x)
        assert b.mean.shape == (2, 4, size[0] // 8, size[1] // 8)
        assert rel_err(b.mean, a.mean) <= TOL
        assert rel_err(b.std, a.std) <= TOL
        assert rel_err(b.mode(), a.mode()) <= TOL
        # same generator -> same posterior draw (= DiagonalGaussianDistribution.sample)
        s1 = b.sample(torch.Generator().manual_seed(7))
        s2 = a.sample(torch.Generator().manual_seed(7))
        assert rel_err(s1, s2) <= TOL
        assert not torch.equal(s1, b.sample(torch.Generator().manual_seed(8)))
        expected = ref.decode(z).sample
        got = ours.decode(z)
        assert got.shape == (2, 3, *size)
        assert rel_err(got, expected) <= TOL


def test_scaling_factor_and_upcast_from_config():
    cfg = VAE_PRESETS["sdxl"]
    with torch.device("meta"):
        vae = AutoencoderKL(cfg)
    assert vae.scaling_factor == 0.13025 and vae.force_upcast is True


@pytest.mark.parametrize("slicing", [False, True], ids=["batch", "sliced"])
def test_tiling_and_slicing_match_diffusers(slicing):
    # tiles of 32 px / 4 latents (the defaults are SDXL's 1024 / 128, checked below): a 56 x 88 image is
    # 3 x 4 overlapping tiles, the last ones cut short, blended above and left as diffusers does
    ref, ours = _pair(TINY_VAE, seed=5)
    for m in (ref, ours):
        m.enable_tiling()
        if slicing:
            m.enable_slicing()
        m.tile_sample_min_size, m.tile_latent_min_size = 32, 4
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 56, 88, generator=g) * 2 - 1
    z = torch.randn(2, 4, 7, 11, generator=g)
    with torch.no_grad():
        a, b = ref.encode(x).latent_dist, ours.encode(x)
        assert b.mean.shape == (2, 4, 7, 11)
        assert rel_err(b.mean, a.mean) <= TOL and rel_err(b.std, a.std) <= TOL
        got = ours.decode(z)
        assert got.shape == (2, 3, 56, 88) and rel_err(got, ref.decode(z).sample) <= TOL
        ours.disable_tiling()
        assert rel_err(ours.decode(z), got) > 1e-3  # the tiles did change the image
        ours.disable_slicing()
        ref.disable_tiling()
        assert rel_err(ours.decode(z), ref.decode(z).sample) <= TOL


def test_tile_sizes_default_to_diffusers():
    for cfg in (TINY_VAE, VAE_PRESETS["sdxl"]):
        ref, ours = _pair(cfg, seed=0)
        assert (ours.tile_sample_min_size, ours.tile_latent_min_size, ours.tile_overlap_factor) == (
            ref.tile_sample_min_size,
            ref.tile_latent_min_size,
            ref.tile_overlap_factor,
        )
        assert not ours.use_tiling and not ours.use_slicing
