"""IP-Adapter parity with diffusers' load_ip_adapter / IPAdapterAttnProcessor2_0 on tiny random weights.

Adapter files are written here in the original IP-Adapter layout (what h94/IP-Adapter ships and
diffusers converts on load): `image_proj.*` + `ip_adapter.{1,3,5,...}.to_{k,v}_ip.weight`, the plain
kind (ImageProjection, 4 tokens) as flat .safetensors, the Plus kind (perceiver resampler over the image
encoder's penultimate hidden states) as the original nested .bin. Both libraries read the same files.
Bounds: latents within 1e-4 relative as in test_pipelines (fp32, a few steps, association order).
"""

import copy
import warnings

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from sdxl_testing import (
    TINY_UNET,
    TINY_VISION,
    flat_ip_adapter,
    hf_vision_config,
    minsdxl_from_pipe,
    plain_adapter,
    plus_adapter,
    random_state_dict,
    rel_err,
    tiny_pipeline,
)

import minsdxl
from minsdxl.checkpoint import CheckpointError, save_safetensors

TOL = 1e-4
CROSS = TINY_UNET.cross_attention_dim  # the image tokens' width = the text tokens'


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A folder laid out like h94/IP-Adapter: sdxl_models/{ip-adapter_tiny.safetensors,
    ip-adapter-plus_tiny.bin, image_encoder/}, and a diffusers pipeline that has loaded nothing."""
    root = tmp_path_factory.mktemp("ip_adapter")
    pipe = tiny_pipeline("base", root / "tokenizers")
    vision = transformers.CLIPVisionModelWithProjection(hf_vision_config(TINY_VISION))
    vision.load_state_dict(random_state_dict(vision, 7))
    vision.eval().save_pretrained(root / "sdxl_models" / "image_encoder")
    save_safetensors(flat_ip_adapter(plain_adapter(pipe.unet)), root / "sdxl_models" / "ip-adapter_tiny.safetensors")
    torch.save(plus_adapter(pipe.unet), root / "sdxl_models" / "ip-adapter-plus_tiny.bin")
    return root, pipe


PLAIN, PLUS = "ip-adapter_tiny.safetensors", "ip-adapter-plus_tiny.bin"


def _both(repo, weight_name):
    """(a fresh diffusers pipeline, a minsdxl model on the same weights), both with the adapter(s) loaded."""
    root, pipe = repo
    pipe = type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})
    pipe.set_progress_bar_config(disable=True)
    model = minsdxl_from_pipe(pipe)
    pipe.load_ip_adapter(str(root), subfolder="sdxl_models", weight_name=weight_name)
    minsdxl.load_ip_adapter(model, root, subfolder="sdxl_models", weight_name=weight_name)
    return pipe, model


def _image(seed, size=(40, 29)):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


def _latents(pipe, model, fn=None, **kw):
    size = {} if fn is minsdxl.img2img else dict(height=64, width=64)  # img2img takes the image's size
    kw = dict(prompt="a cat", num_inference_steps=3, **(size | kw))
    ref = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="latent").images
    got = (fn or minsdxl.text2img)(
        model, **kw, generator=torch.Generator().manual_seed(0), output_type="latent", progress=False
    )
    return ref, got


@pytest.mark.parametrize("weight_name", [PLAIN, PLUS])
def test_text2img_with_an_image_prompt_matches_diffusers(repo, weight_name):
    pipe, model = _both(repo, weight_name)
    ref, got = _latents(pipe, model, ip_adapter_image=_image(0))
    assert rel_err(got, ref) <= TOL
    # the image prompt changes the result (the adapter is not a no-op)
    plain = minsdxl.text2img(
        model, "a cat", num_inference_steps=3, height=64, width=64, seed=0, output_type="latent", progress=False
    )
    assert rel_err(plain, ref) > 1e-2
    # the UNet's keys after loading are diffusers' (encoder_hid_proj.*, attn2.processor.to_k_ip.0.*)
    assert set(model.unet.state_dict()) == set(pipe.unet.state_dict())


def test_image_prompt_with_a_controlnet_matches_diffusers(repo, tmp_path):
    """IP-Adapter and ControlNet together (= StableDiffusionXLControlNetPipeline with load_ip_adapter): the
    image prompt reaches the UNet only, the ControlNet sees the text prompt."""
    root, pristine = repo
    net = diffusers.ControlNetModel.from_unet(pristine.unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    net.load_state_dict(random_state_dict(net, 5))
    net.eval().save_pretrained(tmp_path / "controlnet")
    pipe, model = _both(repo, PLUS)
    cpipe = diffusers.StableDiffusionXLControlNetPipeline(**pipe.components, controlnet=net)
    cpipe.set_progress_bar_config(disable=True)
    control = _image(5, (64, 64))
    ref, got = _latents(
        cpipe,
        model,
        lambda m, **kw: minsdxl.text2img(m, **kw, controlnet=minsdxl.load_controlnet(tmp_path / "controlnet")),
        ip_adapter_image=_image(0),
        image=control,
        guess_mode=True,
    )
    assert rel_err(got, ref) <= TOL


def test_image_prompt_with_perturbed_attention_guidance_matches_diffusers(repo):
    # = StableDiffusionXLPAGPipeline with load_ip_adapter: the image embeds [negative, positive, positive]
    pipe, model = _both(repo, PLAIN)
    ppipe = diffusers.StableDiffusionXLPAGPipeline(**pipe.components, pag_applied_layers="mid")
    ppipe.set_progress_bar_config(disable=True)
    ref, got = _latents(ppipe, model, ip_adapter_image=_image(0), pag_scale=3.0)
    assert rel_err(got, ref) <= TOL


def test_loaded_modules_follow_diffusers_layout(repo):
    pipe, model = _both(repo, PLUS)
    ours, theirs = model.unet.state_dict(), pipe.unet.state_dict()
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
    assert model.image_encoder is not None and model.image_encoder.config.image_size == 32


def _embeds(seed, shape):
    """Precomputed CFG-ordered image embeddings [negative, positive] as diffusers' ip_adapter_image_embeds."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_two_adapters_with_per_adapter_and_instantstyle_scales_match_diffusers(repo):
    pipe, model = _both(repo, [PLAIN, PLUS])
    images = [_image(1), [_image(2), _image(3, (32, 32))]]  # the second adapter gets two images
    style = {"up": {"block_0": [0.0, 1.0, 0.0]}}  # InstantStyle's "style only"
    for scale in ([0.7, 0.4], [style, style], [{"down": {"block_2": [0.0, 1.0]}, "mid": 0.5}, 0.8]):
        pipe.set_ip_adapter_scale(scale)
        minsdxl.set_ip_adapter_scale(model, scale)
        ref, got = _latents(pipe, model, ip_adapter_image=images)
        assert rel_err(got, ref) <= TOL, scale


