"""TAESD / TAESDXL (minsdxl.taesd) against diffusers' AutoencoderTiny: the module at taesdxl's shapes on random weights
(encode, decode, both tilings, bit for bit), its config read off the keys, madebyollin's original files (either half,
.pth or .safetensors, A1111's VAE-taesd folder), and whole text2img / img2img / inpaint runs of
StableDiffusionXL*Pipeline with vae=AutoencoderTiny against minsdxl.load(..., vae=TAESD) on the tiny SDXL."""

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from sdxl_testing import box_mask, randomize_, rel_err, smooth_image

import minsdxl
from minsdxl import tiny
from minsdxl.checkpoint import CheckpointError, load_component, save_safetensors
from minsdxl.cli import main, read_png_metadata
from minsdxl.config import TAESDConfig
from minsdxl.taesd import AutoencoderTiny

# test_pipelines.py's bound on the final latents; images: at most 1 level, on at most 0.1 % of the values
LATENT_TOL = 1e-4
KW = dict(prompt="a red fox", negative_prompt="blurry", num_inference_steps=3, height=64, width=64)


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    """(diffusers' AutoencoderTiny with taesdxl's config and random weights, its saved folder)."""
    ref = randomize_(diffusers.AutoencoderTiny(), 7).eval()
    folder = tmp_path_factory.mktemp("taesdxl")
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


def _original(ref) -> dict:
    """diffusers' keys -> madebyollin's two files' (the decoder's layers one up: its Clamp comes first)."""
    halves = {"encoder": {}, "decoder": {}}
    for k, v in ref.state_dict().items():
        half, _, i, rest = k.split(".", 3)
        halves[half][f"{int(i) + (half == 'decoder')}.{rest}"] = v.clone()
    return halves


def test_module_equals_diffusers_with_both_tilings(taesd):
    ref, folder = taesd
    ours = load_component(folder)
    assert isinstance(ours, AutoencoderTiny) and ours.config == TAESDConfig()
    size = sum(p.numel() for p in ours.decoder.parameters())
    assert size == sum(p.numel() for p in ref.decoder.parameters()) < 1.3e6  # taesdxl's decoder; the VAE's: 49 M
    g = torch.Generator().manual_seed(0)
    x, z = torch.rand(2, 3, 64, 96, generator=g) * 2 - 1, torch.randn(2, 4, 8, 12, generator=g)
    assert torch.equal(ours.decode(z), ref.decode(z).sample)
    assert torch.equal(ours.encode(x).sample(torch.Generator()), ref.encode(x).latents)
    ours.enable_tiling(), ref.enable_tiling()
    ours.enable_slicing(), ref.enable_slicing()
    try:  # over 512 px: 2 x 2 tiles blended, in both directions
        x, z = torch.rand(2, 3, 640, 576, generator=g) * 2 - 1, torch.randn(2, 4, 80, 72, generator=g)
        assert torch.equal(ours.decode(z), ref.decode(z).sample)
        assert torch.equal(ours.encode(x).mode(), ref.encode(x).latents)
    finally:
        ref.disable_tiling(), ref.disable_slicing()


def test_config_read_off_other_shapes(tmp_path):
    """Stage widths and block counts come from the keys (diffusers' AutoencoderTiny takes them as config)."""
    shapes = dict(encoder_block_out_channels=(16, 16, 16, 16), num_encoder_blocks=(2, 1, 2, 1))
    shapes |= dict(decoder_block_out_channels=(24, 24, 24, 24), num_decoder_blocks=(1, 2, 1, 2))
    ref = randomize_(diffusers.AutoencoderTiny(**shapes), 9).eval()
    ref.save_pretrained(tmp_path)
    ours = load_component(tmp_path)
    assert ours.config == TAESDConfig(**shapes)
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert torch.equal(ours.decode(ours.encode(x).mode()), ref.decode(ref.encode(x).latents).sample)


def test_original_files_in_either_format(taesd, tmp_path, capsys):
    """madebyollin's taesdxl_encoder / taesdxl_decoder files: a decoder file finds its encoder beside it (A1111's
    models/VAE-taesd), a folder of them loads, and one half alone decodes (or encodes) only."""
    ref, folder = taesd
    want = load_component(folder).state_dict()
    halves = _original(ref)
    save_safetensors(halves["decoder"], tmp_path / "taesdxl_decoder.safetensors")
    alone = load_component(tmp_path / "taesdxl_decoder.safetensors")
    assert alone.encoder is None and all(torch.equal(v, want[k]) for k, v in alone.state_dict().items())
    with pytest.raises(ValueError, match="no encoder .* taesdxl_encoder.pth"):
        alone.encode(torch.zeros(1, 3, 64, 64))
    torch.save(halves["encoder"], tmp_path / "taesdxl_encoder.pth")
    for path in (tmp_path / "taesdxl_decoder.safetensors", tmp_path / "taesdxl_encoder.pth", tmp_path):
        both = load_component(path).state_dict()
        assert both.keys() == want.keys() and all(torch.equal(both[k], want[k]) for k in want), path
    assert main(["info", str(tmp_path / "taesdxl_encoder.pth")]) == 0  # info names what loads: both halves
    assert "TAESD (encoder and decoder) for SDXL, 2.4 M parameters" in capsys.readouterr().out
    (tmp_path / "taesdxl_encoder.pth").unlink()
    assert main(["info", str(tmp_path / "taesdxl_decoder.safetensors")]) == 0
    assert "TAESD (decoder) for SDXL, 1.2 M parameters" in capsys.readouterr().out
    torch.save(halves["decoder"], tmp_path / "taesdxl_encoder.pth")  # misnamed: two decoders
    with pytest.raises(CheckpointError, match="is not the TAESD encoder its name says"):
        load_component(tmp_path / "taesdxl_decoder.safetensors")


