"""Distilled SDXL UNets with an uneven topology (SSD-1B, Segmind Vega, KOALA): transformer depths that
vary per resnet and differ between encoder and decoder (diffusers' transformer_layers_per_block as
lists and reverse_transformer_layers_per_block), a middle block of one resnet (diffusers'
UNetMidBlock2D) or none (mid_block_type None), and one resnet per encoder level.

No real weights can be downloaded here, so the shapes are tiny SDXL-topology ones that take each of
these forms; parity is with diffusers' UNet2DConditionModel / ControlNetModel / pipeline on the same
random weights, and diffusers' from_single_file judges the sgm layout. Tolerances as test_unet.py's
(1e-5 relative: fp32, another association order) and test_pipelines.py's (1e-4 on final latents)."""

import json
from dataclasses import replace

import diffusers
import pytest
import torch
from sdxl_testing import TINY_UNET, diffusers_unet_config, meta_diffusers, random_state_dict, rel_err
from test_unet import _check, _digests, diffusers_unet_config_model

import minsdxl
from minsdxl.checkpoint import diffusers_to_sgm, load_component, save_safetensors, save_single_file, unet_config_json
from minsdxl.cli import describe_checkpoint, unet_topology
from minsdxl.config import unet_config_from_state_dict
from minsdxl.controlnet import controlnet_config_json
from minsdxl.unet import UNet2DConditionModel

TOL = 1e-5
VARIANTS = {
    # SSD-1B-like: per-resnet depths in the encoder, other ones in the decoder, a one-resnet middle block
    "ssd1b": replace(
        TINY_UNET,
        transformer_layers=(0, 1, (2, 1)),
        up_transformer_layers=((2, 2, 1), (1, 1, 2), 0),
        mid_transformer_layers=0,
    ),
    # Vega-like: even encoder depths, a decoder that differs, a one-resnet middle block
    "vega": replace(TINY_UNET, up_transformer_layers=((2, 1, 1), 1, 0), mid_transformer_layers=0),
    # KOALA-like: one resnet per encoder level (two per decoder level) and no middle block
    "koala": replace(TINY_UNET, layers_per_block=1, mid_transformer_layers=None),
}


def _pair(cfg, seed=1):
    sd = random_state_dict(diffusers_unet_config_model(cfg), seed=seed)
    ref = meta_diffusers(diffusers.UNet2DConditionModel, diffusers_unet_config(cfg), sd)
    with torch.device("meta"):
        ours = UNet2DConditionModel(cfg)
    ours.load_state_dict(sd, strict=True, assign=True)  # diffusers' keys, no renaming
    return ref, ours.eval(), sd


@pytest.mark.parametrize("name", VARIANTS)
def test_unet_matches_diffusers_and_its_config_is_read_from_shapes(name):
    cfg = VARIANTS[name]
    ref, ours, sd = _pair(cfg)
    outs = [
        _check(ref, ours, cfg, 2, 16, 12, torch.tensor([500.0, 1.0]), seed=1),
        _check(ref, ours, cfg, 1, 20, 12, 37.5, seed=2),  # 20 / 2 / 2 = 5: the decoder's odd-size path
    ]
    assert outs[0].abs().max() > 0
    # the config comes back from the state dict alone (the head size from a base, as from a config.json)
    assert unet_config_from_state_dict(sd, TINY_UNET) == cfg
    # the layers diffusers builds are the ones the config says (not a topology both sides got wrong alike)
    blocks = lambda prefix: len({k.split(".")[5] for k in sd if k.startswith(prefix + "transformer_blocks.")})  # noqa: E731
    assert blocks("down_blocks.2.attentions.0.") == cfg.down_depths(2)[0]
    assert blocks("up_blocks.0.attentions.1.") == cfg.up_depths(0)[1]
    assert any(k.startswith("mid_block.") for k in sd) == (cfg.mid_transformer_layers is not None)
    assert any(k.startswith("mid_block.attentions.") for k in sd) == bool(cfg.mid_transformer_layers)


def test_uneven_depths_need_the_decoder_depths():
    """As diffusers (which asks for reverse_transformer_layers_per_block): per-resnet encoder depths
    cannot be mirrored into a decoder level that has one resnet more."""
    with pytest.raises(ValueError, match="up_transformer_layers"):
        UNet2DConditionModel(replace(TINY_UNET, transformer_layers=(0, 1, (2, 1))))
    with pytest.raises(ValueError, match="3 transformer depths for a level of 2 resnets"):
        UNet2DConditionModel(replace(TINY_UNET, transformer_layers=(0, 1, (2, 1, 1))))


