"""DPM++ SDE (minsdxl.schedulers.DPMSolverSDE) against diffusers' DPMSolverSDEScheduler, and its Brownian noise
(minsdxl.rng.BrownianInterval) against torchsde's BrownianInterval, which diffusers draws it from.

Bit for bit: the Brownian increments for diffusers' own queries and random ones (fp32, fp16, several shapes);
timesteps and sigmas for every spacing, with and without Karras sigmas; whole trajectories under a fixed random
model (fp32 and fp16, epsilon and v_prediction, noise_sampler_seed set, or None with torch.manual_seed); the
img2img / inpaint / refiner / base flows through the diffusers pipelines' own get_timesteps. Then the names, the
config mapping, what is refused, and text2img against StableDiffusionXLPipeline on the tiny model.
"""

import random

import diffusers
import pytest
import torch
import torchsde
from diffusers import DPMSolverSDEScheduler
from diffusers.schedulers import scheduling_dpmsolver_sde
from diffusers.utils import logging as diffusers_logging
from sdxl_testing import rel_err
from test_schedulers import _B, _W, SDXL, SPACINGS, diffusers_cut, diffusers_end, latents
from test_schedulers import denoise as denoise_with

import minsdxl
from minsdxl import schedulers as S
from minsdxl.rng import BrownianInterval

diffusers_logging.set_verbosity_error()
# torchsde warns where it clamps a query time to [t0, t1]: diffusers' σ_fn(t_fn(σ_max)) lands 1 ulp above σ_max
pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")


def eps_fn(x_in, t):
    """test_schedulers' fixed random "UNet", reading t as float32 as the UNet does (get_timestep_embedding's
    .float()): diffusers keeps this class's timesteps in float64, ours are float32, the UNet sees the same."""
    w, b = _W.to(x_in.dtype), _B.to(x_in.dtype)
    t = float(torch.as_tensor(t).float())
    return torch.tanh(torch.einsum("bchw,cd->bdhw", x_in, w) + b * (t / 1000)) + 0.1 * x_in


def denoise(sched, timesteps, x, diffusers, inpaint=None):
    return denoise_with(sched, timesteps, x, diffusers, inpaint=inpaint, model=eps_fn)


def make_pair(karras=False, **cfg):
    """diffusers' scheduler and ours (by name) from SDXL's config with `cfg`."""
    config, name = {**SDXL, "use_karras_sigmas": karras, **cfg}, "dpmpp_sde_karras" if karras else "dpmpp_sde"
    return DPMSolverSDEScheduler.from_config(config), S.make_scheduler(name, config)


def assert_equal_runs(got, want, dtype=torch.float32):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype == dtype
        assert torch.equal(a, b), f"step {i}: max diff {(a.double() - b.double()).abs().max():.3g}"


# ------------------------------------------------------------------------------------------ Brownian noise
def twins(t0, t1, size, dtype, entropy):
    """torchsde's Brownian interval as diffusers' BatchedBrownianTree makes it, and ours."""
    ref = torchsde.BrownianInterval(
        t0=t0, t1=t1, size=size, dtype=dtype, entropy=entropy, tol=1e-6, pool_size=24, halfway_tree=True
    )
    return ref, BrownianInterval(t0, t1, size, dtype, "cpu", entropy)


