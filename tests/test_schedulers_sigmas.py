"""diffusers' exponential and beta σ schedules (use_exponential_sigmas, use_beta_sigmas) in minsdxl.schedulers.

The beta one needs Beta(0.6, 0.6) quantiles: minsdxl.schedulers.beta_ppf against scipy.stats.beta.ppf, which
diffusers calls. Then, for every class whose diffusers twin has _convert_to_exponential / _convert_to_beta (Euler,
Heun, DPM2 (a), LMS, DPM++ SDE, DPM++ multistep and singlestep, UniPC, DEIS): timesteps, sigmas and
init_noise_sigma bit for bit for every spacing and many step counts, with the config's sigma_min / sigma_max and
final_sigmas_type too; whole fp32 trajectories under the fixed random model, bit for bit but LMS (its weights are
~1e-7 off diffusers' numerical integral: test_schedulers); the generated names, A1111-style names and the
round trip of `.name`; what is refused; and text2img against StableDiffusionXLPipeline on the tiny model.
"""

import diffusers
import numpy as np
import pytest
import scipy.stats
import torch
from diffusers import (
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    DPMSolverSinglestepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils import logging as diffusers_logging
from sdxl_testing import rel_err
from test_schedulers import SDXL, SPACINGS, close, latents
from test_schedulers_sde import assert_equal_runs, denoise

import minsdxl
from minsdxl import schedulers as S

diffusers_logging.set_verbosity_error()
# torchsde warns where it clamps a query time to [t0, t1] (DPM++ SDE; see test_schedulers_sde)
pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")

KINDS = ["exponential", "beta"]
# (our base name, diffusers class, config keys that make diffusers' class the same scheduler); with a kind, the
# name f"{base}_{kind}" and the config's use_{kind}_sigmas=True
CASES = [
    ("euler", EulerDiscreteScheduler, {}),
    ("heun", HeunDiscreteScheduler, {}),
    ("dpm2", KDPM2DiscreteScheduler, {}),
    ("dpm2_a", KDPM2AncestralDiscreteScheduler, {}),
    ("lms", LMSDiscreteScheduler, {}),
    ("dpmpp_sde", DPMSolverSDEScheduler, {"noise_sampler_seed": 3}),
    ("dpmpp_2m", DPMSolverMultistepScheduler, {}),
    ("dpmpp_2m_sde", DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    ("dpmpp_3m", DPMSolverMultistepScheduler, {"solver_order": 3}),
    ("dpmpp_2s", DPMSolverSinglestepScheduler, {}),
    ("dpmpp_3s_sde", DPMSolverSinglestepScheduler, {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}),
    ("unipc", UniPCMultistepScheduler, {}),
    ("deis", DEISMultistepScheduler, {"solver_order": 3}),
]
IDS = [c[0] for c in CASES]
# one case per diffusers class: the σ tables do not depend on the solver's order or SDE
TABLE_CASES = [c for c in CASES if c[0] not in ("dpmpp_2m_sde", "dpmpp_3m", "dpmpp_3s_sde")]


def make_pair(base, cls, extra, kind, **cfg):
    config = {**SDXL, **extra, f"use_{kind}_sigmas": True, **cfg}
    return cls.from_config(config), S.make_scheduler(f"{base}_{kind}", config)


def assert_same_tables(ours, ref):
    assert torch.equal(ours.timesteps, ref.timesteps.float()), (ours.timesteps, ref.timesteps)
    assert torch.equal(ours.sigmas, ref.sigmas), (ours.sigmas, ref.sigmas)
    assert float(ours.init_noise_sigma) == float(ref.init_noise_sigma)


# ------------------------------------------------------------------------------------------ Beta quantiles
def test_beta_ppf_equals_scipy():
    """Measured max |ours - scipy| over these points: 3.5e-15 (a = b = 0.1), ≤ 1.5e-15 for the others, 7.8e-16
    for (0.6, 0.6), and 1.6e-15 over all 500k points of 2..1000-step beta schedules (a quarter bit-equal); mpmath
    at 40 digits puts both within a few ulp of the true quantile (scipy mostly closer)."""
    rng = np.random.default_rng(0)
    tails = 10.0 ** -np.arange(1, 13)
    ps = np.concatenate([np.linspace(0, 1, 1001), rng.random(500), tails, 1 - tails])
    for a, b in [(0.6, 0.6), (0.5, 0.5), (1, 1), (2, 5), (5, 2), (0.3, 3), (3, 0.3), (0.1, 0.1), (10, 10), (5, 0.5)]:
        ours = np.array([S.beta_ppf(float(p), a, b) for p in ps])
        want = scipy.stats.beta.ppf(ps, a, b)
        assert np.abs(ours - want).max() <= 1e-14, (a, b, ps[np.abs(ours - want).argmax()])
        assert ours[0] == 0 and ours[1000] == 1 and np.all(np.diff(ours[:1001]) >= 0)
    # the points diffusers' _convert_to_beta asks for: 1 - linspace(0, 1, n)
    for n in (2, 3, 7, 30, 100, 1000):
        q = 1 - np.linspace(0, 1, n)
        got = np.array([S.beta_ppf(float(p), 0.6, 0.6) for p in q])
        assert np.abs(got - scipy.stats.beta.ppf(q, 0.6, 0.6)).max() <= 1e-14


# ---------------------------------------------------------------------------------------------- tables
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("base,cls,extra", TABLE_CASES, ids=[c[0] for c in TABLE_CASES])
def test_timesteps_and_sigmas_equal_diffusers(base, cls, extra, kind):
    """Bit for bit, timesteps included: DPM-Solver, UniPC and DEIS truncate theirs (the int64 cast), the others
    keep _sigma_to_t's fractions (float32 here; diffusers' DPM2 and DPM++ SDE keep float64, the same after the
    UNet's .float())."""
    for spacing in SPACINGS:
        ref, ours = make_pair(base, cls, extra, kind, timestep_spacing=spacing)
        assert ours.sigma_schedule == kind and ours.order == ref.order
        for n in (1, 2, 3, 7, 10, 25, 61, 100):
            ref.set_timesteps(n)
            ours.set_timesteps(n)
            assert_same_tables(ours, ref)


@pytest.mark.parametrize(
    "extra",
    [{"sigma_min": 0.1, "sigma_max": 10.0}, {"final_sigmas_type": "sigma_min"}],
    ids=["sigma-range", "final-sigma_min"],
)
@pytest.mark.parametrize("base,cls,_", TABLE_CASES, ids=[c[0] for c in TABLE_CASES])
def test_config_range_and_final_sigma_follow_diffusers(base, cls, _, extra):
    """The config's sigma_min / sigma_max span the schedule in every class (also LMS and DPM++ SDE, whose Karras
    σ ignore them); final_sigmas_type "sigma_min" ends at σ_train[0], but UniPC's and DEIS's at the last σ."""
    for kind in KINDS:
        ref, ours = make_pair(base, cls, _, kind, **extra)
        for n in (1, 7, 20):
            ref.set_timesteps(n)
            ours.set_timesteps(n)
            assert_same_tables(ours, ref)


def test_unipc_karras_ends_at_its_last_sigma_too():
    """The same final σ rule for UniPC's Karras σ (diffusers' sigmas[-1]), visible with a config sigma_min."""
    config = {**SDXL, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "sigma_min": 0.1}
    ref, ours = UniPCMultistepScheduler.from_config(config), S.make_scheduler("unipc_karras", config)
    ref.set_timesteps(12)
    ours.set_timesteps(12)
    assert_same_tables(ours, ref)
    assert ours.sigmas[-1] == ours.sigmas[-2]


# ------------------------------------------------------------------------------------------- trajectories
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("base,cls,extra", CASES, ids=IDS)
def test_trajectory_equals_diffusers(base, cls, extra, kind):
    """fp32, the fixed random model reading t as float32 (as the UNet does): bit for bit, but LMS's (≤ 4.5e-7
    measured, its weights being exact integrals where diffusers' are scipy's quad in float32)."""
    ref, ours = make_pair(base, cls, extra, kind)
    for n in (1, 2, 7, 20):
        ref.set_timesteps(n)
        ours.set_timesteps(n)
        x = latents(n, float(ref.init_noise_sigma))
        got, want = denoise(ours, ours.timesteps, x, False), denoise(ref, ref.timesteps, x, True)
        if cls is LMSDiscreteScheduler:
            assert len(got) == len(want)
            for a, b in zip(got, want):
                close(a, b, 2e-6)
        else:
            assert_equal_runs(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_v_prediction_trajectory_equals_diffusers(kind):
    ref, ours = make_pair("dpmpp_2m", DPMSolverMultistepScheduler, {}, kind, prediction_type="v_prediction")
    ref.set_timesteps(9)
    ours.set_timesteps(9)
    x = latents(9, float(ref.init_noise_sigma))
    assert_equal_runs(denoise(ours, ours.timesteps, x, False), denoise(ref, ref.timesteps, x, True))


# ------------------------------------------------------------------------------------------------ names
def test_the_classes_that_take_the_schedules_are_diffusers_ones_and_have_their_names():
    for diffusers_name, cls in S.DIFFUSERS_CLASSES.items():
        takes = hasattr(getattr(diffusers, diffusers_name), "_convert_to_beta")
        assert takes is hasattr(getattr(diffusers, diffusers_name), "_convert_to_exponential"), diffusers_name
        assert cls.sigma_schedules == (("karras", "exponential", "beta") if takes else ()), diffusers_name
    plain = ("_karras", "_exponential", "_beta")
    bases = {n for n, (cls, _) in S.SCHEDULERS.items() if cls.sigma_schedules and not n.endswith(plain)}
    assert bases == {
        "euler", "heun", "dpm2", "dpm2_a", "lms", "dpmpp_sde", "unipc", "deis",
        *(f"dpmpp_{k}{sde}" for k in ("2m", "3m", "2s", "3s") for sde in ("", "_sde")),
    }  # fmt: skip
    assert {n for n in S.SCHEDULERS if n.endswith(plain[1:])} == {f"{n}_{kind}" for n in bases for kind in KINDS}
    # each after its name (after its "_karras" twin)
    names = list(S.SCHEDULERS)
    assert names[names.index("dpmpp_2m_karras") + 1 : names.index("dpmpp_2m_karras") + 3] == [
        "dpmpp_2m_exponential",
        "dpmpp_2m_beta",
    ]


@pytest.mark.parametrize("name", [n for n in S.SCHEDULERS if n.endswith(("_exponential", "_beta"))])
def test_schedule_names_pin_the_schedule_and_make_themselves_again(name):
    kind = name.rsplit("_", 1)[1]
    for config in (SDXL, {**SDXL, "use_karras_sigmas": True}, {**SDXL, "use_exponential_sigmas": True}):
        s = S.make_scheduler(name, config)  # the name wins over the config's schedule keys, as "_karras" does
        assert s.sigma_schedule == kind and s.name == name and not s.karras
        assert [k for k, key in S.SIGMA_SCHEDULES.items() if s.config[key]] == [kind]
        again = S.make_scheduler(s.name, s.config)
        assert type(again) is type(s) and again.config == s.config


def test_names_without_a_schedule_pin_none_but_euler_heun_unipc_take_the_config():
    for name in ("dpmpp_2m", "dpmpp_2s_sde", "dpmpp_sde", "dpm2", "dpm2_a", "lms", "deis"):
        assert S.make_scheduler(name, {**SDXL, "use_beta_sigmas": True}).sigma_schedule is None
    for name in ("euler", "heun", "unipc"):
        s = S.make_scheduler(name, {**SDXL, "use_beta_sigmas": True})
        assert s.sigma_schedule == "beta" and s.name == name + "_beta"  # so the name makes it again
        s = S.make_scheduler(name, {**SDXL, "use_exponential_sigmas": True})
        assert s.sigma_schedule == "exponential" and s.name == name + "_exponential"


@pytest.mark.parametrize("cls", [c for _, c, _ in TABLE_CASES])
@pytest.mark.parametrize("kind", KINDS)
def test_a_diffusers_config_is_named_by_its_schedule(cls, kind):
    """make_scheduler(None, config) of a saved diffusers config with use_{kind}_sigmas: named with "_{kind}", and
    that name with the same config gives it back."""
    config = dict(cls.from_config({**SDXL, f"use_{kind}_sigmas": True}).config)
    ours = S.make_scheduler(None, config)
    assert ours.sigma_schedule == kind and ours.name.endswith("_" + kind) and ours.name in S.SCHEDULERS
    assert S.make_scheduler(ours.name, config).config == ours.config


def test_a1111_style_names():
    want = {
        "Euler Exponential": "euler_exponential",
        "Euler Beta": "euler_beta",
        "Heun Beta": "heun_beta",
        "DPM++ 2M Beta": "dpmpp_2m_beta",
        "DPM++ 2M Exponential": "dpmpp_2m_exponential",
        "DPM++ 2M SDE Beta": "dpmpp_2m_sde_beta",
        "DPM++ 3M SDE Exponential": "dpmpp_3m_sde_exponential",
        "DPM++ SDE Beta": "dpmpp_sde_beta",
        "DPM2 Beta": "dpm2_beta",
        "DPM2 a Exponential": "dpm2_a_exponential",
        "LMS Beta": "lms_beta",
        "UniPC Beta": "unipc_beta",
    }
    for a1111, name in want.items():
        assert S.A1111_NAMES[a1111] == name
        for typed in (a1111, a1111.lower(), f"  {a1111.upper()} "):
            assert S.make_scheduler(typed, SDXL).name == name
    # every A1111-style one: an A1111 sampler name and its schedule type, on a scheduler of that schedule
    styled = {a: n for a, n in S.A1111_NAMES.items() if a.endswith((" Exponential", " Beta"))}
    for a1111, name in styled.items():
        sampler, kind = a1111.rsplit(" ", 1)
        assert S.A1111_NAMES[sampler] + "_" + kind.lower() == name
    assert len(styled) == 2 * 10  # Euler, Heun, DPM++ 2M, 2M SDE, 3M SDE, SDE, DPM2, DPM2 a, LMS, UniPC
    for typed in ("Euler a Beta", "DDIM Exponential", "DPM++ 2M Karras Beta", "LCM Beta"):
        with pytest.raises(ValueError, match="unknown scheduler"):
            S.make_scheduler(typed, SDXL)


# ----------------------------------------------------------------------------------------------- refused
@pytest.mark.parametrize(
    "name,cls,config",
    [
        ("euler", EulerDiscreteScheduler, {"use_karras_sigmas": True, "use_beta_sigmas": True}),
        ("heun", HeunDiscreteScheduler, {"use_exponential_sigmas": True, "use_beta_sigmas": True}),
        (None, DPMSolverMultistepScheduler, {"use_karras_sigmas": True, "use_exponential_sigmas": 1}),
        (None, LMSDiscreteScheduler, {"use_exponential_sigmas": True, "use_beta_sigmas": True}),
    ],
)
def test_two_schedules_at_once_are_refused(name, cls, config):
    config = {**SDXL, **config, "_class_name": cls.__name__}
    with pytest.raises(ValueError, match="Only one of"):  # diffusers refuses the same configs
        cls.from_config(config)
    with pytest.raises(ValueError, match="at most one of use_karras_sigmas, use_exponential_sigmas and use_beta"):
        S.make_scheduler(name, config)


@pytest.mark.parametrize("name", ["euler_a", "ddim", "lcm", "tcd", "edm_euler", "edm_dpmpp_2m"])
@pytest.mark.parametrize("kind", KINDS)
def test_classes_without_the_schedule_refuse_it_and_name_those_that_take_it(name, kind):
    """diffusers' Euler a, DDIM, LCM, TCD and EDM classes have no such key (they would ignore it)."""
    key = f"use_{kind}_sigmas"
    with pytest.raises(ValueError, match=rf"{key}=True is not supported .* use one that takes it: .*'euler_{kind}'"):
        S.make_scheduler(name, {**SDXL, key: True})


def test_edm_models_and_custom_timesteps_refuse_the_schedule_names():
    edm = {"_class_name": "EDMEulerScheduler", "sigma_data": 0.5}
    with pytest.raises(ValueError, match="no EDM counterpart"):
        S.make_scheduler("DPM++ 2M Beta", edm)
    for kind in KINDS:
        s = S.make_scheduler(f"dpmpp_2m_{kind}", SDXL)
        with pytest.raises(ValueError, match=f"custom timesteps cannot be combined with {kind.capitalize()} sigmas"):
            s.set_timesteps(timesteps=[999, 500, 20])
        ref = DPMSolverMultistepScheduler.from_config({**SDXL, f"use_{kind}_sigmas": True})
        with pytest.raises(ValueError, match="Cannot set `timesteps`"):  # as diffusers
            ref.set_timesteps(timesteps=[999, 500, 20])
    # Euler's custom sigmas win over its schedule, as in diffusers
    ref, ours = make_pair("euler", EulerDiscreteScheduler, {}, "beta")
    ref.set_timesteps(sigmas=[14.6, 3.0, 0.5, 0.0])
    ours.set_timesteps(sigmas=[14.6, 3.0, 0.5, 0.0])
    assert_same_tables(ours, ref)


# -------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def base(tiny_base):
    pipe, folder = tiny_base
    return pipe, minsdxl.load(folder)


def test_text2img_equals_diffusers_pipeline(base):
    """DPMSolverMultistepScheduler(use_beta_sigmas=True) from the model's (Euler) config, as diffusers' from_config;
    ours by A1111-style name on the model's config, and from that diffusers scheduler's own saved config."""
    pipe, model = base
    ref_scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_beta_sigmas=True)
    ref_pipe = diffusers.StableDiffusionXLPipeline(**{**pipe.components, "scheduler": ref_scheduler})
    ref_pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a cat", num_inference_steps=5, height=64, width=64, output_type="latent")
    ref = ref_pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    for scheduler in ("DPM++ 2M Beta", S.make_scheduler(None, dict(ref_scheduler.config))):
        gen = torch.Generator().manual_seed(0)
        got = minsdxl.text2img(model, **kw, scheduler=scheduler, progress=False, generator=gen)
        assert got.shape == ref.shape
        err = rel_err(got, ref)
        assert err <= 1e-4, f"{scheduler}: final latents differ: relative error {err:.2e}"