def test_scale_zero_is_the_text_only_result(repo):
    """diffusers skips an adapter at scale 0; the result is then exactly the model without the adapter
    (and force_zeros_for_empty_prompt's all-zero negative rows are computed, not skipped, with an image)."""
    pipe, model = _both(repo, PLAIN)
    minsdxl.set_ip_adapter_scale(model, 0.0)
    kw = dict(num_inference_steps=2, height=64, width=64, seed=0, output_type="latent", progress=False)
    with_zero = minsdxl.text2img(model, "a cat", ip_adapter_image=_image(0), **kw)
    minsdxl.unload_ip_adapter(model)
    assert model.image_encoder is None and model.unet.encoder_hid_proj is None
    assert set(model.unet.state_dict()) == set(minsdxl_from_pipe(repo[1]).unet.state_dict())
    assert torch.equal(with_zero, minsdxl.text2img(model, "a cat", **kw))


def test_ip_adapter_scale_cutoff_callback_matches_diffusers(repo):
    """diffusers' IPAdapterScaleCutoffCallback calls pipeline.set_ip_adapter_scale(0.0) mid-run: the image
    prompt's projected k, v (projected once per run) are projected again with the new scale."""
    from diffusers.callbacks import IPAdapterScaleCutoffCallback

    pipe, model = _both(repo, PLAIN)
    cutoff = IPAdapterScaleCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1)
    ref, got = _latents(pipe, model, ip_adapter_image=_image(0), callback_on_step_end=cutoff)
    assert rel_err(got, ref) <= TOL
    minsdxl.set_ip_adapter_scale(model, 1.0)
    assert rel_err(got, _latents(pipe, model, ip_adapter_image=_image(0))[1]) > 1e-3  # the cut took effect