@pytest.mark.parametrize("name", VARIANTS)
def test_single_file_layout_is_diffusers_own(name, tmp_path):
    """Our sgm file of the weights (model.diffusion_model.*): diffusers' from_single_file reads it to the
    same tensors, and minsdxl reads it back with the config inferred from the keys and shapes alone."""
    cfg = VARIANTS[name]
    ref, _, sd = _pair(cfg, seed=2)
    sgm = diffusers_to_sgm({"unet": sd})
    mid = {k.split(".")[3] for k in sgm if k.startswith("model.diffusion_model.middle_block.")}
    assert mid == (set() if cfg.mid_transformer_layers is None else {"0"})  # of sgm's middle_block.0 / 1 / 2
    path = tmp_path / "unet.safetensors"
    save_safetensors(sgm, path)
    ref.save_config(tmp_path / "config" / "unet")
    judge = diffusers.UNet2DConditionModel.from_single_file(
        str(path), config=str(tmp_path / "config"), subfolder="unet", local_files_only=True
    )
    assert _digests(judge.state_dict()) == _digests(sd)
    unet = load_component(path, config=tmp_path / "config" / "unet")
    assert unet.config == cfg
    # `minsdxl info` on the file shows the topology (diffusers' names: the middle block, the decoder's depths)
    info = describe_checkpoint(path, config=tmp_path / "config" / "unet")["components"]
    topology = next(c["topology"] for c in info.values() if "topology" in c)
    assert topology == unet_topology(cfg)
    assert ("middle one resnet" in topology) == (name != "koala") and ("middle none" in topology) == (name == "koala")
    assert _digests(unet.state_dict()) == _digests(sd)


def test_config_json_round_trips_through_diffusers():
    """unet_config_json writes what diffusers reads back into the same model: diffusers' own config
    (with the defaults it fills in) gives the same layers."""
    for cfg in VARIANTS.values():
        cj = unet_config_json(cfg)
        model = diffusers.UNet2DConditionModel.from_config(cj)
        assert unet_config_from_state_dict(model.state_dict(), TINY_UNET) == cfg
        again = json.loads(json.dumps(dict(model.config)))  # what save_pretrained would write
        assert again["mid_block_type"] == cj["mid_block_type"]


def test_pipeline_text2img_matches_diffusers(tiny_base, tmp_path):
    """A whole model folder with the SSD-1B-like UNet: minsdxl.load and text2img (CFG, 4 Euler steps)
    give diffusers' final latents; the same model as one sgm file loads to the same UNet."""
    pipe = tiny_base[0]
    cfg = VARIANTS["ssd1b"]
    ref, _, sd = _pair(cfg, seed=4)
    pipe = diffusers.StableDiffusionXLPipeline(**{**pipe.components, "unet": ref})
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "model", safe_serialization=True)
    model = minsdxl.load(tmp_path / "model")
    assert model.unet.config == replace(cfg, sample_size=model.unet.config.sample_size)
    kw = dict(prompt="a lighthouse", num_inference_steps=4, guidance_scale=5.0, height=64, width=64)
    expected = pipe(**kw, generator=torch.Generator().manual_seed(3), output_type="latent").images
    got = minsdxl.text2img(
        model, **kw, generator=torch.Generator().manual_seed(3), output_type="latent", progress=False
    )
    assert rel_err(got, expected) <= 1e-4
    single = save_single_file(model, tmp_path / "ssd.safetensors")
    again = minsdxl.load(single, config=tmp_path / "model")
    assert again.unet.config == model.unet.config
    assert _digests(again.unet.state_dict()) == _digests(model.unet.state_dict())


def test_controlnet_of_a_distilled_unet_matches_diffusers(tmp_path):
    """diffusers' ControlNetModel.from_unet copies the encoder half, one-resnet middle block included:
    ours gives the same residuals."""
    cfg = VARIANTS["ssd1b"]
    ref_unet, _, _ = _pair(cfg, seed=5)
    ref = diffusers.ControlNetModel.from_unet(ref_unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    ref.load_state_dict(random_state_dict(ref, seed=6))
    ref.eval()
    ref.save_pretrained(tmp_path / "cn")
    ours = minsdxl.load_controlnet(tmp_path / "cn")  # its topology read from the weights' shapes
    assert ours.config.transformer_layers == cfg.transformer_layers and ours.config.mid_transformer_layers == 0
    assert controlnet_config_json(ours.config)["mid_block_type"] == ref.config.mid_block_type == "UNetMidBlock2D"
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 48, generator=g)
    cond, pooled = torch.rand(2, 3, 64, 64, generator=g), torch.randn(2, 32, generator=g)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    d_ref, m_ref = ref(
        x, 500, ctx, cond, 0.7, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}, return_dict=False
    )
    d, m = ours(x, 500, ctx, cond, pooled, ids, conditioning_scale=0.7)
    assert len(d) == len(d_ref)
    assert all(rel_err(a, b) <= TOL for a, b in zip(d, d_ref)) and rel_err(m, m_ref) <= TOL
