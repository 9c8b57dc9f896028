"""guider= (minsdxl.guidance) against diffusers' guiders: each rule step by step on the same predictions, and
whole text2img / img2img runs against diffusers' Modular SDXL pipeline given the same guider (its own loop
runs the conditional and unconditional UNet batches apart, ours as one batch of two: 1e-4 on the final
latents, test_pipelines.py's bound)."""

import dataclasses

import diffusers.guiders as dg
import pytest
import torch
from sdxl_testing import rel_err

import minsdxl
import minsdxl.guidance as mg

LATENT_TOL = 1e-4

# (diffusers' guider, ours): every option that changes the arithmetic at least once
PAIRS = {
    "cfg_window_rescale": (
        dg.ClassifierFreeGuidance(guidance_scale=6.0, guidance_rescale=0.3, start=0.25, stop=0.75),
        mg.ClassifierFreeGuidance(6.0, 0.3, start=0.25, stop=0.75),
    ),
    "cfg_original": (
        dg.ClassifierFreeGuidance(guidance_scale=3.0, use_original_formulation=True),
        mg.ClassifierFreeGuidance(3.0, use_original_formulation=True),
    ),
    "apg_momentum": (
        dg.AdaptiveProjectedGuidance(
            guidance_scale=7.0,
            adaptive_projected_guidance_momentum=-0.5,
            adaptive_projected_guidance_rescale=2.0,
            eta=0.3,
            stop=0.75,
        ),
        mg.AdaptiveProjectedGuidance(
            7.0,
            adaptive_projected_guidance_momentum=-0.5,
            adaptive_projected_guidance_rescale=2.0,
            eta=0.3,
            stop=0.75,
        ),
    ),
    "apg_norm_dim": (
        dg.AdaptiveProjectedGuidance(guidance_scale=7.0, adaptive_projected_guidance_norm_dim=(-2, -1)),
        mg.AdaptiveProjectedGuidance(7.0, adaptive_projected_guidance_norm_dim=(-2, -1)),
    ),
    "cfg_zero_star": (
        dg.ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=2, guidance_rescale=0.5),
        mg.ClassifierFreeZeroStarGuidance(5.0, 0.5, zero_init_steps=2),
    ),
    "tcfg": (
        dg.TangentialClassifierFreeGuidance(guidance_scale=5.0, start=0.5),
        mg.TangentialClassifierFreeGuidance(5.0, start=0.5),
    ),
    "apg_mix": (
        dg.AdaptiveProjectedMixGuidance(guidance_scale=4.0, adaptive_projected_guidance_start_step=1, eta=0.2),
        mg.AdaptiveProjectedMixGuidance(4.0, adaptive_projected_guidance_start_step=1, eta=0.2),
    ),
    "fdg": (
        dg.FrequencyDecoupledGuidance(guidance_scales=[8.0, 3.0], parallel_weights=[0.5, 0.8], guidance_rescale=0.3),
        mg.FrequencyDecoupledGuidance(guidance_scales=(8.0, 3.0), parallel_weights=(0.5, 0.8), guidance_rescale=0.3),
    ),
    "fdg_freq_rescale_three_levels": (
        dg.FrequencyDecoupledGuidance(
            guidance_scales=[9.0, 5.0, 2.0],
            guidance_rescale=[0.2, 0.5, 0.0],
            guidance_rescale_space="freq",
            use_original_formulation=True,
            stop=0.75,
        ),
        mg.FrequencyDecoupledGuidance(
            guidance_scales=(9.0, 5.0, 2.0),
            guidance_rescale=(0.2, 0.5, 0.0),
            guidance_rescale_space="freq",
            use_original_formulation=True,
            stop=0.75,
        ),
    ),
    "mambo_original": (
        dg.MagnitudeAwareGuidance(guidance_scale=5.0, alpha=2.0, use_original_formulation=True),
        mg.MagnitudeAwareGuidance(5.0, alpha=2.0, use_original_formulation=True),
    ),
    "mambo_rescale": (  # the default formulation, with guidance_rescale
        dg.MagnitudeAwareGuidance(guidance_scale=5.0, alpha=2.0, guidance_rescale=0.3),
        mg.MagnitudeAwareGuidance(5.0, 0.3, alpha=2.0),
    ),
}


