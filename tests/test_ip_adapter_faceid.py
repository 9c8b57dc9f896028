"""IP-Adapter FaceID (h94/IP-Adapter-FaceID's ip-adapter-faceid_sdxl / -faceid-plusv2_sdxl) against diffusers'
load_ip_adapter on tiny random weights, fp32 on CPU.

The adapter files are written here in the original layout diffusers converts on load: `image_proj.*` (FaceID:
proj.0 / proj.2 / norm; FaceID Plus: the same plus `perceiver_resampler.*`) and `ip_adapter.*`, which holds the
cross-attentions' to_k_ip / to_v_ip (1, 3, 5, ...) and a LoRA pair per to_q / to_k / to_v / to_out of every
attention processor (0, 1, 2, ...), numbered in diffusers' attn_processors order (read here from diffusers'
UNet). FaceID takes insightface embeddings, which only ip_adapter_image_embeds can carry: random 512-wide ones
here. Bounds: latents within 1e-4 relative (test_ip_adapter's), the projections within 1e-6.
"""

import copy
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from sdxl_testing import (
    TINY_VISION,
    _ip_layers,
    _norm,
    _normal,
    flat_ip_adapter,
    hf_vision_config,
    lora_layers,
    minsdxl_from_pipe,
    peft_lora,
    random_lora_pairs,
    random_state_dict,
    rel_err,
    resampler_blocks,
)

import minsdxl
from minsdxl.checkpoint import CheckpointError, save_safetensors

TOL = 1e-4
ID = 512  # insightface's normed_embedding
FACEID, FACEID_ST, PLUS = "ip-adapter-faceid_tiny.bin", "ip-adapter-faceid_tiny.safetensors", "faceid-plusv2_tiny.bin"


def _lora(unet, g, rank=4) -> dict:
    """The FaceID LoRA: {i}.to_{q,k,v,out}_lora.{down,up}.weight for attention processor i (attn1s and attn2s)."""
    out = {}
    for i, name in enumerate(unet.attn_processors):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        for x in ("q", "k", "v", "out"):
            layer = attn.to_out[0] if x == "out" else getattr(attn, f"to_{x}")
            out[f"{i}.to_{x}_lora.down.weight"] = _normal(g, rank, layer.in_features)
            out[f"{i}.to_{x}_lora.up.weight"] = _normal(g, layer.out_features, rank)
    return out


def faceid_adapter(unet, seed=2, tokens=4) -> dict:
    """ip-adapter-faceid_sdxl's layout (MLPProjModel: Linear 512 -> 1024, GELU, Linear -> tokens x width, LayerNorm)."""
    g, cross = torch.Generator().manual_seed(seed), unet.config.cross_attention_dim
    proj = {
        "proj.0.weight": _normal(g, 2 * ID, ID),
        "proj.0.bias": _normal(g, 2 * ID),
        "proj.2.weight": _normal(g, tokens * cross, 2 * ID),
        "proj.2.bias": _normal(g, tokens * cross),
        **_norm(g, cross, "norm."),
    }
    return {"image_proj": proj, "ip_adapter": _ip_layers(unet, g) | _lora(unet, g)}


def faceid_plus_adapter(unet, seed=3, inner=128, embed_dim=TINY_VISION.hidden_size) -> dict:
    """ip-adapter-faceid-plusv2_sdxl's layout (ProjPlusModel): 4 id tokens as wide as the text tokens, a depth-4
    FacePerceiverResampler over the image encoder's hidden states whose attention is `inner` wide (2 of the
    64-wide heads diffusers assumes)."""
    g, w = torch.Generator().manual_seed(seed), unet.config.cross_attention_dim
    r = "perceiver_resampler."
    proj = {
        "proj.0.weight": _normal(g, 2 * ID, ID),
        "proj.0.bias": _normal(g, 2 * ID),
        "proj.2.weight": _normal(g, 4 * w, 2 * ID),
        "proj.2.bias": _normal(g, 4 * w),
        **_norm(g, w, "norm."),
        r + "proj_in.weight": _normal(g, w, embed_dim),
        r + "proj_in.bias": _normal(g, w),
        r + "proj_out.weight": _normal(g, w, w),
        r + "proj_out.bias": _normal(g, w),
        **_norm(g, w, r + "norm_out."),
    }
    proj |= resampler_blocks(g, w, inner, r)
    return {"image_proj": proj, "ip_adapter": _ip_layers(unet, g) | _lora(unet, g)}


