"""The layer-perturbing guiders (minsdxl.guidance: SkipLayerGuidance, PerturbedAttentionGuidance,
SmoothedEnergyGuidance, AutoGuidance) against diffusers' guiders: each rule step by step on the same three
predictions, and whole runs against diffusers' Modular SDXL pipeline given the same guider (its loop runs each
prediction as its own UNet call with hooks on the perturbed layers; ours perturbs rows of one batch: 1e-4 on
the final latents, test_pipelines.py's bound)."""

import math

import diffusers.guiders as dg
import diffusers.hooks.smoothed_energy_guidance_utils as seg_utils
import pytest
import torch
from diffusers.hooks import LayerSkipConfig
from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceConfig
from sdxl_testing import rel_err
from test_guidance import _modular

import minsdxl
import minsdxl.guidance as mg

LATENT_TOL = 1e-4
MID = "mid_block.attentions.0.transformer_blocks"  # the tiny UNet's: 2 blocks
DOWN = "down_blocks.2.attentions.1.transformer_blocks"  # 2 blocks at 4x4 tokens (64 px), 8x8 at 128 px


class FixedSEG(dg.SmoothedEnergyGuidance):
    """diffusers' SEG with its two slips fixed: prepare_models counts the batches (as every other guider's
    does; without it the hooks are never applied), and the blur's branches as the paper's code has them
    (sigma above the threshold: the mean; below: the Gaussian)."""

    def prepare_models(self, denoiser):
        self._count_prepared += 1
        super().prepare_models(denoiser)


@pytest.fixture
def paper_blur(monkeypatch):
    blur = seg_utils._gaussian_blur_2d
    swapped = lambda q, k, sigma, inf: blur(q, k, sigma, math.inf if sigma > inf else -math.inf)  # noqa: E731
    monkeypatch.setattr(seg_utils, "_gaussian_blur_2d", swapped)


def test_diffusers_seg_does_not_perturb(models):
    """Why FixedSEG: diffusers' own SmoothedEnergyGuidance gives plain CFG (if a diffusers release fixes it,
    this fails, and FixedSEG can go)."""
    pipe, _ = models
    kw = dict(prompt="a red fox", negative_prompt="blurry", num_inference_steps=4, height=64, width=64)
    seg = dg.SmoothedEnergyGuidance(guidance_scale=6.0, seg_guidance_config=SmoothedEnergyGuidanceConfig([0], MID))
    cfg = dg.ClassifierFreeGuidance(guidance_scale=6.0)
    run = [_modular(pipe, g)(**kw, generator=torch.Generator().manual_seed(1), output="latents") for g in (seg, cfg)]
    assert torch.equal(*run)


RULES = {  # (diffusers' guider, ours), layers irrelevant here: the rules on given predictions
    "slg": (
        dg.SkipLayerGuidance(guidance_scale=5.0, skip_layer_guidance_scale=2.0, skip_layer_config=LayerSkipConfig([0])),
        mg.SkipLayerGuidance(5.0, skip_layer_guidance_scale=2.0, skip_layer_config=mg.LayerSkipConfig([0])),
    ),
    "slg_windows_rescale": (
        dg.SkipLayerGuidance(
            guidance_scale=5.0,
            guidance_rescale=0.4,
            skip_layer_guidance_start=0.1,
            skip_layer_guidance_stop=0.7,
            stop=0.8,
            skip_layer_config=LayerSkipConfig([0]),
        ),
        mg.SkipLayerGuidance(
            5.0,
            0.4,
            stop=0.8,
            skip_layer_guidance_start=0.1,
            skip_layer_guidance_stop=0.7,
            skip_layer_config=mg.LayerSkipConfig([0]),
        ),
    ),
    "pag_original": (
        dg.PerturbedAttentionGuidance(
            guidance_scale=3.0,
            perturbed_guidance_scale=1.5,
            perturbed_guidance_stop=1.0,
            use_original_formulation=True,
            perturbed_guidance_config=LayerSkipConfig([0]),
        ),
        mg.PerturbedAttentionGuidance(
            3.0,
            use_original_formulation=True,
            perturbed_guidance_scale=1.5,
            perturbed_guidance_stop=1.0,
            perturbed_guidance_config=mg.LayerSkipConfig([0]),
        ),
    ),
    "seg": (
        dg.SmoothedEnergyGuidance(guidance_scale=4.0, seg_guidance_scale=3.0, seg_guidance_layers=[0]),
        mg.SmoothedEnergyGuidance(4.0, seg_guidance_scale=3.0, seg_guidance_layers=[0]),
    ),
}


