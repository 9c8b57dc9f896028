"""minsdxl's EDM schedulers against diffusers' EDMEulerScheduler and EDMDPMSolverMultistepScheduler.

Parity as in test_schedulers: the same config builds both; timesteps and sigmas, whole trajectories under a
fixed random model (SDE noise from twin generators), in fp32 and fp16, and the img2img / inpaint flows through
the diffusers pipelines' own get_timesteps. Then what minsdxl refuses, and the names an EDM model takes.
"""

import itertools

import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint import (
    StableDiffusionXLInpaintPipeline,
)
from diffusers.utils import logging as diffusers_logging
from test_schedulers import SDXL, close, diffusers_cut, diffusers_end, latents
from test_schedulers import denoise as denoise_with

from minsdxl import schedulers as S
from minsdxl.checkpoint import PLAYGROUND_SCHEDULER_CONFIG

diffusers_logging.set_verbosity_error()

# Playground v2.5's scheduler_config.json (verbatim in minsdxl.checkpoint); CosXL's scheduler as diffusers' docs
# build it
PLAYGROUND = PLAYGROUND_SCHEDULER_CONFIG
COSXL = {
    "_class_name": "EDMEulerScheduler",
    "prediction_type": "v_prediction",
    "sigma_data": 1.0,
    "sigma_max": 120.0,
    "sigma_min": 0.002,
    "sigma_schedule": "exponential",
}
CONFIGS = {"playground": PLAYGROUND, "cosxl": COSXL}
CLASSES = (EDMEulerScheduler, EDMDPMSolverMultistepScheduler)

# the update rules diffusers' EDM DPM-Solver has (3rd order with SDE is broken there, refused here)
SOLVERS = [
    dict(solver_order=o, algorithm_type=a, solver_type=t)
    for o, a, t in itertools.product((1, 2, 3), ("dpmsolver++", "sde-dpmsolver++"), ("midpoint", "heun"))
    if not (o == 3 and a == "sde-dpmsolver++") and not (o == 1 and t == "heun")  # order 1 has no solver_type
]
SOLVER_IDS = [f"{s['solver_order']}{'-sde' * ('sde' in s['algorithm_type'])}-{s['solver_type']}" for s in SOLVERS]
CASES = [(EDMEulerScheduler, {})] + [(EDMDPMSolverMultistepScheduler, s) for s in SOLVERS]
CASE_IDS = ["euler"] + [f"dpm-{i}" for i in SOLVER_IDS]
FLOWS = ["euler", "dpm-2-midpoint", "dpm-2-sde-midpoint", "dpm-3-midpoint"]  # EDM Euler, DPM++ 2M, 2M SDE, 3M
# the ends of a DPM-Solver run, each combination (Euler: only final_sigmas_type applies)
ENDS = [
    dict(final_sigmas_type=f, lower_order_final=lo, euler_at_final=e)
    for f, lo, e in itertools.product(("zero", "sigma_min"), (True, False), (False, True))
]


def make_pair(cls, base, **cfg):
    """diffusers' scheduler and ours from one config; ours through make_scheduler(None, ...), as a model's."""
    config = {**base, **cfg, "_class_name": cls.__name__}
    return cls.from_config(config), S.make_scheduler(None, config)


# a fixed random "UNet" whose output depends on t at EDM's scale (0.25·log σ: about -1.6 to 1.2)
_W = torch.randn(4, 4, generator=torch.Generator().manual_seed(10)) / 2
_B = torch.randn(4, 1, 1, generator=torch.Generator().manual_seed(11))


def model(x_in, t):
    w, b = _W.to(x_in.dtype), _B.to(x_in.dtype)
    return torch.tanh(torch.einsum("bchw,cd->bdhw", x_in, w) + b * float(t)) + 0.1 * x_in


def denoise(sched, timesteps, x, diffusers, seed=7, inpaint=None):
    """test_schedulers' loop with this file's model."""
    return denoise_with(sched, timesteps, x, diffusers, seed, inpaint, model=model)


def same(a, b, rel):
    """close(), where a NaN must sit where diffusers has one (see test_trajectory_matches_diffusers)."""
    assert a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan())
    close(a.nan_to_num(), b.nan_to_num(), rel)