def recorded_queries(monkeypatch, karras, n):
    """The (σ_min, σ_max) tree and the W(ta, tb) queries diffusers' scheduler makes in an n-step run."""
    tree_cls, seen = scheduling_dpmsolver_sde.BatchedBrownianTree, {"queries": []}
    init, call = tree_cls.__init__, tree_cls.__call__

    def record_init(self, x, t0, t1, seed=None, **kw):
        seen["span"] = (float(t0), float(t1))
        init(self, x, t0, t1, seed, **kw)

    def record_call(self, t0, t1):
        seen["queries"].append(tuple(sorted((float(t0), float(t1)))))
        return call(self, t0, t1)

    monkeypatch.setattr(tree_cls, "__init__", record_init)
    monkeypatch.setattr(tree_cls, "__call__", record_call)
    ref, _ = make_pair(karras, noise_sampler_seed=0)
    ref.set_timesteps(n)
    denoise(ref, ref.timesteps, latents(1, float(ref.init_noise_sigma)), diffusers=True)
    monkeypatch.undo()
    return seen["span"], seen["queries"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("karras", [False, True])
def test_brownian_increments_equal_torchsde_for_diffusers_queries(monkeypatch, karras, dtype):
    (t0, t1), queries = recorded_queries(monkeypatch, karras, 12)
    assert len(queries) == 2 * 11  # two per step but the last (Euler's)
    for size, entropy in (((2, 4, 8, 8), 2**63 - 25), ((1, 4, 16, 12), 7)):
        ref, ours = twins(t0, t1, size, dtype, entropy)
        for ta, tb in queries:
            want = ref(ta, tb)
            assert want.dtype == dtype and torch.equal(ours(ta, tb), want), (ta, tb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_brownian_increments_equal_torchsde_for_random_queries(dtype):
    """Any order, nested, overlapping, repeated, beyond [t0, t1] (clamped, as torchsde does)."""
    rng = random.Random(0)
    for trial, size in enumerate([(3,), (2, 4, 8, 8), (1, 4, 5, 7)]):
        t0, t1 = sorted(rng.uniform(0.01, 20) for _ in range(2))
        ref, ours = twins(t0, t1, size, dtype, rng.randrange(2**63 - 1))
        queries = [tuple(sorted(rng.uniform(t0 - 0.1, t1 + 0.1) for _ in range(2))) for _ in range(40)]
        mid = (t0 + t1) / 2
        queries += [(t0, t1), (t0, mid), queries[3], (mid, mid + 2e-6)]  # the last: 1-3 tol steps apart
        for ta, tb in queries:
            assert torch.equal(ours(ta, tb), ref(ta, tb)), (trial, ta, tb)
    assert torch.equal(ours(1.0, 1.0), torch.zeros(size, dtype=dtype))
    with pytest.raises(ValueError, match="ta <= tb"):
        ours(t1, t0)


def test_brownian_motion_does_not_depend_on_the_query_order():
    """The halfway tree makes W a function of the entropy alone: a query gives the same numbers whatever came
    before, and increments add up (W(a, c) = W(a, b) + W(b, c) up to float rounding)."""
    a, b, c = 0.5, 3.25, 9.0
    fresh = BrownianInterval(0.03, 14.6, (4, 4), torch.float64, "cpu", 3)
    later = BrownianInterval(0.03, 14.6, (4, 4), torch.float64, "cpu", 3)
    for q in [(0.1, 14.0), (7.0, 7.5), (2.0, 3.0)]:
        later(*q)
    assert torch.equal(fresh(a, c), later(a, c))
    torch.testing.assert_close(fresh(a, b) + fresh(b, c), fresh(a, c), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- tables
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_and_sigmas_equal_diffusers(spacing, karras):
    ref, ours = make_pair(karras, timestep_spacing=spacing)
    assert ours.order == ref.order == 2 and ours.karras is karras
    for n in (*range(1, 31), 50, 61, 99, 100):
        ref.set_timesteps(n)
        ours.set_timesteps(n)
        # 2N - 1 UNet calls ("trailing" can space N + 1 points, 61 steps: diffusers keeps them, as we do)
        assert len(ours.timesteps) == len(ref.timesteps) and ours.num_inference_steps == n
        # diffusers' are float64 (fractional midpoints); the UNet reads them as float32, which ours are
        assert torch.equal(ours.timesteps, ref.timesteps.float()), n
        assert torch.equal(ours.sigmas, ref.sigmas), n
        assert ours.init_noise_sigma == float(ref.init_noise_sigma)


# -------------------------------------------------------------------------------------------- trajectories
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_trajectory_equals_diffusers_with_a_noise_sampler_seed(spacing, karras, prediction_type):
    ref, ours = make_pair(karras, timestep_spacing=spacing, prediction_type=prediction_type, noise_sampler_seed=12345)
    for n in (1, 2, 7, 20):
        ref.set_timesteps(n)
        ours.set_timesteps(n)
        x = latents(n, float(ref.init_noise_sigma))
        assert_equal_runs(denoise(ours, ours.timesteps, x, False), denoise(ref, ref.timesteps, x, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_trajectory_equals_diffusers_under_torch_manual_seed(prediction_type, dtype):
    """noise_sampler_seed None: the seed is drawn from the global RNG at the first step, once per run, exactly
    as diffusers draws it (the RNG is left in the same state too); fp16 latents stay fp16, as there."""
    runs = {}
    for side in ("ours", "diffusers"):
        ref, ours = make_pair(True, prediction_type=prediction_type)
        sched = ref if side == "diffusers" else ours
        torch.manual_seed(2024)
        runs[side] = []
        for n in (6, 6, 3):  # a second run draws a new seed: another path
            sched.set_timesteps(n)
            x = latents(n, float(sched.init_noise_sigma)).to(dtype)
            runs[side] += denoise(sched, sched.timesteps, x, side == "diffusers")
        runs[side].append(torch.rand(3))  # the global RNG after the runs
    assert_equal_runs(runs["ours"][:-1], runs["diffusers"][:-1], dtype)
    assert torch.equal(runs["ours"][-1], runs["diffusers"][-1])
    assert not torch.equal(runs["ours"][10], runs["ours"][21])  # the two 6-step runs (11 calls each) end apart


def test_batch_is_one_brownian_motion_or_one_per_image_for_a_list_of_seeds():
    """One seed: one motion over the whole batch tensor, as diffusers; a list: one per image, the way diffusers'
    BatchedBrownianTree takes it, so an image's noise does not depend on the batch it is in."""
    x = latents(5, 14.6)
    for seed in (3, [3, 4]):
        ref, ours = make_pair(noise_sampler_seed=seed)
        ref.set_timesteps(5)
        ours.set_timesteps(5)
        assert_equal_runs(denoise(ours, ours.timesteps, x, False), denoise(ref, ref.timesteps, x, True))
    alone = make_pair(noise_sampler_seed=[4])[1]
    alone.set_timesteps(5)
    together = make_pair(noise_sampler_seed=[3, 4])[1]
    together.set_timesteps(5)
    a, b = denoise(alone, alone.timesteps, x[1:], False)[-1], denoise(together, together.timesteps, x, False)[-1]
    torch.testing.assert_close(a[0], b[1], rtol=1e-6, atol=1e-6)  # the fake model is per-pixel; the noise alike
    ours = make_pair(noise_sampler_seed=[1, 2, 3])[1]
    ours.set_timesteps(3)
    with pytest.raises(ValueError, match="3 seeds for a batch of 2"):
        denoise(ours, ours.timesteps, x, False)


# -------------------------------------------------------------------------------------- pipeline flows
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_pipeline_flows_equal_diffusers(spacing, karras):
    """img2img and 4-channel inpaint (strength cut, add_noise, re-noising after each step), base with
    denoising_end then refiner with denoising_start, through the diffusers pipelines' own cut logic."""
    cfg = dict(timestep_spacing=spacing, noise_sampler_seed=99)
    (ref, ours), (ref2, ours2) = make_pair(karras, **cfg), make_pair(karras, **cfg)
    n, x0, noise = 10, latents(20), latents(21)
    mask = (torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    for strength, inpaint in ((0.5, None), (0.75, (x0, noise, mask)), (0.3, None)):
        want_ts, begin = diffusers_cut(ref, n, strength)
        want_x = ref.add_noise(x0, noise, want_ts[:1])
        ours.set_timesteps(n)
        ts = ours.select_timesteps(strength=strength)
        assert torch.equal(ts, want_ts.float()) and ours.begin_index == begin and begin % 2 == 0
        x = ours.add_noise(x0, noise, ts[:1])
        assert torch.equal(x, want_x)
        assert_equal_runs(denoise(ours, ts, x, False, inpaint), denoise(ref, want_ts, x, True, inpaint))

    ref.set_timesteps(n)
    x = latents(22, float(ref.init_noise_sigma))
    want_base = denoise(ref, diffusers_end(ref.timesteps, 0.8), x, True)
    ours.set_timesteps(n)
    assert_equal_runs(denoise(ours, ours.select_timesteps(denoising_end=0.8), x, False), want_base)
    want_ts, begin = diffusers_cut(ref2, n, 0.3, denoising_start=0.8)
    ours2.set_timesteps(n)
    ts = ours2.select_timesteps(denoising_start=0.8)
    assert torch.equal(ts, want_ts.float()) and ours2.begin_index == begin and begin % 2 == 0
    assert_equal_runs(denoise(ours2, ts, want_base[-1], False), denoise(ref2, want_ts, want_base[-1], True))


# ------------------------------------------------------------------------------------------ names, config
@pytest.mark.parametrize(
    "name,karras",
    [("dpmpp_sde", False), ("DPM++ SDE", False), ("dpmpp_sde_karras", True), ("DPM++ SDE Karras", True)],
)
def test_names_users_type(name, karras):
    s = S.make_scheduler(name, SDXL)
    assert type(s) is S.DPMSolverSDE and s.karras is karras and s.order == 2
    assert s.name == ("dpmpp_sde_karras" if karras else "dpmpp_sde") and s.name in S.SCHEDULERS
    assert S.make_scheduler(name.lower(), SDXL).config == s.config  # A1111 names, case-insensitively
    assert S.make_scheduler(s.name, s.config).config == s.config  # its own name gives it back
    assert S.make_scheduler(name, {**SDXL, "use_karras_sigmas": not karras}).karras is karras  # the name pins it


@pytest.mark.parametrize("extra", [{}, {"use_karras_sigmas": True, "noise_sampler_seed": 5}])
def test_a_config_naming_the_class_makes_it(extra):
    config = dict(DPMSolverSDEScheduler.from_config({**SDXL, **extra}).config)  # as save_config writes it
    assert config["_class_name"] == "DPMSolverSDEScheduler"
    ours = S.make_scheduler(None, config)
    assert type(ours) is S.DPMSolverSDE and ours.karras is extra.get("use_karras_sigmas", False)
    assert ours.config["noise_sampler_seed"] == extra.get("noise_sampler_seed")
    assert S.make_scheduler(ours.name, config).config == ours.config


def test_class_defaults_fill_a_sparse_config():
    # diffusers' __init__ defaults: linear betas 0.00085..0.012, "linspace" spacing (fractional timesteps)
    config = {"_class_name": "DPMSolverSDEScheduler", "noise_sampler_seed": 1}
    ref, ours = DPMSolverSDEScheduler.from_config(config), S.make_scheduler(None, config)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    ref.set_timesteps(7)
    ours.set_timesteps(7)
    assert torch.equal(ours.timesteps, ref.timesteps.float()) and torch.equal(ours.sigmas, ref.sigmas)
    x = latents(1, float(ref.init_noise_sigma))
    assert_equal_runs(denoise(ours, ours.timesteps, x, False), denoise(ref, ref.timesteps, x, True))


@pytest.mark.parametrize(
    "key,value",
    [
        ("rescale_betas_zero_snr", True),  # diffusers' class has no such key: it would ignore it
        ("prediction_type", "sample"),  # diffusers' step raises NotImplementedError
        ("beta_schedule", "squaredcos_cap_v2"),
        ("noise_sampler_seed", -1),
        ("noise_sampler_seed", "42"),
        ("noise_sampler_seed", [1, 2.5]),
    ],
)
def test_unsupported_config_values_are_named(key, value):
    with pytest.raises(ValueError, match=key):
        S.make_scheduler("dpmpp_sde", {**SDXL, key: value})


def test_custom_schedules_and_edm_models_are_refused():
    with pytest.raises(ValueError, match="takes no custom timesteps"):
        S.make_scheduler("dpmpp_sde", SDXL).set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError, match="takes no custom sigmas"):
        S.make_scheduler("dpmpp_sde_karras", SDXL).set_timesteps(sigmas=[14.6, 1.0, 0.0])
    with pytest.raises(ValueError, match="no EDM counterpart"):
        S.make_scheduler("DPM++ SDE Karras", {"_class_name": "EDMEulerScheduler", "sigma_data": 0.5})


# -------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def base(tiny_base):
    pipe, folder = tiny_base
    return pipe, minsdxl.load(folder)


@pytest.mark.parametrize("karras,seed", [(True, None), (False, 31337)], ids=["karras-global-rng", "config-seed"])
def test_text2img_equals_diffusers_pipeline(base, karras, seed):
    """seed None: torch.manual_seed before each call gives diffusers' image; a config's noise_sampler_seed
    (a model whose scheduler_config.json names DPMSolverSDEScheduler) gives it whatever the global RNG."""
    pipe, model = base
    config = {**pipe.scheduler.config, "use_karras_sigmas": karras, "noise_sampler_seed": seed}
    ref_pipe = diffusers.StableDiffusionXLPipeline(
        **{**pipe.components, "scheduler": DPMSolverSDEScheduler.from_config(config)}
    )
    ref_pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a cat", num_inference_steps=4, num_images_per_prompt=2, height=64, width=64)
    torch.manual_seed(11)
    ref = ref_pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="latent").images
    if seed is None:
        torch.manual_seed(11)
        scheduler = "DPM++ SDE Karras"  # on the model's own (Euler) config, as from_config above
    else:
        torch.manual_seed(12)
        scheduler = S.make_scheduler(None, dict(DPMSolverSDEScheduler.from_config(config).config))
    kw.update(output_type="latent", scheduler=scheduler, progress=False)
    got = minsdxl.text2img(model, **kw, generator=torch.Generator().manual_seed(0))
    assert got.shape == ref.shape
    err = rel_err(got, ref)
    assert err <= 1e-4, f"final latents differ: relative error {err:.2e}"
    if seed is None:  # the global RNG's draw is the Brownian motion's seed: another one, another image
        torch.manual_seed(12)
        assert rel_err(minsdxl.text2img(model, **kw, generator=torch.Generator().manual_seed(0)), ref) > 1e-3


def test_seed_fixes_the_brownian_motion_too(base):
    """seed=S (the CLI's --seed) = diffusers with generator S after torch.manual_seed(S), whatever the global
    RNG holds: the Brownian motion's seed is the one diffusers' step would draw there."""
    pipe, model = base
    ref_pipe = diffusers.StableDiffusionXLPipeline(
        **{**pipe.components, "scheduler": DPMSolverSDEScheduler.from_config(pipe.scheduler.config)}
    )
    ref_pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a cat", num_inference_steps=3, height=64, width=64, output_type="latent")
    torch.manual_seed(5)
    ref = ref_pipe(**kw, generator=torch.Generator().manual_seed(5)).images
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(minsdxl.text2img(model, **kw, scheduler="dpmpp_sde", seed=5, progress=False))
    assert torch.equal(runs[0], runs[1]) and rel_err(runs[0], ref) <= 1e-4
