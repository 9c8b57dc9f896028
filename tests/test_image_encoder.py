"""Parity of minsdxl's IP-Adapter image encoder with transformers' CLIPVisionModelWithProjection (fp32,
CPU, random weights; tiny and real width), its loading from transformers folders, and of `preprocess`
with the CLIPImageProcessor diffusers' load_ip_adapter builds."""

import copy
from dataclasses import asdict

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from sdxl_testing import TINY_VISION, hf_vision_config, random_state_dict, rel_err

from minsdxl.checkpoint import CheckpointError, build_image_encoder, load_component, load_image_encoder
from minsdxl.config import VISION_PRESETS, VisionConfig, vision_config_from_state_dict
from minsdxl.image_encoder import CLIPVisionModelWithProjection, preprocess

# max |diff| <= 1e-5 * max |ref|: fp32, the same op order up to the attention kernel; a wrong norm,
# activation, position or layer index is off by far more
TOL = 1e-5
TINY = TINY_VISION


def reference(cfg: VisionConfig, seed: int = 0, device="cpu"):
    """transformers' model and ours on the same random tensors (built on meta, assigned: one copy)."""
    with torch.device("meta"):
        ref = transformers.CLIPVisionModelWithProjection(hf_vision_config(cfg))
        ours = CLIPVisionModelWithProjection(cfg)
    sd = random_state_dict(ref, seed)
    ref.load_state_dict(sd, assign=True)
    ref.vision_model.embeddings.position_ids = torch.arange(cfg.num_positions).expand(1, -1)  # non-persistent
    ours.load_state_dict(sd, assign=True)
    return ref.eval(), ours.eval()


def pixels(batch: int, cfg: VisionConfig, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)


@torch.no_grad()
def reference_outputs(ref, x):
    out = ref(x, output_hidden_states=True)
    return out.image_embeds, out.hidden_states


# ------------------------------------------------------------------------------------------------
# keys and configs


@pytest.mark.parametrize("preset", ["vit_h", "vit_bigg"])
def test_state_dict_keys_equal_installed_transformers(preset):
    cfg = VISION_PRESETS[preset]
    with torch.device("meta"):
        ref = transformers.CLIPVisionModelWithProjection(hf_vision_config(cfg))
        ours = CLIPVisionModelWithProjection(cfg)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}  # position_ids: non-persistent, not here
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    assert "vision_model.pre_layrnorm.weight" in want and "visual_projection.bias" not in want
    assert want["vision_model.embeddings.position_embedding.weight"][0] == 257  # 16 x 16 patches + class token


@pytest.mark.parametrize("preset", ["vit_h", "vit_bigg"])
def test_config_inferred_from_shapes_equals_preset(preset):
    cfg = VISION_PRESETS[preset]
    with torch.device("meta"):
        sd = dict(transformers.CLIPVisionModelWithProjection(hf_vision_config(cfg)).state_dict())
    sd["vision_model.embeddings.position_ids"] = torch.empty(1, 257, device="meta")  # older files carry it
    assert vision_config_from_state_dict(sd) == cfg  # no config.json: heads and gelu from the width
    # a config.json's head count wins over the default
    assert vision_config_from_state_dict(sd, VisionConfig(num_attention_heads=8)).num_attention_heads == 8


def test_presets_match_ip_adapter_numbers():
    """h94/IP-Adapter's models/image_encoder (ViT-H/14) and sdxl_models/image_encoder (ViT-bigG/14)."""
    h, g = VISION_PRESETS["vit_h"], VISION_PRESETS["vit_bigg"]
    assert (h.hidden_size, h.num_hidden_layers, h.num_attention_heads, h.intermediate_size) == (1280, 32, 16, 5120)
    assert (g.hidden_size, g.num_hidden_layers, g.num_attention_heads, g.intermediate_size) == (1664, 48, 16, 8192)
    assert (h.projection_dim, g.projection_dim) == (1024, 1280)
    for c in (h, g):
        assert (c.image_size, c.patch_size, c.hidden_act, c.layer_norm_eps) == (224, 14, "gelu", 1e-5)