@pytest.fixture(scope="module")
def files(tiny_base, tmp_path_factory):
    """A folder laid out like h94/IP-Adapter-FaceID (the adapters at its root) plus an image encoder under
    models/image_encoder, and the session's tiny diffusers pipeline (never changed here)."""
    pipe, _ = tiny_base
    root = tmp_path_factory.mktemp("faceid")
    torch.save(faceid_adapter(pipe.unet), root / FACEID)
    save_safetensors(flat_ip_adapter(faceid_adapter(pipe.unet)), root / FACEID_ST)
    torch.save(faceid_plus_adapter(pipe.unet), root / PLUS)
    vision = transformers.CLIPVisionModelWithProjection(hf_vision_config(TINY_VISION))
    vision.load_state_dict(random_state_dict(vision, 7))
    vision.eval().save_pretrained(root / "models" / "image_encoder")
    return root, pipe


def _fresh(files):
    """(a diffusers pipeline with its own UNet, a minsdxl model on the same tensors), nothing loaded."""
    root, pipe = files
    pipe = type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})
    pipe.set_progress_bar_config(disable=True)
    return pipe, minsdxl_from_pipe(pipe)


def _load(files, pipe, model, weight_name, encoder=None):
    root = files[0]
    pipe.load_ip_adapter(str(root), subfolder=None, weight_name=weight_name, image_encoder_folder=encoder)
    minsdxl.load_ip_adapter(model, root, weight_name=weight_name, image_encoder_folder=encoder)


def _faces(seed, rows, faces=1):
    """insightface-like embeddings: unit vectors [rows, faces, 512] (rows: [zeros, face] under guidance)."""
    e = torch.randn(1, faces, ID, generator=torch.Generator().manual_seed(seed))
    e = e / e.norm(dim=-1, keepdim=True)
    return torch.cat([torch.zeros_like(e), e]) if rows == 2 else e


def _latents(pipe, model, **kw):
    kw = dict(prompt="a face", num_inference_steps=2, height=64, width=64, output_type="latent") | kw
    ref = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    got = minsdxl.text2img(model, **kw, generator=torch.Generator().manual_seed(0), progress=False)
    return ref, got


BATCH = dict(prompt=["a face", "a portrait"], num_images_per_prompt=2)  # 4 images


def _proj_keys(sd):
    return {k for k in sd if k.startswith("encoder_hid_proj.") or ".processor.to_" in k}


def test_faceid_matches_diffusers(files):
    pipe, model = _fresh(files)
    _load(files, pipe, model, FACEID)
    assert minsdxl.get_active_adapters(model) == pipe.get_active_adapters() == ["faceid_0"]
    pipe.set_ip_adapter_scale(0.7)
    minsdxl.set_ip_adapter_scale(model, 0.7)
    faces = _faces(0, 2, faces=2)  # two pictures of one face, as diffusers' FaceID example stacks them
    for cfg, embeds in ((5.0, faces), (1.0, faces[1:])):
        ref, got = _latents(pipe, model, **BATCH, guidance_scale=cfg, ip_adapter_image_embeds=[embeds])
        assert got.shape == (4, 4, 8, 8) and rel_err(got, ref) <= TOL, cfg
    # the projection and image k/v are diffusers' (keys and values)
    ours, theirs = model.unet.state_dict(), pipe.unet.state_dict()
    assert _proj_keys(ours) == _proj_keys(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in _proj_keys(theirs))
    # the LoRA counts (so the comparison above sees it): the UNet without it gives another result
    g = torch.Generator().manual_seed(1)
    x, ctx, te = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 48, generator=g), torch.randn(1, 32)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])
    with_lora = model.unet(x, 500, ctx, te, ids, image_embeds=[faces[1:]])
    minsdxl.disable_lora(model)
    assert rel_err(model.unet(x, 500, ctx, te, ids, image_embeds=[faces[1:]]), with_lora) > 1e-3
    minsdxl.enable_lora(model)
    # the flat .safetensors (image_proj.* / ip_adapter.* keys) loads the same weights
    _, other = _fresh(files)
    minsdxl.load_ip_adapter(other, files[0], weight_name=FACEID_ST, image_encoder_folder=None)
    theirs = other.unet.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.unet.state_dict().items())


