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