def _pipes(tiny_base, ref, folder, cls, **load):
    pipe, model_dir = tiny_base
    theirs = cls(**{**pipe.components, "vae": ref})
    theirs.set_progress_bar_config(disable=True)
    return theirs, minsdxl.load(model_dir, vae=folder, **load)


def test_text2img_equals_diffusers(tiny_base, taesd):
    ref, folder = taesd
    theirs, model = _pipes(tiny_base, ref, folder, diffusers.StableDiffusionXLPipeline)
    assert isinstance(model.vae, AutoencoderTiny) and model.vae.scaling_factor == 1.0
    want = theirs(**KW, generator=torch.Generator().manual_seed(2)).images
    got = minsdxl.text2img(model, **KW, seed=2, progress=False)
    a, b = (np.stack([np.asarray(i, dtype=np.int16) for i in x]) for x in (want, got))
    assert np.abs(a - b).max() <= 1 and (np.abs(a - b) > 0).mean() <= 1e-3
    vae = minsdxl.text2img(minsdxl.load(tiny_base[1]), **KW, seed=2, progress=False)
    assert np.abs(np.asarray(vae[0], dtype=np.int16) - b[0]).mean() > 5  # it decoded with TAESD, not the VAE


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_image_to_image_encodes_as_diffusers(tiny_base, taesd, mode):
    """The image is encoded by TAESD without drawing noise (diffusers' retrieve_latents): the seed's noise is then
    the same, and so are the final latents."""
    ref, folder = taesd
    cls = {"img2img": diffusers.StableDiffusionXLImg2ImgPipeline, "inpaint": diffusers.StableDiffusionXLInpaintPipeline}
    cls = cls[mode]
    theirs, model = _pipes(tiny_base, ref, folder, cls)
    kw = dict(KW, image=smooth_image(3), strength=0.7, output_type="latent")
    kw |= {"mask_image": box_mask()} if mode == "inpaint" else {}
    want = theirs(**kw, generator=torch.Generator().manual_seed(4)).images
    got = getattr(minsdxl, mode)(model, **kw, generator=torch.Generator().manual_seed(4), progress=False)
    assert rel_err(got, want) < LATENT_TOL


def test_save_refuses_and_load_checks_the_kind(tiny_base, taesd, tmp_path):
    model = minsdxl.load(tiny_base[1], vae=taesd[1])
    with pytest.raises(ValueError, match="decodes with TAESD .* load the model without vae="):
        minsdxl.checkpoint.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="holds AutoencoderTiny weights, not a UNet2DConditionModel"):
        minsdxl.load(tiny_base[1], unet=taesd[1])
    save_safetensors(_original(taesd[0])["encoder"], tmp_path / "taesdxl_encoder.safetensors")
    with pytest.raises(CheckpointError, match="is a TAESD encoder alone; the model decodes with it"):
        minsdxl.load(tiny_base[1], vae=tmp_path / "taesdxl_encoder.safetensors")


@pytest.mark.parametrize("which", ["taesd", "vae folder"])
def test_vae_flag_takes_a_taesd_or_a_vae_folder(taesd, tmp_path, which):
    """--vae FOLDER on the command line (the bundled tiny model): TAESD's, or a diffusers VAE folder (hashed by
    its weights file), the API's image, named in the metadata."""
    folder = taesd[1] if which == "taesd" else tiny.PATH / "vae"
    out = tmp_path / "x.png"
    assert (
        main(["-p", "a red circle at the top left", "--steps", "2", "-s", "3", "--vae", str(folder), "-o", str(out)])
        == 0
    )
    model = minsdxl.load("tiny", vae=folder)
    want = minsdxl.text2img(model, "a red circle at the top left", num_inference_steps=2, seed=3, progress=False)[0]
    with PIL.Image.open(out) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(want))
    info = read_png_metadata(out)["minsdxl"]["vae"]
    assert info["path"] == str(folder) and info["sha256_of"] == "diffusion_pytorch_model.safetensors"