def test_faceid_plus_v2_matches_diffusers(files):
    """clip_embeds from the image encoder as diffusers' prepare_ip_adapter_image_embeds makes them (one row per
    UNet batch row: pass prompts x num_images_per_prompt), shortcut on (Plus v2)."""
    pipe, model = _fresh(files)
    _load(files, pipe, model, PLUS, encoder="models/image_encoder")
    face = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8))
    clip = pipe.prepare_ip_adapter_image_embeds([face], None, "cpu", 4, True)[0]
    ours = minsdxl.ip_adapter.image_embeds(model, [face], None, 2, True, 4, "cpu")[0]
    assert clip.shape == ours.shape == (8, 1, 65, TINY_VISION.hidden_size) and rel_err(ours, clip) <= 1e-5
    (theirs,) = pipe.unet.encoder_hid_proj.image_projection_layers
    (mine,) = model.unet.encoder_hid_proj.image_projection_layers
    faces = _faces(1, 2)
    # the projection alone, rows all different, with and without the shortcut
    rows = torch.randn(6, 1, 65, TINY_VISION.hidden_size, generator=torch.Generator().manual_seed(2))
    ids = torch.randn(6, 1, ID, generator=torch.Generator().manual_seed(3))
    outs = []
    for shortcut in (False, True):
        for layer in (theirs, mine):
            layer.clip_embeds, layer.shortcut, layer.shortcut_scale = rows, shortcut, 0.8
        outs.append(model.unet.encoder_hid_proj([ids])[0])
        assert rel_err(outs[-1], pipe.unet.encoder_hid_proj([ids])[0]) <= 1e-6
    assert rel_err(outs[0], outs[1]) > 1e-2
    theirs.clip_embeds, mine.clip_embeds = clip, ours
    ref, got = _latents(pipe, model, **BATCH, ip_adapter_image_embeds=[faces])
    assert rel_err(got, ref) <= TOL
    ours, theirs = model.unet.state_dict(), pipe.unet.state_dict()
    assert _proj_keys(ours) == _proj_keys(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in _proj_keys(theirs))
    # a face image cannot drive it (insightface makes the embedding), even with the image encoder loaded
    with pytest.raises(ValueError, match=rf"FaceID adapter.*ip_adapter_image_embeds.*\[2, faces, {ID}\]"):
        minsdxl.text2img(model, "a face", ip_adapter_image=face, num_inference_steps=1)
    with pytest.raises(ValueError, match="one row per row of the UNet batch"):
        minsdxl.text2img(model, "a face", ip_adapter_image_embeds=[faces], num_inference_steps=1, progress=False)
    mine.clip_embeds = None
    with pytest.raises(ValueError, match=r"image_projection_layers\[0\]\.clip_embeds"):
        minsdxl.text2img(model, "a face", ip_adapter_image_embeds=[faces], num_inference_steps=1)


def test_other_loras_follow_diffusers_and_come_back_on_unload(files):
    """diffusers' load_ip_adapter ends with set_adapters(["faceid_0"], [1.0]): LoRAs loaded before are off
    until set_adapters names them too. unload_ip_adapter (unlike diffusers') removes the FaceID LoRA and turns
    the ones active before back on, with their weights: the UNet's weights are bit for bit those before."""
    pipe, model = _fresh(files)
    layers = _unet_layers(model)
    names, weights = ["style", "detail"], [0.8, 0.6]
    for name, only, seed in (("style", "attn", 4), ("detail", "ff.net", 5)):  # overlapping FaceID's layers, or not
        lora = peft_lora(random_lora_pairs([x for x in layers if only in x[1]], seed=seed))
        pipe.load_lora_weights(dict(lora), adapter_name=name)
        minsdxl.load_lora_weights(model, lora, adapter_name=name)
    pipe.set_adapters(names, weights)
    minsdxl.set_adapters(model, names, weights)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    _load(files, pipe, model, FACEID)
    assert minsdxl.get_active_adapters(model) == pipe.get_active_adapters() == ["faceid_0"]
    faces = _faces(5, 2)
    ref, got = _latents(pipe, model, ip_adapter_image_embeds=[faces])
    assert rel_err(got, ref) <= TOL
    pipe.set_adapters([*names, "faceid_0"], [0.5, 0.6, 1.0])
    minsdxl.set_adapters(model, [*names, "faceid_0"], [0.5, 0.6, 1.0])
    ref2, got = _latents(pipe, model, ip_adapter_image_embeds=[faces])
    assert rel_err(got, ref2) <= TOL and rel_err(ref2, ref) > 1e-3

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "the active LoRA adapter was deleted" fallback
        # the active set was changed since loading: unloading leaves it, less the FaceID LoRA
        minsdxl.unload_ip_adapter(model)
        assert minsdxl.get_active_adapters(model) == names == list(model.lora.adapters)
        assert model.lora.adapters["style"].weight == 0.5
        minsdxl.set_adapters(model, names, weights)
        _same(model, before)
        # untouched since loading: both come back as they were
        minsdxl.load_ip_adapter(model, files[0], weight_name=FACEID, image_encoder_folder=None)
        assert minsdxl.get_active_adapters(model) == ["faceid_0"]
        minsdxl.unload_ip_adapter(model)
    assert minsdxl.get_active_adapters(model) == names
    assert [a.weight for a in model.lora.adapters.values()] == weights
    _same(model, before)


