"""Playground v2.5 (SDXL's architecture, trained in the EDM formulation with per-channel latent statistics)
against diffusers' SDXL pipelines: the VAE's latents_mean / latents_std on the way in (img2img / inpaint
encode) and out (decode), the EDM schedulers in the pipelines, and loading the statistics and scheduler
from a diffusers folder or from Playground's single file (its edm_mean / edm_std keys); CosXL (EDM Euler,
v-prediction); the v-prediction marker keys of single files."""

import functools
import json
import types

import diffusers
import numpy as np
import PIL.Image
import pytest
import safetensors.torch
import torch
from sdxl_testing import (
    TINY_VAE,
    box_mask,
    component_state_dicts,
    diffusers_vae_config,
    minsdxl_from_pipe,
    rel_err,
    smooth_image,
)
from test_schedulers_edm import COSXL  # stabilityai/cosxl's scheduler: EDM Euler, exponential σ, v-prediction

import minsdxl
from minsdxl.checkpoint import PLAYGROUND_SCHEDULER_CONFIG, diffusers_to_sgm, read_checkpoint
from minsdxl.cli import _scheduler_info, describe_checkpoint, main, read_png_metadata

# playgroundai/playground-v2.5-1024px-aesthetic vae/config.json
MEAN = [-1.6574, 1.886, -1.383, 2.5155]
STD = [8.4927, 5.9022, 6.5498, 5.2299]
SIZE = dict(height=64, width=64)
TOL = 1e-4  # fp32, a few steps of a tiny random model: the two agree to ~1e-6


def _vae(pipe, **config):
    """The pipeline's VAE weights under another config."""
    vae = diffusers.AutoencoderKL(**{**diffusers_vae_config(TINY_VAE), **config})
    vae.load_state_dict(pipe.vae.state_dict())
    return vae.eval()


@pytest.fixture(scope="module")
def playground(tiny_base, tmp_path_factory):
    """(diffusers pipeline, its saved folder, minsdxl model loaded from it): the tiny base with Playground's
    VAE statistics and scaling factor and its EDM DPM-Solver scheduler."""
    pipe = diffusers.StableDiffusionXLPipeline(**tiny_base[0].components)
    vae = _vae(pipe, latents_mean=MEAN, latents_std=STD, scaling_factor=0.5)
    scheduler = diffusers.EDMDPMSolverMultistepScheduler.from_config(PLAYGROUND_SCHEDULER_CONFIG)
    pipe = diffusers.StableDiffusionXLPipeline(**{**pipe.components, "vae": vae.eval(), "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("playground") / "model"
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe, folder, minsdxl.load(folder)


def _pipe(pipe, cls, scheduler=None):
    return cls(**{**pipe.components, **({"scheduler": scheduler} if scheduler else {})})


def _both(pipe, model, fn, output_type="latent", **kw):
    ref = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type=output_type).images
    got = fn(model, **kw, generator=torch.Generator().manual_seed(0), output_type=output_type, progress=False)
    ref = torch.as_tensor(np.asarray(ref)) if output_type == "np" else ref
    got = torch.as_tensor(np.asarray(got)) if output_type == "np" else got
    assert got.shape == ref.shape
    return rel_err(got, ref)


def test_folder_config_gives_the_statistics_and_the_edm_scheduler(playground, tmp_path):
    _, folder, model = playground
    assert model.vae.config.latents_mean == tuple(MEAN) and model.vae.config.latents_std == tuple(STD)
    assert model.vae.scaling_factor == 0.5
    assert model.scheduler_config["_class_name"] == "EDMDPMSolverMultistepScheduler"
    # written back as diffusers has them: diffusers reads our folder with the same VAE config
    minsdxl.checkpoint.save(model, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "vae" / "config.json").read_text())
    assert saved["latents_mean"] == MEAN and saved["latents_std"] == STD and saved["scaling_factor"] == 0.5
    judge = diffusers.AutoencoderKL.from_pretrained(tmp_path / "saved" / "vae")
    assert list(judge.config.latents_mean) == MEAN and list(judge.config.latents_std) == STD


def test_decode_applies_the_statistics_as_diffusers(playground):
    pipe, _, model = playground
    assert _both(pipe, model, minsdxl.text2img, "np", prompt="a cat", num_inference_steps=3, **SIZE) <= TOL
    # and they matter: the same latents decoded without them are another image
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = minsdxl_from_pipe(
        diffusers.StableDiffusionXLPipeline(**{**pipe.components, "vae": _vae(pipe, scaling_factor=0.5)})
    )
    with_stats = minsdxl.sampler.decode(model, lat)
    assert rel_err(minsdxl.sampler.decode(plain, lat), with_stats) > 0.1
    # decode(unscale(scale(z))) round trip: the two maps are inverse
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    assert rel_err(model.vae.unscale_latents(model.vae.scale_latents(z)), z) < 1e-6