# ------------------------------------------------------------------------------------------------ tables
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize("base", list(CONFIGS))
@pytest.mark.parametrize("cls", CLASSES, ids=["euler", "dpm"])
def test_timesteps_and_sigmas_match_diffusers(cls, base, schedule, final):
    # both sigma_min finals: EDMEuler ends at its last σ, EDM DPM at the config's sigma_min
    ref, ours = make_pair(cls, CONFIGS[base], sigma_schedule=schedule, final_sigmas_type=final, rho=5.0)
    assert ours.order == ref.order == 1 and ours.init_noise_sigma == ref.init_noise_sigma
    for n in (1, 2, 7, 20, 30):
        ref.set_timesteps(n)
        ours.set_timesteps(n)
        assert ours.timesteps.dtype == ours.sigmas.dtype == torch.float32
        assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas), n


def test_the_two_classes_schedules_differ_where_diffusers_does():
    # what the class-specific lines reproduce: EDMEuler's float64 Karras ramp (its σ differ from EDM DPM's by
    # an ulp) and its final σ for "sigma_min" (its last σ, not the config's sigma_min)
    euler, dpm = (make_pair(cls, PLAYGROUND, final_sigmas_type="sigma_min")[1] for cls in CLASSES)
    euler.set_timesteps(30)
    dpm.set_timesteps(30)
    assert not torch.equal(euler.sigmas[:-1], dpm.sigmas[:-1])
    torch.testing.assert_close(euler.sigmas[:-1], dpm.sigmas[:-1], rtol=1e-6, atol=0)
    assert euler.sigmas[-1] == euler.sigmas[-2] and dpm.sigmas[-1] == torch.tensor(0.002)
    torch.testing.assert_close(dpm.timesteps, (0.25 * dpm.sigmas[:-1].double().log()).float())  # 0.25·log σ


# ------------------------------------------------------------------------------------------- trajectories
@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize("base", list(CONFIGS))
@pytest.mark.parametrize("cls,solver", CASES, ids=CASE_IDS)
def test_trajectory_matches_diffusers(cls, solver, base, schedule):
    ends = ENDS if cls is EDMDPMSolverMultistepScheduler else [{"final_sigmas_type": f} for f in ("zero", "sigma_min")]
    for prediction_type, end in itertools.product(("epsilon", "v_prediction"), ends):
        cfg = dict(solver, **end, sigma_schedule=schedule, prediction_type=prediction_type)
        ref, ours = make_pair(cls, CONFIGS[base], **cfg)
        # 1, 2: the first/last-order special cases; 7: 3rd order's lowered orders at both ends; 20: from 15
        # steps on lower_order_final no longer applies
        for n in (1, 2, 7, 20):
            ref.set_timesteps(n)
            ours.set_timesteps(n)
            x = latents(n, ref.init_noise_sigma)
            got, want = denoise(ours, ours.timesteps, x, False), denoise(ref, ref.timesteps, x, True)
            # Karras σ with final_sigmas_type "sigma_min" end at the σ they are at (h = 0): there diffusers' heun
            # 2nd-order and its 3rd-order updates divide 0 by 0 into NaN latents, and so do ours
            for a, b in zip(got, want, strict=True):
                same(a, b, 1e-5)  # fp32; bit for bit in practice


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("cls,solver", CASES, ids=CASE_IDS)
def test_half_precision_steps_match_diffusers(cls, solver, prediction_type):
    # fp16 latents and model output as on GPU: EDMEuler upcasts its step and casts back, EDM DPM-Solver does not
    # upcast at all (unlike the VP one) and draws its SDE noise in fp16
    for base in CONFIGS:
        ref, ours = make_pair(cls, CONFIGS[base], **solver, prediction_type=prediction_type)
        ref.set_timesteps(6)
        ours.set_timesteps(6)
        x = latents(3, ref.init_noise_sigma).half()
        for a, b in zip(denoise(ours, ours.timesteps, x, False), denoise(ref, ref.timesteps, x, True), strict=True):
            assert a.dtype == b.dtype == torch.float16
            close(a, b, 1e-4)  # bit-exact today; rounding at another place shows as ~1e-3 (an fp16 ulp)