@pytest.mark.parametrize("name", PAIRS)
def test_each_rule_equals_diffusers_step_by_step(name):
    ref, ours = PAIRS[name]
    # diffusers' MagnitudeAwareGuidance takes the norm with torch.norm(dim=[1, 2, 3]), which fails on 4-D
    # latents (a matrix norm wants 2 dims): compared on 3-D predictions, where it runs
    shape = (2, 4, 64) if name.startswith("mambo") else (2, 4, 8, 8)
    g = torch.Generator().manual_seed(0)
    state, steps, changed = {}, 4, 0
    for i in range(steps):
        cond, uncond = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        ref.set_state(step=i, num_inference_steps=steps, timestep=torch.tensor(999 - 250 * i))
        ref.prepare_inputs({"x": (cond, uncond)})  # (at step 0 APG's momentum buffer starts)
        expected = ref.forward(cond, uncond if ref.num_conditions > 1 else None).pred
        got = ours(cond, uncond, i, steps, state)
        if name == "cfg_zero_star" and i < 2:  # diffusers rescales its zero steps' zeros: 0/0 (NaN); ours stay 0
            assert expected.isnan().all() and torch.equal(got, torch.zeros_like(cond))
            continue
        assert torch.equal(got, expected) or (got - expected).abs().max() <= 1e-6 * expected.abs().max(), (name, i)
        changed += not torch.equal(got, cond)
    assert changed  # the rule guided at least one step


def test_fdg_levels_windows_and_padded_sizes():
    """A level outside its window keeps cond's band (diffusers appends a stale band there and fails); equal
    scales and weights of 1 are plain CFG at any size, also those kornia pads (diffusers returns the padded
    size there); the pyramid is kornia's, padding included."""
    from diffusers.guiders.frequency_decoupled_guidance import build_image_from_pyramid
    from kornia.geometry.transform import build_laplacian_pyramid

    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 4, 12, 10, generator=g), torch.randn(2, 4, 12, 10, generator=g)
    for ours, ref in zip(mg.laplacian_pyramid(cond, 3), build_laplacian_pyramid(cond, 3)):
        assert ours.shape == ref.shape and (ours - ref).abs().max() <= 1e-6  # padded to 16x16, as kornia
    same = mg.FrequencyDecoupledGuidance(guidance_scales=(5.0, 5.0, 5.0))(cond, uncond, 0, 10, {})
    assert same.shape == cond.shape and (same - (uncond + 5.0 * (cond - uncond))).abs().max() <= 1e-5
    cond, uncond = cond[..., :8, :8], uncond[..., :8, :8]
    rule = mg.FrequencyDecoupledGuidance(guidance_scales=(6.0, 2.0), start=(0.0, 0.5))
    c, u = build_laplacian_pyramid(cond, 2), build_laplacian_pyramid(uncond, 2)
    expected = build_image_from_pyramid([u[0] + 6.0 * (c[0] - u[0]), c[1]])  # step 2 of 10: level 1 not yet
    assert (rule(cond, uncond, 2, 10, {}) - expected).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="start has 3 values for 2"):
        mg.FrequencyDecoupledGuidance(start=(0.0, 0.1, 0.2))


def test_mambo_guidance_runs_on_latents():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    got = mg.MagnitudeAwareGuidance(5.0, alpha=2.0)(cond, uncond, 0, 1, {})
    flat = mg.MagnitudeAwareGuidance(5.0, alpha=2.0)(cond.flatten(2), uncond.flatten(2), 0, 1, {})
    assert torch.allclose(got.flatten(2), flat, atol=1e-6)  # the norm is over all non-batch dims either way