SCHEDULERS = {  # our name on Playground's config -> diffusers' scheduler
    None: lambda: diffusers.EDMDPMSolverMultistepScheduler.from_config(PLAYGROUND_SCHEDULER_CONFIG),
    "euler": lambda: diffusers.EDMEulerScheduler.from_config(PLAYGROUND_SCHEDULER_CONFIG),
    "DPM++ 2M SDE": lambda: diffusers.EDMDPMSolverMultistepScheduler.from_config(
        PLAYGROUND_SCHEDULER_CONFIG, algorithm_type="sde-dpmsolver++"
    ),
    "dpmpp_3m": lambda: diffusers.EDMDPMSolverMultistepScheduler.from_config(
        PLAYGROUND_SCHEDULER_CONFIG, solver_order=3
    ),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_text2img_with_each_edm_scheduler_matches_diffusers(playground, name):
    pipe, _, model = playground
    ref = _pipe(pipe, diffusers.StableDiffusionXLPipeline, SCHEDULERS[name]())
    kw = dict(prompt="a cat", num_inference_steps=6, guidance_scale=4.0, **SIZE)
    assert _both(ref, model, functools.partial(minsdxl.text2img, scheduler=name), **kw) <= TOL


def test_cosxl_v_prediction_matches_diffusers(playground):
    """CosXL (an SDXL v-prediction model on EDM Euler's exponential σ): its folder's scheduler config."""
    pipe, _, model = playground
    ref = _pipe(pipe, diffusers.StableDiffusionXLPipeline, diffusers.EDMEulerScheduler.from_config(COSXL))
    cosxl = minsdxl_from_pipe(ref)
    assert cosxl.scheduler_config["prediction_type"] == "v_prediction"
    kw = dict(prompt="a cat", num_inference_steps=5, guidance_rescale=0.7, **SIZE)
    assert _both(ref, cosxl, minsdxl.text2img, **kw) <= TOL


def test_base_to_refiner_split_is_refused_with_the_reason(playground):
    _, _, model = playground
    for split in (dict(denoising_end=0.8), dict(denoising_start=0.8, image=torch.zeros(1, 4, 8, 8))):
        fn = minsdxl.img2img if "image" in split else minsdxl.text2img
        with pytest.raises(ValueError, match=r"0\.25·log σ, not training steps"):
            fn(model, "a cat", num_inference_steps=4, **split, **SIZE)
    with pytest.raises(ValueError, match="no EDM counterpart"):
        minsdxl.text2img(model, "a cat", scheduler="heun", **SIZE)


def test_img2img_encodes_with_the_statistics_as_diffusers(playground):
    pipe, _, model = playground
    img2img = _pipe(pipe, diffusers.StableDiffusionXLImg2ImgPipeline)
    kw = dict(prompt="a cat", image=smooth_image(1), strength=0.6, num_inference_steps=5)
    assert _both(img2img, model, minsdxl.img2img, **kw) <= TOL
    assert _both(img2img, model, minsdxl.img2img, "np", **kw) <= TOL


def _fixed_encode(pipe, mean, std):
    """diffusers' inpaint pipelines encode the image with the scaling factor alone (_encode_vae_image
    ignores latents_mean / latents_std, which their decode applies): the kept part of a Playground image
    would come back as z * std + mean. minsdxl encodes as img2img does; this is that, in diffusers."""
    original = pipe._encode_vae_image
    sf = pipe.vae.config.scaling_factor

    def encode(self, image, generator):
        z = original(image, generator) / sf  # exact: the scaling factor is 0.5
        m, s = (torch.tensor(v).view(1, 4, 1, 1).to(z.device, z.dtype) for v in (mean, std))
        return (z - m) * sf / s

    pipe._encode_vae_image = types.MethodType(encode, pipe)
    return pipe


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpaint_encodes_with_the_statistics(playground, strength):
    pipe, _, model = playground
    inpaint = _pipe(pipe, diffusers.StableDiffusionXLInpaintPipeline)
    kw = dict(prompt="a cat", image=smooth_image(2), mask_image=box_mask(), strength=strength, num_inference_steps=4)
    assert _both(_fixed_encode(inpaint, MEAN, STD), model, minsdxl.inpaint, "np", **kw, **SIZE) <= TOL
    # diffusers as it is keeps the unmasked part as z * std + mean there: far from ours
    as_is = _pipe(pipe, diffusers.StableDiffusionXLInpaintPipeline)
    assert _both(as_is, model, minsdxl.inpaint, "np", **kw, **SIZE) > 0.02


def test_single_file_statistics_give_playgrounds_configs(playground, tmp_path):
    pipe, folder, _ = playground
    sd = diffusers_to_sgm(component_state_dicts(pipe))
    # Playground's file keeps them as [1, 4, 1, 1] tensors beside the model's keys
    sd |= {"edm_mean": torch.tensor(MEAN).view(1, 4, 1, 1), "edm_std": torch.tensor(STD).view(1, 4, 1, 1)}
    path = tmp_path / "playground.safetensors"
    safetensors.torch.save_file(sd, path)
    _, configs = read_checkpoint(path)
    assert configs["vae"]["latents_mean"] == pytest.approx(MEAN) and configs["vae"]["scaling_factor"] == 0.5
    assert configs["vae"]["latents_std"] == pytest.approx(STD)
    assert configs["scheduler"] == PLAYGROUND_SCHEDULER_CONFIG
    info = describe_checkpoint(path, config=folder)  # `minsdxl info`: the statistics are read, not ignored
    assert info["ignored_keys"] == [] and info["scheduler"] == "EDMDPMSolverMultistepScheduler"
    # config= (a diffusers folder) describes the file instead, as in diffusers' from_single_file
    model = minsdxl.load(path, config=folder)
    assert model.vae.config.latents_mean == tuple(MEAN) and model.scheduler_config["_class_name"].startswith("EDM")
    # a plain SDXL file has none of it
    del sd["edm_mean"], sd["edm_std"]
    safetensors.torch.save_file(sd, path)
    _, configs = read_checkpoint(path)
    assert "vae" not in configs and "scheduler" not in configs


def test_single_file_v_prediction_markers(playground, tmp_path):
    """A1111 / ComfyUI mark v-prediction and zero-terminal-SNR files with empty `v_pred` / `ztsnr` tensors."""
    pipe, folder, _ = playground
    sd = diffusers_to_sgm(component_state_dicts(pipe))
    path = tmp_path / "vpred.safetensors"
    for markers, v, zero_snr in (
        (("v_pred", "ztsnr"), True, True),
        (("v_pred",), True, False),
        (("ztsnr",), False, True),
    ):
        safetensors.torch.save_file(sd | {k: torch.tensor([]) for k in markers}, path)
        _, configs = read_checkpoint(path)
        assert configs["scheduler"]["prediction_type"] == ("v_prediction" if v else "epsilon")
        assert configs["scheduler"]["rescale_betas_zero_snr"] is zero_snr
        assert configs["scheduler"]["timestep_spacing"] == "leading"  # SDXL's otherwise
    assert _scheduler_info(configs["scheduler"]) == "EulerDiscreteScheduler (zero terminal SNR)"  # `minsdxl info`
    # config= describes the file instead
    assert minsdxl.load(path, config=folder).scheduler_config["_class_name"].startswith("EDM")


def test_command_line_with_an_edm_model(playground, tmp_path):
    """minsdxl generate on Playground: its EDM scheduler by default, a VP name mapped onto EDM, and --from-png
    makes the same image again."""
    _, folder, model = playground
    run = ["-p", "a cat", "--model", str(folder), "-W", "64", "-H", "64", "--steps", "3", "-s", "1", "-q"]
    assert main([*run, "-o", str(tmp_path / "a.png")]) == 0
    meta = read_png_metadata(tmp_path / "a.png")
    assert meta["minsdxl"]["scheduler"]["name"] == "edm_dpmpp_2m_karras"
    assert "Sampler: edm_dpmpp_2m_karras" in meta["parameters"]
    made = minsdxl.text2img(model, "a cat", num_inference_steps=3, seed=1, progress=False, **SIZE)[0]
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "a.png").convert("RGB")), np.asarray(made))
    assert main(["--from-png", str(tmp_path / "a.png"), "-o", str(tmp_path / "b.png"), "-q"]) == 0
    assert np.array_equal(
        np.asarray(PIL.Image.open(tmp_path / "b.png")), np.asarray(PIL.Image.open(tmp_path / "a.png"))
    )
    assert main([*run, "--sampler", "Euler", "-o", str(tmp_path / "c.png")]) == 0
    assert read_png_metadata(tmp_path / "c.png")["minsdxl"]["scheduler"]["name"] == "edm_euler_karras"
    assert main([*run, "--sampler", "Heun", "-o", str(tmp_path / "d.png")]) == 1  # no EDM Heun: said, not made
    assert not (tmp_path / "d.png").exists()