@pytest.mark.parametrize("fn", ["img2img", "inpaint"])
def test_img2img_and_inpaint_take_image_prompts_like_diffusers(repo, fn):
    root, base = repo
    pipe, model = _both(repo, PLUS)
    cls = diffusers.StableDiffusionXLImg2ImgPipeline if fn == "img2img" else diffusers.StableDiffusionXLInpaintPipeline
    pipe = cls(**pipe.components)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(image=_image(4, (64, 64)), strength=0.7, ip_adapter_image_embeds=[_embeds(5, (2, 1, 65, 32))])
    if fn == "inpaint":
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 8:40] = 255
        kw["mask_image"] = PIL.Image.fromarray(mask)
    ref, got = _latents(pipe, model, getattr(minsdxl, fn), **kw)
    assert rel_err(got, ref) <= TOL


def test_several_images_per_prompt_match_diffusers(repo):
    pipe, model = _both(repo, PLAIN)
    ref, got = _latents(pipe, model, ip_adapter_image=_image(6), num_images_per_prompt=2)
    assert got.shape[0] == 2 and rel_err(got, ref) <= TOL


def test_one_image_prompt_spreads_over_several_text_prompts(repo):
    """One image prompt over several text prompts: each prompt sees the whole image prompt, the batch equals
    each prompt run alone (same starting latents), and diffusers' batch is ours (diffusers makes
    num_images_per_prompt rows of image embeddings whatever the number of prompts; its attention spreads
    them: measured equal to the prompts run alone, 9.7e-7)."""
    pipe, model = _both(repo, PLAIN)
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="latent", progress=False)
    kw["ip_adapter_image_embeds"] = [_embeds(8, (2, 1, 24))]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    both = minsdxl.text2img(model, ["a cat", "a dog"], latents=latents, **kw)
    for i, prompt in enumerate(["a cat", "a dog"]):
        alone = minsdxl.text2img(model, prompt, latents=latents[i : i + 1], **kw)
        assert rel_err(both[i : i + 1], alone) <= 1e-5
    kw = {k: v for k, v in kw.items() if k != "progress"}
    assert rel_err(both, pipe(["a cat", "a dog"], latents=latents.clone(), **kw).images) <= 1e-5


def test_unet_forward_takes_image_embeds_like_diffusers(repo):
    pipe, model = _both(repo, [PLAIN, PLUS])
    g = torch.Generator().manual_seed(10)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, CROSS, generator=g)
    te, ids = torch.randn(2, 32, generator=g), torch.randn(2, 6, generator=g).abs() * 100
    embeds = [torch.randn(2, 1, 24, generator=g), torch.randn(2, 2, 65, 32, generator=g)]
    cond = {"text_embeds": te, "time_ids": ids, "image_embeds": embeds}
    ref = pipe.unet(x, 500, ctx, added_cond_kwargs=cond).sample
    assert rel_err(model.unet(x, 500, ctx, te, ids, image_embeds=embeds), ref) <= 1e-5
    # the sampler's path: projected once (prompt and image tokens), then reused every step
    assert rel_err(model.unet(x, 500, model.unet.project_context(ctx, embeds), te, ids), ref) <= 1e-5
    # torch.compile(fullgraph=True) traces the image attention (no graph break)
    compiled = torch.compile(model.unet, backend="eager", fullgraph=True)
    assert rel_err(compiled(x, 500, model.unet.project_context(ctx, embeds), te, ids), ref) <= 1e-5