def _same(model, weights):
    """The UNet's weights are these, bit for bit (and no other keys)."""
    sd = model.unet.state_dict()
    assert set(sd) == set(weights)
    for k, v in weights.items():
        assert torch.equal(sd[k], v), k


def _unet_layers(model):
    return [x for x in lora_layers(model) if x[0] == "unet"]


def test_unload_and_reload_are_exact(files):
    pipe, model = _fresh(files)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    minsdxl.load_ip_adapter(model, files[0], weight_name=FACEID, image_encoder_folder=None)
    loaded = {k: v.clone() for k, v in model.unet.state_dict().items()}
    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(loaded[q], before[q])  # the LoRA is merged
    # loading again replaces the adapter and its LoRA: the same weights, one LoRA
    minsdxl.load_ip_adapter(model, files[0], weight_name=FACEID_ST, image_encoder_folder=None)
    assert list(model.lora.adapters) == ["faceid_0"]
    _same(model, loaded)
    minsdxl.unload_ip_adapter(model)
    _same(model, before)
    assert not model.lora.adapters and model.unet.encoder_hid_proj is None
    # a plain adapter after a FaceID one: the FaceID LoRA goes with it
    minsdxl.load_ip_adapter(model, files[0], weight_name=FACEID, image_encoder_folder=None)
    plain = faceid_adapter(pipe.unet)
    plain["ip_adapter"] = {k: v for k, v in plain["ip_adapter"].items() if "_lora." not in k}
    minsdxl.load_ip_adapter(model, plain, image_encoder_folder=None)
    assert not model.lora.adapters and torch.equal(model.unet.state_dict()[q], before[q])


def test_bad_inputs_and_files_say_what_to_do(files):
    root, pipe = files
    _, model = _fresh(files)
    minsdxl.load_lora_weights(model, peft_lora(random_lora_pairs(_unet_layers(model)[:2])), adapter_name="faceid_0")
    with pytest.raises(ValueError, match="a LoRA named 'faceid_0' is loaded"):
        minsdxl.load_ip_adapter(model, root, weight_name=FACEID, image_encoder_folder=None)
    assert model.unet.encoder_hid_proj is None  # nothing half-loaded
    minsdxl.delete_adapters(model, "faceid_0")
    far = faceid_adapter(pipe.unet)
    far["ip_adapter"]["99.to_q_lora.down.weight"] = far["ip_adapter"]["0.to_q_lora.down.weight"]
    with pytest.raises(CheckpointError, match="LoRA weights for attention layer 99 but this UNet has 34"):
        minsdxl.load_ip_adapter(model, far, image_encoder_folder=None)
    broken = faceid_adapter(pipe.unet)
    del broken["image_proj"]["proj.2.weight"]
    with pytest.raises(CheckpointError, match=r"FaceID file but its image_proj has no \['proj.2.weight'\]"):
        minsdxl.load_ip_adapter(model, broken, image_encoder_folder=None)
    assert model.unet.encoder_hid_proj is None and not model.lora.adapters

    minsdxl.load_ip_adapter(model, root, weight_name=FACEID, image_encoder_folder=None)
    kw = dict(num_inference_steps=1, height=64, width=64, output_type="latent", progress=False)
    face_image = PIL.Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match=rf"FaceID adapter.*ip_adapter_image_embeds=.*\[2, faces, {ID}\]"):
        minsdxl.text2img(model, "a face", ip_adapter_image=face_image, **kw)
    with pytest.raises(ValueError, match=rf"has shape \(2, 1, 24\).*\[rows, faces, {ID}\]"):
        minsdxl.text2img(model, "a face", ip_adapter_image_embeds=[torch.zeros(2, 1, 24)], **kw)