# ------------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_tiny_matches_transformers(backend):
    ref, ours = reference(TINY, seed=1)
    for m in ours.modules():
        if hasattr(m, "attention_backend"):
            m.attention_backend = backend  # no mask: both backends take attention(q, k, v, heads, None)
    x = pixels(3, TINY)
    embeds, hs = reference_outputs(ref, x)
    assert len(hs) == TINY.num_hidden_layers + 1
    # penultimate must not run the last layer: make it fail if it does
    handle = ours.vision_model.encoder.layers[-1].register_forward_pre_hook(lambda *_: 1 / 0)
    with torch.no_grad():
        h = ours.penultimate(x)
    handle.remove()
    with torch.no_grad():
        e = ours(x)
    assert e.shape == (3, TINY.projection_dim) and rel_err(e, embeds) <= TOL
    assert h.shape == (3, 1 + 8 * 8, TINY.hidden_size) and rel_err(h, hs[-2]) <= TOL
    with torch.no_grad():  # every depth: hidden_states[k] is the output after k layers
        for k in range(TINY.num_hidden_layers + 1):
            assert rel_err(ours.vision_model(x, num_layers=k), hs[k]) <= TOL, k


def test_vit_h_width_matches_transformers():
    """ViT-H/14 at its real width, heads, MLP, patches, 257 tokens and projection, batch 1. Only 8 of
    its 32 layers: the full depth took 35 s on 2 CPU cores (12 s of it drawing the random weights), 8
    take about 11 s; the layers are alike, so depth adds time but no coverage (this file's budget: 60 s)."""
    ref, ours = reference(VisionConfig(num_hidden_layers=8), seed=2)
    x = pixels(1, ours.config, seed=3)
    embeds, hs = reference_outputs(ref, x)
    with torch.no_grad():
        e, h = ours(x), ours.penultimate(x)
    assert e.shape == (1, 1024) and h.shape == (1, 257, 1280)
    assert rel_err(e, embeds) <= TOL and rel_err(h, hs[-2]) <= TOL


def test_wrong_pixel_values_are_a_clear_error():
    ours = CLIPVisionModelWithProjection(TINY)
    for shape in [(1, 3, 31, 32), (1, 3, 64, 64), (1, 4, 32, 32), (3, 32, 32)]:
        with pytest.raises(ValueError, match=r"\[batch, 3, 32, 32\].*preprocess\(images, size=32\)"):
            ours(torch.zeros(shape))
        with pytest.raises(ValueError, match="preprocess"):
            ours.penultimate(torch.zeros(shape))


# ------------------------------------------------------------------------------------------------
# loading


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    ref, _ = reference(TINY, seed=4)
    folder = tmp_path_factory.mktemp("image_encoder")
    ref.save_pretrained(folder)
    return folder, ref


def test_load_saved_transformers_folder(tiny_folder):
    folder, ref = tiny_folder
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    ours = load_image_encoder(folder)
    assert isinstance(ours, CLIPVisionModelWithProjection) and ours.config == TINY  # heads from config.json
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"
    x = pixels(2, TINY, seed=5)
    embeds, hs = reference_outputs(ref, x)
    with torch.no_grad():
        assert rel_err(ours(x), embeds) <= TOL and rel_err(ours.penultimate(x), hs[-2]) <= TOL
    assert isinstance(load_component(folder), CLIPVisionModelWithProjection)
    half = load_image_encoder(folder, dtype=torch.bfloat16)
    ref_half = copy.deepcopy(ref).to(torch.bfloat16)
    with torch.no_grad():  # fp32 pixels are cast; against transformers in bf16 at test_unet's bf16 bound
        want = ref_half(x.to(torch.bfloat16)).image_embeds.float()
        assert half.dtype == torch.bfloat16 and rel_err(half(x).float(), want) < 2e-2


def test_load_pytorch_model_bin_with_position_ids(tiny_folder, tmp_path):
    """transformers' older file name, with the `position_ids` buffer older versions saved."""
    folder, ref = tiny_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    sd = dict(ref.state_dict()) | {"vision_model.embeddings.position_ids": torch.arange(65).expand(1, -1)}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    ours = load_image_encoder(tmp_path)
    x = pixels(1, TINY, seed=6)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x).image_embeds) <= TOL


def test_build_from_state_dict_without_config_uses_width_defaults(tiny_folder):
    _, ref = tiny_folder
    cfg = build_image_encoder(ref.state_dict()).config
    assert cfg == VisionConfig(**(asdict(TINY) | {"num_attention_heads": 16}))  # 32 wide: 16 heads of 2


def test_loading_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder.*image_encoder"):
        load_image_encoder(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no weights in .*model.safetensors"):
        load_image_encoder(tmp_path)
    (tmp_path / "image_encoder").mkdir()
    with pytest.raises(CheckpointError, match="pass its image_encoder folder"):
        load_image_encoder(tmp_path)
    text = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2)
    )
    text.save_pretrained(tmp_path / "text_encoder")
    with pytest.raises(CheckpointError, match="a CLIP text encoder, not a CLIP image encoder"):
        load_image_encoder(tmp_path / "text_encoder")