def test_bad_inputs_and_files_say_what_to_do(repo, tmp_path):
    root, pipe = repo
    model = minsdxl_from_pipe(pipe)
    kw = dict(num_inference_steps=1, height=64, width=64, output_type="latent", progress=False)
    with pytest.raises(ValueError, match="load_ip_adapter"):
        minsdxl.text2img(model, "a cat", ip_adapter_image=_image(0), **kw)
    with pytest.raises(ValueError, match="no IP-Adapter is loaded"):
        minsdxl.set_ip_adapter_scale(model, 0.5)
    with pytest.raises(CheckpointError, match="no IP-Adapter file"):
        minsdxl.load_ip_adapter(model, root, subfolder="sdxl_models", weight_name="missing.safetensors")
    with pytest.raises(ValueError, match="pass weight_name"):
        minsdxl.load_ip_adapter(model, root, subfolder="sdxl_models")
    # an SD 1.5 adapter: 16 cross-attention layers of 768-wide tokens
    sd15 = plain_adapter(pipe.unet)
    sd15["ip_adapter"] = dict(list(sd15["ip_adapter"].items())[:32])
    with pytest.raises(CheckpointError, match="16 cross-attention layers .* this UNet has 17"):
        minsdxl.load_ip_adapter(model, sd15, image_encoder_folder=None)
    wide = plain_adapter(pipe.unet)
    wide["image_proj"] = {"proj.weight": torch.zeros(4 * 768, 24), "proj.bias": torch.zeros(4 * 768)}
    wide["image_proj"] |= {"norm.weight": torch.ones(768), "norm.bias": torch.zeros(768)}
    with pytest.raises(CheckpointError, match="another model"):
        minsdxl.load_ip_adapter(model, wide, image_encoder_folder=None)
    faceid = {
        "image_proj": {"proj.0.weight": torch.zeros(2, 2), "norm.weight": torch.ones(2)},
        "ip_adapter": {"1.to_k_ip.weight": torch.zeros(1)},
    }
    with pytest.raises(CheckpointError, match="FaceID"):
        minsdxl.load_ip_adapter(model, faceid, image_encoder_folder=None)
    with pytest.raises(CheckpointError, match="not an IP-Adapter file"):
        minsdxl.load_ip_adapter(model, {"unet.weight": torch.zeros(1)}, image_encoder_folder=None)
    # an adapter whose projection reads another encoder's width (ip-adapter_sdxl with the ViT-H encoder)
    save_safetensors(flat_ip_adapter(plain_adapter(pipe.unet, embed_dim=20)), tmp_path / "other.safetensors")
    (tmp_path / "image_encoder").symlink_to(root / "sdxl_models" / "image_encoder")
    with pytest.raises(CheckpointError, match="reads 20-wide image features but the image encoder gives 24"):
        minsdxl.load_ip_adapter(model, tmp_path / "other.safetensors")
    assert model.unet.encoder_hid_proj is None and model.image_encoder is None  # nothing half-loaded

    minsdxl.load_ip_adapter(model, root, subfolder="sdxl_models", weight_name=PLAIN, image_encoder_folder=None)
    with pytest.raises(ValueError, match="unload_ip_adapter"):
        minsdxl.checkpoint.save(model, tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    with pytest.raises(ValueError, match="no image encoder is loaded"):
        minsdxl.text2img(model, "a cat", ip_adapter_image=_image(0), **kw)
    with pytest.raises(ValueError, match="either ip_adapter_image= or ip_adapter_image_embeds="):
        minsdxl.text2img(
            model, "a cat", ip_adapter_image=_image(0), ip_adapter_image_embeds=[_embeds(0, (2, 1, 24))], **kw
        )
    with pytest.raises(ValueError, match="2 entries for 1 loaded IP-Adapters"):
        minsdxl.text2img(model, "a cat", ip_adapter_image_embeds=[_embeds(0, (2, 1, 24))] * 2, **kw)
    with pytest.raises(ValueError, match="3D or 4D"):
        minsdxl.text2img(model, "a cat", ip_adapter_image_embeds=[torch.zeros(2, 24)], **kw)
    with pytest.raises(ValueError, match="block_0"):
        minsdxl.set_ip_adapter_scale(model, {"down": {"block_0": 1.0}})
    with pytest.raises(ValueError, match="up.block_0 has 3 attentions"):
        minsdxl.set_ip_adapter_scale(model, {"up": {"block_0": [1.0, 0.0]}})
    with pytest.raises(ValueError, match="2 scales for 1 loaded"):
        minsdxl.set_ip_adapter_scale(model, [0.5, 0.5])


def test_full_size_ip_adapter_plus_matches_diffusers():
    """SDXL base's real UNet (70 cross-attentions, 2048-wide text tokens) with an adapter of
    ip-adapter-plus_sdxl_vit-h's shapes: ViT-H's 1280-wide hidden states (257 tokens) into a 1280-wide,
    20-head resampler, 16 image tokens. One CFG-batch UNet call at a 16x16 latent; weights shared."""
    import gc

    from sdxl_testing import diffusers_unet_config

    from minsdxl.checkpoint import SDXL, build_unet
    from minsdxl.config import UNET_PRESETS

    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**diffusers_unet_config(UNET_PRESETS["base"]))
    ref.load_state_dict(random_state_dict(ref, 0), strict=True, assign=True)
    ref.eval()
    model = SDXL(unet=build_unet(ref.state_dict()))
    sd = plus_adapter(ref, width=1280, embed_dim=1280)
    assert len(sd["ip_adapter"]) == 2 * 70
    ref._load_ip_adapter_weights([sd])
    minsdxl.load_ip_adapter(model, sd, image_encoder_folder=None)
    g = torch.Generator().manual_seed(11)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 2048, generator=g)
    te, ids = torch.randn(2, 1280, generator=g), torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)
    embeds = [torch.randn(2, 1, 257, 1280, generator=g)]
    want = ref(x, 700, ctx, added_cond_kwargs={"text_embeds": te, "time_ids": ids, "image_embeds": embeds}).sample
    got = model.unet(x, 700, ctx, te, ids, image_embeds=embeds)
    assert rel_err(got, want) <= 1e-5
    plain = model.unet(x, 700, ctx, te, ids)
    assert rel_err(plain, want) > 1e-3  # the image tokens matter
    del ref, model, sd
    gc.collect()