# ------------------------------------------------------------------------------------- img2img / inpaint
@pytest.mark.parametrize("base", list(CONFIGS))
@pytest.mark.parametrize("cls,solver", [CASES[CASE_IDS.index(i)] for i in FLOWS], ids=FLOWS)
def test_strength_cut_and_pipeline_flows_match_diffusers(cls, solver, base):
    ref, ours = make_pair(cls, CONFIGS[base], **solver)
    for n in (1, 3, 10, 25, 30):
        for strength in (0.1, 0.3, 0.5, 0.75, 0.9999, 1.0):
            want, begin = diffusers_cut(ref, n, strength)
            inpaint, _ = diffusers_cut(ref, n, strength, pipeline=StableDiffusionXLInpaintPipeline)
            assert torch.equal(want, inpaint)
            ours.set_timesteps(n)
            if len(want) == 0:  # int(n·strength) = 0 steps
                with pytest.raises(ValueError, match="strength"):
                    ours.select_timesteps(strength=strength)
                continue
            assert torch.equal(ours.select_timesteps(strength=strength), want) and ours.begin_index == begin

    # img2img and the 4-channel inpaint (add_noise after each step): the image latents noised to the first kept
    # step (in fp16 too: add_noise casts its σ to the latents' dtype), then the same trajectory
    x0, noise = latents(20), latents(21)
    mask = (torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    for strength, inpaint in ((0.5, None), (0.75, (x0, noise, mask))):
        want_ts, _ = diffusers_cut(ref, 25, strength)
        ours.set_timesteps(25)
        ts = ours.select_timesteps(strength=strength)
        for dtype in (torch.float16, torch.float32):
            assert torch.equal(
                ours.add_noise(x0.to(dtype), noise.to(dtype), ts[:1]),
                ref.add_noise(x0.to(dtype), noise.to(dtype), want_ts[:1]),
            )
        x = ref.add_noise(x0, noise, want_ts[:1])
        got = denoise(ours, ts, x, False, inpaint=inpaint)
        for a, b in zip(got, denoise(ref, want_ts, x, True, inpaint=inpaint), strict=True):
            close(a, b, 1e-5)


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("cls", CLASSES, ids=["euler", "dpm"])
def test_denoising_start_and_end_are_refused(cls):
    ref, ours = make_pair(cls, PLAYGROUND)
    ref.set_timesteps(10)
    # why: diffusers compares the 0.25·log σ timesteps with 1000-scale cut-offs, so a refiner's
    # denoising_start=0.8 keeps every step and a base's denoising_end=0.8 none
    assert len(diffusers_cut(ref, 10, 0.3, denoising_start=0.8)[0]) == 10
    assert len(diffusers_end(ref.timesteps, 0.8)) == 0
    ours.set_timesteps(10)
    for kw in ({"denoising_start": 0.8}, {"denoising_end": 0.8}, {"strength": 0.5, "denoising_end": 0.5}):
        with pytest.raises(ValueError, match=r"denoising_start / denoising_end cannot split .* 0\.25·log σ"):
            ours.select_timesteps(**kw)
    assert len(ours.select_timesteps(strength=0.5)) == 5  # strength still cuts


@pytest.mark.parametrize("cls", CLASSES, ids=["euler", "dpm"])
def test_custom_schedules_are_refused(cls):
    ours = make_pair(cls, PLAYGROUND)[1]
    for kind, values in (("timesteps", [1.0, 0.5, 0.0]), ("sigmas", [14.6, 1.0, 0.0])):
        with pytest.raises(ValueError, match=rf"takes no custom {kind}: .* reads sigmas= as ramp positions"):
            ours.set_timesteps(**{kind: values})


def test_edm_euler_reads_custom_sigmas_as_ramp_positions():
    # the reason EDMEuler's sigmas= is refused: diffusers maps the values through its sigma schedule
    ref = EDMEulerScheduler.from_config(PLAYGROUND)
    ref.set_timesteps(sigmas=torch.tensor([0.0, 0.5, 1.0]))
    assert ref.sigmas[0] == 80.0 and abs(ref.sigmas[2] - 0.002) < 1e-6  # not 0.0, 0.5, 1.0


def test_third_order_sde_is_refused():
    config = {**PLAYGROUND, "solver_order": 3, "algorithm_type": "sde-dpmsolver++"}
    with pytest.raises(ValueError, match="third-order update has no SDE branch"):
        S.make_scheduler(None, config)
    ref = EDMDPMSolverMultistepScheduler.from_config(config)  # why: diffusers fails at its first 3rd-order step
    ref.set_timesteps(20)
    with pytest.raises(UnboundLocalError):
        denoise(ref, ref.timesteps, latents(1, ref.init_noise_sigma), True)


@pytest.mark.parametrize(
    "key,value",
    [
        ("thresholding", True),
        ("sigma_schedule", "linear"),
        ("sigma_min", None),  # a VP config's sigma_min: diffusers fails on None ** (1 / rho)
        ("sigma_data", 0),
        ("prediction_type", "sample"),
        ("algorithm_type", "dpmsolver"),
        ("solver_type", "taylor"),
        ("final_sigmas_type", "one"),
    ],
)
def test_unsupported_config_values_are_named(key, value):
    with pytest.raises(ValueError, match=key):
        S.make_scheduler(None, {**PLAYGROUND, key: value})


# ---------------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    "name,cls,order,sde,karras",
    [
        ("euler", S.EDMEuler, None, False, False),
        ("Euler", S.EDMEuler, None, False, False),
        ("edm_euler", S.EDMEuler, None, False, False),
        ("edm_euler_karras", S.EDMEuler, None, False, True),
        ("dpmpp_2m", S.EDMDPMSolverMultistep, 2, False, False),
        ("DPM++ 2M", S.EDMDPMSolverMultistep, 2, False, False),
        ("dpmpp_2m_karras", S.EDMDPMSolverMultistep, 2, False, True),
        ("DPM++ 2M Karras", S.EDMDPMSolverMultistep, 2, False, True),
        ("dpmpp_2m_sde", S.EDMDPMSolverMultistep, 2, True, False),
        ("DPM++ 2M SDE", S.EDMDPMSolverMultistep, 2, True, False),
        ("dpmpp_2m_sde_karras", S.EDMDPMSolverMultistep, 2, True, True),
        ("DPM++ 2M SDE Karras", S.EDMDPMSolverMultistep, 2, True, True),
        ("dpmpp_3m", S.EDMDPMSolverMultistep, 3, False, False),
        ("dpmpp_3m_karras", S.EDMDPMSolverMultistep, 3, False, True),
        ("edm_dpmpp_2m_sde", S.EDMDPMSolverMultistep, 2, True, False),
        ("edm_dpmpp_3m_karras", S.EDMDPMSolverMultistep, 3, False, True),
    ],
)
def test_names_on_an_edm_config(name, cls, order, sde, karras):
    # on CosXL's config (exponential σ, solver_order 1 added): a VP name means its EDM counterpart, pinning
    # order and SDE; the names without "_karras" keep the config's exponential σ
    config = {**COSXL, "solver_order": 1}
    s = S.make_scheduler(name, config)
    assert type(s) is cls and s.karras is karras
    assert s.config["sigma_schedule"] == ("karras" if karras else "exponential")
    if order is not None:
        assert s.solver_order == order and s.sde is sde
    again = S.make_scheduler(s.name, config)  # its own name gives it back
    assert type(again) is cls and again.config == s.config