def _modular(pipe, guider):
    from diffusers.modular_pipelines.stable_diffusion_xl import StableDiffusionXLAutoBlocks

    mp = StableDiffusionXLAutoBlocks().init_pipeline()
    mp.update_components(**{k: v for k, v in pipe.components.items() if v is not None}, guider=guider)
    mp.set_progress_bar_config(disable=True)
    return mp


@pytest.fixture(scope="module")
def models(tiny_base):
    return tiny_base[0], minsdxl.load(tiny_base[1])


RUNS = {
    "apg": lambda m: m.AdaptiveProjectedGuidance(
        guidance_scale=6.0, adaptive_projected_guidance_momentum=-0.5, adaptive_projected_guidance_rescale=3.0
    ),
    "cfg_zero_star": lambda m: m.ClassifierFreeZeroStarGuidance(guidance_scale=6.0, zero_init_steps=1),
    "tcfg": lambda m: m.TangentialClassifierFreeGuidance(guidance_scale=6.0, stop=0.5),
    "apg_mix": lambda m: m.AdaptiveProjectedMixGuidance(guidance_scale=6.0, adaptive_projected_guidance_start_step=1),
    "fdg": lambda m: m.FrequencyDecoupledGuidance(guidance_scales=[9.0, 4.0], parallel_weights=0.6),
}


@pytest.mark.parametrize("name", RUNS)
def test_text2img_matches_diffusers_modular_pipeline(models, name):
    pipe, model = models
    kw = dict(prompt="a red fox", negative_prompt="blurry", num_inference_steps=4, height=64, width=64)
    expected = _modular(pipe, RUNS[name](dg))(**kw, generator=torch.Generator().manual_seed(1), output="latents")
    got = minsdxl.text2img(
        model,
        **kw,
        guider=RUNS[name](mg),
        generator=torch.Generator().manual_seed(1),
        output_type="latent",
        progress=False,
    )
    assert rel_err(got, expected) <= LATENT_TOL
    plain = minsdxl.text2img(
        model,
        **kw,
        guidance_scale=6.0,
        generator=torch.Generator().manual_seed(1),
        output_type="latent",
        progress=False,
    )
    assert rel_err(got, plain) > 1e-3  # the rule is not plain CFG


def test_img2img_matches_diffusers_modular_pipeline(models):
    pipe, model = models
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    kw = dict(prompt="a red fox", image=image, strength=0.6, num_inference_steps=5)
    expected = _modular(pipe, dg.AdaptiveProjectedGuidance(guidance_scale=6.0))(
        **kw, generator=torch.Generator().manual_seed(3), output="latents"
    )
    got = minsdxl.img2img(
        model,
        **kw,
        guider=mg.AdaptiveProjectedGuidance(guidance_scale=6.0),
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
        progress=False,
    )
    assert rel_err(got, expected) <= LATENT_TOL


def test_the_calls_scale_fills_in_and_plain_cfg_is_the_same(models):
    _, model = models
    kw = dict(prompt="a red fox", num_inference_steps=3, height=64, width=64, output_type="latent", progress=False)
    plain = minsdxl.text2img(model, **kw, guidance_scale=4.0, guidance_rescale=0.5, seed=1)
    guided = minsdxl.text2img(
        model, **kw, guidance_scale=4.0, guidance_rescale=0.5, seed=1, guider=mg.ClassifierFreeGuidance()
    )
    assert torch.equal(plain, guided)
    # a scale of 1 (0 in the original formulation) needs no negative prompt: one UNet batch, cond alone
    seen = []
    spy = lambda pipe, i, t, k: seen.append(pipe.do_classifier_free_guidance) or {}  # noqa: E731
    alone = minsdxl.text2img(model, **kw, seed=1, guider=mg.AdaptiveProjectedGuidance(1.0), callback_on_step_end=spy)
    assert seen == [False] * 3
    scales = []  # a callback reads the guider's scale
    spy = lambda pipe, i, t, k: scales.append(pipe.guidance_scale) or {}  # noqa: E731
    minsdxl.text2img(model, **kw, seed=1, guider=mg.AdaptiveProjectedGuidance(7.0), callback_on_step_end=spy)
    assert scales == [7.0] * 3
    assert torch.equal(alone, minsdxl.text2img(model, **kw, seed=1, guidance_scale=1.0))