def test_model_offload_moves_the_image_encoder_while_it_runs(repo):
    """load(offload=True): the image encoder waits on the CPU like the other components and visits the
    device once per call (here "cpu:0", to tell the move apart); the result is unchanged."""
    _, model = _both(repo, PLUS)
    kw = dict(prompt="a cat", num_inference_steps=2, height=64, width=64, seed=0, output_type="latent", progress=False)
    want = minsdxl.text2img(model, ip_adapter_image=_image(12), **kw)
    model.offload_device = "cpu:0"
    moves, real_to = [], model.image_encoder.to
    model.image_encoder.to = lambda *a, **k: moves.append(str(a[0])) or real_to(*a, **k)
    got = minsdxl.text2img(model, ip_adapter_image=_image(12), **kw)
    assert moves == ["cpu:0"] and model.image_encoder.device == torch.device("cpu")
    assert rel_err(got, want) <= 1e-5  # the move copies weights into new buffers: last-bit changes at most


def _region_masks(height, width):
    """Two image prompts' regions: the left and the right part (overlapping), as PIL masks."""
    left, right = np.zeros((height, width), np.uint8), np.zeros((height, width), np.uint8)
    left[:, : width * 5 // 8] = 255
    right[:, width * 3 // 8 :] = 255
    return [PIL.Image.fromarray(left), PIL.Image.fromarray(right)]


@pytest.mark.parametrize("weight_name", [PLAIN, PLUS])
def test_masked_image_prompts_match_diffusers(repo, weight_name):
    """cross_attention_kwargs={"ip_adapter_masks": ...} (diffusers' regional IP-Adapter): each image of
    an adapter attends separately and counts only inside its region, with its own scale. Masks made by
    preprocess_masks = IPAdapterMaskProcessor().preprocess; an 80x32 image with square masks takes
    diffusers' pad / cut path (with its warning)."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    pipe, model = _both(repo, weight_name)
    pipe.set_ip_adapter_scale([[0.7, 0.4]])
    minsdxl.set_ip_adapter_scale(model, [[0.7, 0.4]])
    images = [[_image(13), _image(14, (32, 32))]]
    for h, w, masks in ((64, 64, _region_masks(64, 64)), (32, 80, _region_masks(64, 64))):
        ref_masks = IPAdapterMaskProcessor().preprocess(masks, height=64, width=64)
        ours = minsdxl.ip_adapter.preprocess_masks(masks, 64, 64)
        assert torch.equal(ours, ref_masks)
        kw = dict(ip_adapter_image=images, cross_attention_kwargs={"ip_adapter_masks": [ours.reshape(1, 2, 64, 64)]})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ref, got = _latents(pipe, model, **kw, height=h, width=w)
        assert rel_err(got, ref) <= TOL
        assert any("aspect ratio of the mask" in str(c.message) for c in caught) == (h != w)
    with pytest.raises(ValueError, match="one scale per image .* needs a region per image"):
        minsdxl.text2img(model, "a cat", ip_adapter_image=images, num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"ip_adapter_masks\[0\] has 1 masks for 2 images"):
        one = {"ip_adapter_masks": [ours[:1].reshape(1, 1, 64, 64)]}
        minsdxl.text2img(model, "a cat", ip_adapter_image=images, cross_attention_kwargs=one, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"\[1, images, height, width\] tensor"):
        flat = {"ip_adapter_masks": [ours]}  # [2, 1, H, W]: not reshaped to one adapter's [1, 2, H, W]
        minsdxl.text2img(model, "a cat", ip_adapter_image=images, cross_attention_kwargs=flat, num_inference_steps=1)