def test_names_without_an_edm_counterpart_list_the_valid_ones():
    for name in ("euler_a", "Euler a", "dpmpp_3m_sde", "DPM++ 3M SDE Karras", "heun", "ddim", "lcm", "unipc_karras"):
        for config in (PLAYGROUND, {"sigma_data": 0.5}):  # an EDM config by its class or its sigma_data
            with pytest.raises(ValueError, match=r"no EDM counterpart.*'edm_euler'.*'dpmpp_3m_karras'.*DPM\+\+ 2M"):
                S.make_scheduler(name, config)
    assert type(S.make_scheduler("euler_a", SDXL)) is S.EulerAncestral  # a VP config keeps the VP names


@pytest.mark.parametrize("base", list(CONFIGS))
@pytest.mark.parametrize("name", list(S.SCHEDULERS))
def test_a_schedulers_own_name_makes_it_again_on_an_edm_config(name, base):
    config = CONFIGS[base]
    if not S.SCHEDULERS[name][0].edm and "edm_" + name not in S.SCHEDULERS:
        with pytest.raises(ValueError, match="no EDM counterpart"):
            S.make_scheduler(name, config)
        return
    s = S.make_scheduler(name, config)
    assert s.edm and s.name in S.SCHEDULERS
    again = S.make_scheduler(s.name, config)
    assert type(again) is type(s) and again.config == s.config


def test_none_means_the_configs_class():
    pg, cos = S.make_scheduler(None, PLAYGROUND), S.make_scheduler(None, COSXL)
    assert type(pg) is S.EDMDPMSolverMultistep and pg.name == "edm_dpmpp_2m_karras" and not pg.sde
    assert type(cos) is S.EDMEuler and cos.name == "edm_euler" and cos.v_prediction
    assert S.make_scheduler("edm_dpmpp_2m", PLAYGROUND).config == pg.config
    one = S.make_scheduler(None, {**PLAYGROUND, "solver_order": 1})  # named as its VP twin: no SCHEDULERS entry
    assert one.name == "edm_dpmpp_1m_karras" and one.name not in S.SCHEDULERS