def test_bad_guiders_are_refused(models):
    _, model = models
    kw = dict(prompt="a fox", num_inference_steps=2, height=64, width=64, output_type="latent", progress=False)
    with pytest.raises(TypeError, match="AdaptiveProjectedGuidance"):
        minsdxl.text2img(model, **kw, guider=dg.AdaptiveProjectedGuidance())  # diffusers' own object
    with pytest.raises(ValueError, match="pag_scale"):
        minsdxl.text2img(model, **kw, guider=mg.ClassifierFreeGuidance(), pag_scale=2.0)
    with pytest.raises(ValueError, match="start / stop"):
        minsdxl.text2img(model, **kw, guider=mg.ClassifierFreeGuidance(start=0.8, stop=0.2))
    with pytest.raises(ValueError, match="give it once"):
        minsdxl.text2img(model, **kw, guider=mg.ClassifierFreeGuidance(guidance_rescale=0.3), guidance_rescale=0.7)
    assert dataclasses.is_dataclass(mg.AdaptiveProjectedGuidance())  # frozen, so a call never changes it


def test_command_line_guider_is_made_recorded_and_replayed(tiny_base, tmp_path, capsys):
    """--guider NAME:K=V: the same rule as the API's (the APG paper's momentum / norm_threshold names
    too), the call's --cfg as its scale, stored as written so --from-png replays it; bad specs are usage errors."""
    import numpy as np
    import PIL.Image

    from minsdxl.cli import main, make_guider, read_png_metadata

    spec = "apg:momentum=-0.5,norm_threshold=3,eta=0.5"
    assert make_guider(spec) == mg.AdaptiveProjectedGuidance(
        adaptive_projected_guidance_momentum=-0.5, adaptive_projected_guidance_rescale=3.0, eta=0.5
    )
    out = tmp_path / "apg.png"
    argv = ["-p", "a red fox", "--model", str(tiny_base[1]), "--steps", "3", "--cfg", "6", "-s", "2", "-q"]
    assert main([*argv, "--guider", spec, "--no-watermark", "-o", str(out)]) == 0
    model = minsdxl.load(tiny_base[1])
    made = minsdxl.text2img(model, "a red fox", num_inference_steps=3, guidance_scale=6.0, seed=2, progress=False,
                            guider=make_guider(spec))[0]  # fmt: skip
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(made))
    assert read_png_metadata(out)["minsdxl"]["args"]["guider"] == spec
    assert main(["--from-png", str(out), "-q", "-o", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "again.png")), np.asarray(made))
    # FDG's per-level values as N+M, its flags and rescale space; APG-Mix's step count
    assert make_guider(
        "fdg:guidance_scales=9+4,parallel_weights=0.5,upcast_to_double=0,guidance_rescale_space=freq"
    ) == (
        mg.FrequencyDecoupledGuidance(
            guidance_scales=(9.0, 4.0), parallel_weights=0.5, upcast_to_double=False, guidance_rescale_space="freq"
        )
    )
    assert make_guider("fdg:guidance_scales=7").guidance_scales == (7.0,)
    assert make_guider("apg_mix:adaptive_projected_guidance_start_step=2") == mg.AdaptiveProjectedMixGuidance(
        adaptive_projected_guidance_start_step=2
    )
    for bad, message in (
        ("apgx", "unknown guider 'apgx'"),
        ("apg:beta=1", "not KEY=VALUE with a key of apg's"),
        ("fdg:guidance_rescale_space=pixels", "takes data or freq"),
        ("fdg:guidance_scales=9+4,stop=1+1+1", "stop has 3 values for 2"),
    ):
        with pytest.raises(SystemExit):
            main([*argv, "--guider", bad])
        assert message in capsys.readouterr().err