@pytest.mark.parametrize("name", RULES)
def test_each_rule_equals_diffusers_step_by_step(name):
    ref, ours = RULES[name]
    g = torch.Generator().manual_seed(0)
    steps, state, kinds = 10, {}, set()
    for i in range(steps):
        cond, uncond, skip = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
        ref.set_state(step=i, num_inference_steps=steps, timestep=torch.tensor(999 - 100 * i))
        n = ref.num_conditions  # 1: cond; 2: cond, uncond (this test keeps the CFG window around SLG's); 3: all
        expected = ref.forward(cond, *([uncond] if n > 1 else []), *([skip] if n > 2 else [])).pred
        got = ours(cond, uncond, i, steps, state, skip)
        assert torch.equal(got, expected) or (got - expected).abs().max() <= 1e-6 * expected.abs().max(), (name, i)
        kinds.add(n)
        assert (i in ours.perturbed_steps(steps)) == (n == 3)
    assert 3 in kinds  # the perturbed prediction counted at least once


@pytest.fixture(scope="module")
def models(tiny_base):
    return tiny_base[0], minsdxl.load(tiny_base[1])


def _both(models, make_ref, make_ours, size=64, steps=4, seed=1, **extra):
    """(diffusers' Modular latents, ours) for the same guider, prompt, seed; torch's global RNG seeded alike
    (dropout below 1 draws from it)."""
    pipe, model = models
    kw = dict(prompt="a red fox", negative_prompt="blurry", num_inference_steps=steps, height=size, width=size)
    torch.manual_seed(7)
    expected = _modular(pipe, make_ref())(
        **kw, **extra, generator=torch.Generator().manual_seed(seed), output="latents"
    )
    torch.manual_seed(7)
    got = minsdxl.text2img(
        model, **kw, **extra, guider=make_ours(), generator=torch.Generator().manual_seed(seed), output_type="latent"
    )
    return expected, got


def _plain(models, size=64, steps=4, seed=1):
    return minsdxl.text2img(
        models[1],
        prompt="a red fox",
        negative_prompt="blurry",
        num_inference_steps=steps,
        height=size,
        width=size,
        guidance_scale=6.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    )


# each way a LayerSkipConfig perturbs a block: the whole block, self-attention alone (its output is its
# input), attention scores (output v), the feed-forward alone; dropout below 1 (random, the same draws)
SKIPS = {
    "block": dict(indices=[1], fqn=MID),
    "attention": dict(indices=[0], fqn=DOWN, skip_ff=False),
    "scores": dict(indices=[0, 1], fqn=MID, skip_attention=False, skip_attention_scores=True, skip_ff=False),
    "ff": dict(indices=[0], fqn=MID, skip_attention=False),
    "block_dropout": dict(indices=[0], fqn=MID, dropout=0.5),
    "attention_dropout": dict(indices=[1], fqn=DOWN, skip_ff=False, dropout=0.3),
}