def test_missing_projection_is_a_clear_error(tiny_folder):
    _, ref = tiny_folder
    sd = {k: v for k, v in ref.state_dict().items() if k != "visual_projection.weight"}
    with pytest.raises(CheckpointError, match="missing 1 keys.*visual_projection.weight"):
        build_image_encoder(sd)


# ------------------------------------------------------------------------------------------------
# preprocess = diffusers' feature_extractor (transformers 5's torchvision CLIPImageProcessor), bit for bit


def processor(size: int):
    p = transformers.CLIPImageProcessor(size=size, crop_size=size)  # what diffusers' load_ip_adapter builds
    return lambda images: p(images, return_tensors="pt").pixel_values


def noise(w: int, h: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(noise(w, h, seed=seed))


# square, wide, tall, odd sizes both ways (odd crop margins), a tiny image that gets scaled up, exact size
SIZES = [(224, 224), (640, 480), (480, 640), (225, 301), (301, 225), (17, 9), (9, 17), (256, 224), (33, 32)]


@pytest.mark.parametrize("size", [224, 32])
def test_preprocess_rgb_sizes(size):
    ref = processor(size)
    for i, (w, h) in enumerate(SIZES):
        img = rgb(w, h, seed=i)
        got = preprocess(img, size=size)
        assert got.shape == (1, 3, size, size) and got.dtype == torch.float32
        assert torch.equal(got, ref(img)), (w, h)


def test_preprocess_modes():
    """Transparency is composited onto white (transformers' convert_to_rgb), other modes converted by PIL."""
    ref = processor(32)
    rgba = Image.fromarray(noise(50, 41, 4, seed=1), "RGBA")
    p_img = rgb(45, 60, seed=2).quantize(64)
    p_transparent = p_img.copy()
    p_transparent.info["transparency"] = 3
    images = {
        "RGBA": rgba,
        "LA": rgba.convert("LA"),
        "L": rgb(47, 39, seed=3).convert("L"),
        "P": p_img,
        "P+transparency": p_transparent,
        "CMYK": rgb(40, 40, seed=4).convert("CMYK"),
        "1": rgb(36, 40, seed=5).convert("1"),
    }
    for mode, img in images.items():
        assert torch.equal(preprocess(img, size=32), ref(img)), mode
    # and the alpha matters: not PIL's plain convert("RGB")
    assert not torch.equal(preprocess(rgba, size=32), ref(rgba.convert("RGB")))


def test_preprocess_batches_and_arrays():
    ref = processor(224)
    batch = [rgb(301, 225, seed=1), rgb(640, 480, seed=2), rgb(301, 225, seed=3), rgb(17, 9, seed=4)]
    assert torch.equal(preprocess(batch), ref(batch))  # transformers resizes same-size images together
    arrays = [noise(300, 200, seed=5), noise(200, 300, seed=6)]
    assert torch.equal(preprocess(arrays[0]), ref(arrays[0]))
    assert torch.equal(preprocess(arrays), ref(arrays))
    stacked = np.stack([noise(250, 230, seed=7), noise(250, 230, seed=8)])  # N x H x W x 3
    assert torch.equal(preprocess(stacked), ref(stacked))
    mixed = [arrays[0], batch[1]]
    assert torch.equal(preprocess(mixed), ref(mixed))
    assert torch.equal(preprocess(arrays[0][:, ::-1]), preprocess(np.ascontiguousarray(arrays[0][:, ::-1])))


def test_preprocess_errors():
    arr = noise(40, 30)
    with pytest.raises(ValueError, match=r"uint8.*\* 255"):  # transformers would read [0, 1] floats as 0..255
        preprocess(arr.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="height x width x 3"):
        preprocess(noise(40, 30, 4))
    with pytest.raises(ValueError, match="height x width x 3"):
        preprocess(arr[..., 0])
    with pytest.raises(TypeError, match="already pixel_values"):
        preprocess(torch.zeros(1, 3, 224, 224))
    with pytest.raises(TypeError, match="PIL images"):
        preprocess("photo.png")
    with pytest.raises(ValueError, match="empty"):
        preprocess([])
    with pytest.raises(ValueError, match="positive int"):
        preprocess(rgb(8, 8), size=0)