@pytest.mark.parametrize("name", SKIPS)
def test_skip_layer_guidance_matches_diffusers_modular_pipeline(models, name):
    cfg = SKIPS[name]
    common = dict(guidance_scale=6.0, skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    expected, got = _both(
        models,
        lambda: dg.SkipLayerGuidance(**common, skip_layer_config=LayerSkipConfig(**cfg)),
        lambda: mg.SkipLayerGuidance(**common, skip_layer_config=mg.LayerSkipConfig(**cfg)),
    )
    assert rel_err(got, expected) <= LATENT_TOL
    assert rel_err(got, _plain(models)) > 1e-3  # the perturbed prediction guided
    assert all(getattr(m, "perturb", None) is None for m in models[1].unet.modules())  # none left behind


def test_perturbed_attention_guider_matches_diffusers(models):
    kw = dict(guidance_scale=5.0, perturbed_guidance_scale=3.0, perturbed_guidance_start=0.0)
    expected, got = _both(
        models,
        lambda: dg.PerturbedAttentionGuidance(**kw, perturbed_guidance_config=LayerSkipConfig([0, 1], fqn=MID)),
        # diffusers remakes any config a scores-only one (warning); so does ours, silently
        lambda: mg.PerturbedAttentionGuidance(**kw, perturbed_guidance_config={"indices": [0, 1], "fqn": MID}),
        steps=6,
    )
    assert rel_err(got, expected) <= LATENT_TOL


@pytest.mark.parametrize("sigma", [9999999.0, 1.0])
def test_smoothed_energy_guidance_matches_fixed_diffusers(models, paper_blur, sigma):
    """At 128 px the 8x8 token grid of DOWN: sigma 1 is a 7-wide Gaussian, the default the grid's mean."""
    kw = dict(guidance_scale=5.0, seg_guidance_scale=3.0, seg_blur_sigma=sigma)
    expected, got = _both(
        models,
        lambda: FixedSEG(**kw, seg_guidance_config=[SmoothedEnergyGuidanceConfig([0, 1], DOWN)]),
        lambda: mg.SmoothedEnergyGuidance(**kw, seg_guidance_config=[mg.SmoothedEnergyGuidanceConfig([0, 1], DOWN)]),
        size=128,
    )
    assert rel_err(got, expected) <= LATENT_TOL
    assert rel_err(got, _plain(models, size=128)) > 1e-3


@pytest.mark.parametrize("dropout", [1.0, 0.5])
def test_auto_guidance_matches_diffusers(models, dropout):
    cfg = dict(indices=[0], fqn=MID, dropout=dropout)
    expected, got = _both(
        models,
        lambda: dg.AutoGuidance(guidance_scale=4.0, stop=0.75, auto_guidance_config=LayerSkipConfig(**cfg)),
        lambda: mg.AutoGuidance(guidance_scale=4.0, stop=0.75, auto_guidance_config=mg.LayerSkipConfig(**cfg)),
    )
    assert rel_err(got, expected) <= LATENT_TOL


def test_the_perturbed_chunk_leaves_the_batch_after_its_window(models):
    """SLG in steps 1..2 of 8: the UNet batch is 3 images until step 2 (step 0 computes the chunk unused:
    it was there from the start), then 2; the result still diffusers'."""
    _, model = models
    sizes = []
    hook = model.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    kw = dict(guidance_scale=6.0, skip_layer_guidance_start=0.0, skip_layer_guidance_stop=0.375)
    try:
        expected, got = _both(
            models,
            lambda: dg.SkipLayerGuidance(**kw, skip_layer_config=LayerSkipConfig([0], fqn=MID)),
            lambda: mg.SkipLayerGuidance(**kw, skip_layer_config=mg.LayerSkipConfig([0], fqn=MID)),
            steps=8,
        )
    finally:
        hook.remove()
    assert sizes == [3, 3, 3] + [2] * 5
    assert rel_err(got, expected) <= LATENT_TOL
    sizes.clear()  # a window no step falls in: no extra chunk at all, plain CFG's result
    hook = model.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        none = mg.SkipLayerGuidance(skip_layer_guidance_stop=0.1, skip_layer_config=mg.LayerSkipConfig([0], MID))
        got = minsdxl.text2img(
            model,
            prompt="a red fox",
            negative_prompt="blurry",
            num_inference_steps=4,
            height=64,
            width=64,
            guider=none,
            guidance_scale=6.0,
            generator=torch.Generator().manual_seed(1),
            output_type="latent",
        )
    finally:
        hook.remove()
    assert sizes == [2] * 4
    assert torch.equal(got, _plain(models))


def test_img2img_with_skip_layer_guidance_matches_diffusers(models):
    pipe, model = models
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    kw = dict(prompt="a red fox", image=image, strength=0.6, num_inference_steps=5)
    slg = dict(guidance_scale=6.0, skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    expected = _modular(pipe, dg.SkipLayerGuidance(**slg, skip_layer_config=LayerSkipConfig([0], fqn=MID)))(
        **kw, generator=torch.Generator().manual_seed(3), output="latents"
    )
    got = minsdxl.img2img(
        model,
        **kw,
        guider=mg.SkipLayerGuidance(**slg, skip_layer_config=mg.LayerSkipConfig([0], fqn=MID)),
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
    )
    assert rel_err(got, expected) <= LATENT_TOL


def test_bad_layer_guiders_are_refused(models):
    _, model = models
    kw = dict(prompt="a fox", num_inference_steps=2, height=64, width=64, output_type="latent")

    def run(guider):
        return minsdxl.text2img(model, **kw, guider=guider)

    with pytest.raises(ValueError, match="fqn='auto'.*mid_block.attentions.0.transformer_blocks"):
        run(mg.SkipLayerGuidance(skip_layer_guidance_layers=[0], skip_layer_guidance_stop=1.0))
    with pytest.raises(ValueError, match="no transformer blocks 'mid_block'"):
        run(mg.SkipLayerGuidance(skip_layer_guidance_stop=1.0, skip_layer_config=mg.LayerSkipConfig([0], "mid_block")))
    with pytest.raises(ValueError, match=r"blocks 0\.\.1, none of \[5\]"):
        run(mg.AutoGuidance(auto_guidance_config=mg.LayerSkipConfig([5], MID)))
    with pytest.raises(ValueError, match="one layer twice"):
        run(mg.SmoothedEnergyGuidance(seg_guidance_config=[mg.SmoothedEnergyGuidanceConfig([0], MID)] * 2))
    with pytest.raises(ValueError, match="LayerSkipConfig, a dict"):
        run(mg.AutoGuidance(auto_guidance_config=[object()]))
    with pytest.raises(ValueError, match="give one of skip_layer_guidance_layers and skip_layer_config"):
        mg.SkipLayerGuidance()
    with pytest.raises(ValueError, match="needs dropout"):
        mg.AutoGuidance(auto_guidance_layers=[0])
    with pytest.raises(ValueError, match="skip_attention_scores"):
        mg.LayerSkipConfig([0], skip_attention_scores=True)  # skip_attention is True by default
    with pytest.raises(ValueError, match="start < 1"):
        mg.SmoothedEnergyGuidance(seg_guidance_layers=[0], seg_guidance_start=1.0)
    assert all(getattr(m, "perturb", None) is None for m in model.unet.modules())


def test_command_line_layer_guiders(tiny_base, tmp_path, capsys):
    """--guider slg|pag|seg|auto:layers=BLOCKS.I+BLOCKS.J,...: configs grouped by block list, LayerSkipConfig's
    options beside the guider's; the image equals the API's with the same guider."""
    import numpy as np
    import PIL.Image

    from minsdxl.cli import main, make_guider

    spec = f"slg:layers={MID}.0+{DOWN}.1+{MID}.1,skip_ff=0,skip_layer_guidance_scale=2,skip_layer_guidance_stop=1"
    slg = mg.SkipLayerGuidance(
        skip_layer_guidance_scale=2.0,
        skip_layer_guidance_stop=1.0,
        skip_layer_config=[
            mg.LayerSkipConfig([0, 1], MID, skip_ff=False),
            mg.LayerSkipConfig([1], DOWN, skip_ff=False),
        ],
    )
    assert make_guider(spec) == slg
    assert make_guider(f"seg:layers={MID}.1,seg_blur_sigma=2") == mg.SmoothedEnergyGuidance(
        seg_blur_sigma=2.0, seg_guidance_config=[mg.SmoothedEnergyGuidanceConfig([1], MID)]
    )
    assert make_guider(f"auto:layers={MID}.0,dropout=0.5").auto_guidance_config == [
        mg.LayerSkipConfig([0], MID, dropout=0.5)
    ]
    out = tmp_path / "slg.png"
    argv = ["-p", "a red fox", "--model", str(tiny_base[1]), "--steps", "3", "--cfg", "6", "-s", "2", "-q"]
    assert main([*argv, "--guider", spec, "--no-watermark", "-o", str(out)]) == 0
    made = minsdxl.text2img(minsdxl.load(tiny_base[1]), "a red fox", num_inference_steps=3, guidance_scale=6.0, seed=2,
                            guider=slg)[0]  # fmt: skip
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(made))
    for bad, message in (
        ("slg", "give layers=BLOCKS.INDEX"),
        (f"slg:layers={MID}.0,skip_ff=maybe", "skip_ff takes 1 or 0"),
        (f"seg:layers={MID}.0,dropout=0.5", "not KEY=VALUE with a key of seg's"),
        ("pag:layers=mid_block.0", None),  # parses; the UNet has no such block list: a clean error, not a trace
    ):
        code = None
        try:
            code = main([*argv, "--guider", bad, "-o", str(tmp_path / "bad.png")])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code not in (0, None) and not (tmp_path / "bad.png").exists()
        assert (message or "the UNet has no transformer blocks 'mid_block'") in err, err


@pytest.mark.parametrize("case", ["controlnet", "inpaint"])
def test_the_perturbed_chunk_takes_the_positive_inputs(models, tiny_inpaint, tmp_path, case):
    """A perturbation that changes nothing (a block dropped out with p = 0) leaves cond - perturbed at 0, so SLG is
    plain CFG: only if the extra chunk got the positive rows of every batched input (a control image, the
    inpainting mask and masked image; with the negative ones it would be off by the CFG direction)."""
    import diffusers
    from sdxl_testing import box_mask, randomize_, smooth_image

    kw = dict(prompt="a cat", negative_prompt="dull", num_inference_steps=3, guidance_scale=5.0, output_type="latent")
    if case == "controlnet":
        pipe, model = models
        net = diffusers.ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
        randomize_(net, 5).eval().save_pretrained(tmp_path / "controlnet")
        run = lambda **g: minsdxl.text2img(  # noqa: E731
            model, **kw, **g, image=smooth_image(1), controlnet=minsdxl.load_controlnet(tmp_path / "controlnet"), seed=0
        )
    else:
        model = minsdxl.load(tiny_inpaint[1])
        run = lambda **g: minsdxl.inpaint(  # noqa: E731
            model, **kw, **g, image=smooth_image(2), mask_image=box_mask(), strength=0.8, seed=0
        )
    slg = dict(skip_layer_guidance_scale=4.0, skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    neutral = mg.SkipLayerGuidance(**slg, skip_layer_config=mg.LayerSkipConfig([0], MID, dropout=0.0))
    plain = run()
    assert rel_err(run(guider=neutral), plain) <= 1e-5
    skipping = mg.SkipLayerGuidance(**slg, skip_layer_config=mg.LayerSkipConfig([0], MID))
    assert rel_err(run(guider=skipping), plain) > 1e-3
