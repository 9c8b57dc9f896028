"""Test helpers: the same random weights in minsdxl and diffusers, diffusers configs for our
dataclass configs, tiny SDXL-topology presets. Imports diffusers: tests only."""

from dataclasses import replace

import diffusers
import torch

from minsdxl.checkpoint import diffusers_to_sgm, text_config_json, unet_config_json, vae_config_json
from minsdxl.config import TEXT_PRESETS, TextConfig, UNetConfig, VAEConfig, VisionConfig

TINY_UNET = UNetConfig(
    block_out_channels=(32, 64, 64),
    transformer_layers=(0, 1, 2),
    mid_transformer_layers=2,
    attention_head_dim=8,
    cross_attention_dim=48,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
    norm_num_groups=8,
    sample_size=16,
)
TINY_REFINER = replace(
    TINY_UNET,
    block_out_channels=(32, 64, 64, 64),
    transformer_layers=(0, 1, 1, 0),
    mid_transformer_layers=1,
    cross_attention_dim=32,
    projection_class_embeddings_input_dim=32 + 5 * 8,
)


def pooled_dim(cfg: UNetConfig) -> int:
    """Width of the pooled text embedding the UNet expects: bigG's 1280, or 32 in the tiny configs."""
    return 1280 if cfg.addition_time_embed_dim == 256 else 32


# a tiny CLIP vision tower (IP-Adapter's image encoder): 8x8 patches of 4 px, 65 tokens, projection 24
TINY_VISION = VisionConfig(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=48,
    image_size=32,
    patch_size=4,
    projection_dim=24,
)


def hf_vision_config(cfg: VisionConfig):
    """transformers' CLIPVisionConfig for one of our VisionConfigs (the field names are the same)."""
    import dataclasses

    import transformers

    return transformers.CLIPVisionConfig(**dataclasses.asdict(cfg))


TINY_VAE = VAEConfig(block_out_channels=(8, 16, 32, 32), norm_num_groups=4, sample_size=64)


def diffusers_unet_config(cfg: UNetConfig) -> dict:
    """The diffusers UNet2DConditionModel kwargs for one of our configs (= unet/config.json, minsdxl's writer)."""
    return {k: v for k, v in unet_config_json(cfg).items() if not k.startswith("_")}


def diffusers_vae_config(cfg: VAEConfig) -> dict:
    return {k: v for k, v in vae_config_json(cfg).items() if not k.startswith("_")}


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter in place with `random_state_dict`'s values."""
    module.load_state_dict(random_state_dict(module, seed))
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the parity measure the issues use."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def random_state_dict(model: torch.nn.Module, seed: int = 0, dtype=torch.float32, device="cpu") -> dict:
    """Seeded random weights for every parameter of a (possibly meta-device) model, without its slow
    default init. They keep activations O(1) through deep stacks: fan-in scaled normals for
    weights, small random biases, norm scales near 1 (random, so a misplaced norm shows)."""
    g = torch.Generator(device).manual_seed(seed)
    out = {}
    for name, p in model.state_dict().items():
        if not p.is_floating_point():  # e.g. position_ids buffers
            out[name] = torch.arange(p.shape[-1], device=device).expand(p.shape) if p.is_meta else p
            continue
        t = torch.randn(p.shape, generator=g, device=device)
        if p.ndim == 1:
            t = t.mul_(0.1).add_(1.0 if ("norm" in name and name.endswith("weight")) else 0.0)
        else:
            t = t.mul_((1.0 / p[0].numel()) ** 0.5)
        out[name] = t.to(dtype)
    return out


def meta_diffusers(cls, config: dict, state_dict: dict):
    """A diffusers model whose parameters ARE the given tensors (assign=True): no second copy."""
    with torch.device("meta"):
        m = cls(**config)
    m.load_state_dict(state_dict, strict=True, assign=True)
    return m.eval().requires_grad_(False)


def hf_config(cfg: TextConfig):
    """transformers' CLIPTextConfig for one of our TextConfigs."""
    import transformers

    # SDXL's text_encoder(_2)/config.json values (eos_token_id=2: transformers pools at input_ids.argmax(-1),
    # the position open_clip/sgm use), as minsdxl.checkpoint.save writes them
    kw = {k: v for k, v in text_config_json(cfg).items() if k not in ("architectures", "model_type")}
    return transformers.CLIPTextConfig(**(kw | {"projection_dim": cfg.projection_dim or 768}))


# ---- tiny SDXL-topology pipelines (diffusers + transformers), saved as diffusers folders ----
TINY_CLIP_L = dict(
    hidden_size=16,
    intermediate_size=37,
    num_attention_heads=2,
    num_hidden_layers=10,
    hidden_act="quick_gelu",
    projection_dim=16,
)
# >= 10 layers: diffusers' single-file loader recognises bigG by `resblocks.9`
TINY_BIGG = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=10,
    hidden_act="gelu",
    projection_dim=32,
)
SDXL_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=1,
    interpolation_type="linear",
    use_karras_sigmas=False,
)
TINY_INPAINT = replace(TINY_UNET, in_channels=9)
TINY_UNETS = {"base": TINY_UNET, "refiner": TINY_REFINER, "inpaint": TINY_INPAINT}


def tiny_pipeline(kind: str, tokenizer_root, seed: int = 0):
    """A diffusers SDXL pipeline of the given kind with tiny random weights (watermarker off)."""
    import transformers
    from tokenizer_fixtures import write_sdxl_tokenizers

    tok_dir, tok2_dir = write_sdxl_tokenizers(tokenizer_root)
    cfg = TINY_UNETS[kind]
    unet = randomize_(diffusers.UNet2DConditionModel(**diffusers_unet_config(cfg)), seed)
    vae = randomize_(diffusers.AutoencoderKL(**diffusers_vae_config(TINY_VAE)), seed + 1)
    te2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TINY_BIGG))
    randomize_(te2, seed + 2)
    tok2 = transformers.CLIPTokenizer.from_pretrained(tok2_dir)
    scheduler = diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER)
    common = dict(vae=vae.eval(), text_encoder_2=te2.eval(), tokenizer_2=tok2, unet=unet.eval(), scheduler=scheduler)
    if kind == "refiner":
        return assemble_pipeline(kind, common)
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_CLIP_L))
    randomize_(te, seed + 3)
    return assemble_pipeline(kind, common, te.eval(), transformers.CLIPTokenizer.from_pretrained(tok_dir))


def assemble_pipeline(kind: str, common: dict, text_encoder=None, tokenizer=None):
    """The diffusers pipeline class and flags for a kind (watermarker off): the refiner is img2img with
    no CLIP-L, aesthetic-score conditioning and no zeroed negatives, as its model_index.json says."""
    if kind == "refiner":
        return diffusers.StableDiffusionXLImg2ImgPipeline(
            text_encoder=None,
            tokenizer=None,
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
            add_watermarker=False,
            **common,
        )
    cls = diffusers.StableDiffusionXLInpaintPipeline if kind == "inpaint" else diffusers.StableDiffusionXLPipeline
    return cls(text_encoder=text_encoder, tokenizer=tokenizer, add_watermarker=False, **common)


def component_state_dicts(pipe) -> dict:
    """{component: state dict} of a diffusers pipeline (None components left out)."""
    return {
        c: getattr(pipe, c).state_dict()
        for c in ("unet", "vae", "text_encoder", "text_encoder_2")
        if getattr(pipe, c, None) is not None
    }


def minsdxl_from_pipe(pipe):
    """A minsdxl SDXL whose weights ARE the diffusers pipeline's tensors (no copy), same dtype/device."""
    from minsdxl.checkpoint import SDXL, build_text_encoder, build_unet, build_vae
    from minsdxl.tokenizer import CLIPTokenizer

    p = next(pipe.unet.parameters())
    dtype, device = p.dtype, p.device
    te, te2 = getattr(pipe, "text_encoder", None), pipe.text_encoder_2
    model = SDXL(
        unet=build_unet(pipe.unet.state_dict(), dtype, device, dict(pipe.unet.config)),
        vae=build_vae(pipe.vae.state_dict(), next(pipe.vae.parameters()).dtype, device, dict(pipe.vae.config)),
        text_encoder_2=build_text_encoder(te2.state_dict(), True, dtype, device, te2.config.to_dict()),
        tokenizer_2=CLIPTokenizer.bundled(pad_token="!"),
        scheduler_config=dict(pipe.scheduler.config),
        force_zeros_for_empty_prompt=pipe.config.get("force_zeros_for_empty_prompt", True),
        requires_aesthetics_score=pipe.config.get("requires_aesthetics_score", False),
        # the pipeline's watermark setting (diffusers keeps it as `watermark`, None when off): PIL
        # images >= 256 wide differ by a few levels otherwise
        add_watermarker=getattr(pipe, "watermark", None) is not None,
    )
    if te is not None:
        model.text_encoder = build_text_encoder(te.state_dict(), False, dtype, device, te.config.to_dict())
        model.tokenizer = CLIPTokenizer.bundled()
    model.kind = "inpaint" if model.unet.config.in_channels == 9 else "refiner" if te is None else "base"
    return model


def full_size_pipeline(kind: str, dtype=torch.float32, device="cpu", seed: int = 0, tokenizer_root=None):
    """A diffusers SDXL pipeline at the real shapes with random weights made directly on `device`
    (no slow default init: modules are built on the meta device, then assigned)."""
    import transformers
    from tokenizer_fixtures import write_sdxl_tokenizers

    from minsdxl.config import UNET_PRESETS, VAE_PRESETS

    clip_l, big_g = hf_config(TEXT_PRESETS["clip_l"]), hf_config(TEXT_PRESETS["bigg"])
    with torch.device("meta"):
        parts = {
            "unet": diffusers.UNet2DConditionModel(**diffusers_unet_config(UNET_PRESETS[kind])),
            "vae": diffusers.AutoencoderKL(**diffusers_vae_config(VAE_PRESETS["sdxl"])),
            "text_encoder_2": transformers.CLIPTextModelWithProjection(big_g),
        }
        if kind != "refiner":
            parts["text_encoder"] = transformers.CLIPTextModel(clip_l)
    for i, m in enumerate(parts.values()):
        m.load_state_dict(random_state_dict(m, seed + i, dtype, device), strict=True, assign=True)
        for mod in m.modules():  # non-persistent buffers (CLIP's position_ids) stay on meta after assign
            for name, buf in list(mod.named_buffers(recurse=False)):
                if buf.is_meta:
                    assert name == "position_ids", f"unexpected meta buffer {name}"
                    mod.register_buffer(name, torch.arange(buf.shape[-1], device=device).expand(buf.shape), False)
        m.eval().requires_grad_(False)
    tok_dir, tok2_dir = write_sdxl_tokenizers(tokenizer_root)
    common = dict(
        vae=parts["vae"],
        text_encoder_2=parts["text_encoder_2"],
        unet=parts["unet"],
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(tok2_dir),
        scheduler=diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER),
    )
    if kind == "refiner":
        return assemble_pipeline(kind, common)
    return assemble_pipeline(kind, common, parts["text_encoder"], transformers.CLIPTokenizer.from_pretrained(tok_dir))


# ------------------------------------------------------------------------------------------------
# LoRA files in each format, random pairs for given layers (test_lora, test_cli)

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def lora_layers(model, only=None):
    """[(component, module name as diffusers/transformers spell it, weight shape)] of every Linear / Conv2d."""
    out = []
    for comp in LORA_COMPONENTS:
        m = getattr(model, comp, None)
        for name, mod in m.named_modules() if m is not None else ():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and (only is None or only(name)):
                # transformers' CLIPTextModel names start with text_model. (minsdxl's CLIP-L drops it)
                as_is = comp == "unet" or name.startswith("text_model.") or name == "text_projection"
                out.append((comp, name if as_is else f"text_model.{name}", tuple(mod.weight.shape)))
    return out


def random_lora_pairs(layers, rank=4, seed=0):
    """Random (down, up) per layer, conv LoRAs with the kernel in `down` (kohya LoCon / PEFT)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (comp, name, shape) in enumerate(layers):
        r = rank + (i % 3 == 0)  # mixed ranks: per-module scale alpha / r must be read per module
        down = torch.randn(r, shape[1], *shape[2:], generator=g) * 0.1
        up = torch.randn(shape[0], r, *(1,) * (len(shape) - 2), generator=g) * 0.1
        out[(comp, name)] = (down, up)
    return out


def _sgm_module_names(model):
    """diffusers UNet module -> its sgm name (from the checkpoint table, which test_checkpoint holds
    against diffusers' from_single_file)."""
    sd = model.unet.state_dict()
    sgm = diffusers_to_sgm({"unet": sd})
    return {
        k.removesuffix(".weight"): s.removeprefix("model.diffusion_model.").removesuffix(".weight")
        for k, s in zip(sd, sgm)
        if k.endswith(".weight")
    }


KOHYA_TE = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def kohya_lora(model, pairs, alpha=None, sgm=True) -> dict:
    names = _sgm_module_names(model) if sgm else {}
    sd = {}
    for (comp, name), (down, up) in pairs.items():
        flat = ("lora_unet_" + names.get(name, name) if comp == "unet" else KOHYA_TE[comp] + name).replace(".", "_")
        sd[f"{flat}.lora_down.weight"], sd[f"{flat}.lora_up.weight"] = down, up
        if alpha is not None:
            sd[f"{flat}.alpha"] = torch.tensor(float(alpha))
    return sd


def peft_lora(pairs) -> dict:
    sd = {}
    for (comp, name), (down, up) in pairs.items():
        sd[f"{comp}.{name}.lora_A.weight"], sd[f"{comp}.{name}.lora_B.weight"] = down, up
    return sd


def old_diffusers_lora(pairs) -> dict:
    """diffusers' pre-PEFT spellings: attention processors' to_q_lora, `.lora.` and `lora_linear_layer`."""
    sd = {}
    for (comp, name), (down, up) in pairs.items():
        stem, _, leaf = name.rpartition(".")
        if comp == "unet" and (leaf in ("to_q", "to_k", "to_v") or name.endswith("to_out.0")):
            base = name.removesuffix(".0").rpartition(".")[0]
            key = f"{comp}.{base}.processor.{'to_out' if name.endswith('.0') else leaf}_lora"
        elif comp != "unet" and leaf in ("q_proj", "k_proj", "v_proj", "out_proj"):
            key = f"{comp}.{stem}.to_{leaf.removesuffix('_proj')}_lora"
        else:
            key = f"{comp}.{name}.{'lora' if comp == 'unet' else 'lora_linear_layer'}"
        sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = down, up
    return sd


# ------------------------------------------------------------------------------------------------
# IP-Adapter files in the original layout (h94/IP-Adapter; diffusers converts them on load), random
# weights for a diffusers UNet (test_ip_adapter, test_cli)


def _normal(g, *shape):
    return torch.randn(shape, generator=g) * (shape[-1] ** -0.5 if len(shape) > 1 else 0.1)


def _norm(g, n, prefix):
    return {
        f"{prefix}weight": 1 + 0.1 * torch.randn(n, generator=g),
        f"{prefix}bias": 0.1 * torch.randn(n, generator=g),
    }


def _ip_layers(unet, g):
    """The original layout's k/v weights: diffusers numbers the cross-attentions 1, 3, 5, ... in its
    attn_processors order (read here from diffusers' UNet, independently of minsdxl's ordering)."""
    names = [k.removesuffix(".processor") for k in unet.attn_processors if k.endswith("attn2.processor")]
    cross = unet.config.cross_attention_dim
    out = {}
    for j, name in enumerate(names):
        dim = unet.get_submodule(name).to_q.out_features
        for kv in "kv":
            out[f"{2 * j + 1}.to_{kv}_ip.weight"] = _normal(g, dim, cross)
    return out


def plain_adapter(unet, seed=0, embed_dim=TINY_VISION.projection_dim):
    g, cross = torch.Generator().manual_seed(seed), unet.config.cross_attention_dim
    proj = {
        "proj.weight": _normal(g, 4 * cross, embed_dim),
        "proj.bias": _normal(g, 4 * cross),
        **_norm(g, cross, "norm."),
    }
    return {"image_proj": proj, "ip_adapter": _ip_layers(unet, g)}


def plus_adapter(unet, seed=1, width=128, embed_dim=TINY_VISION.hidden_size):
    """width: the resampler's (128 = two of the 64-wide heads diffusers assumes); embed_dim: the image
    encoder's hidden size."""
    g, w, cross = torch.Generator().manual_seed(seed), width, unet.config.cross_attention_dim
    proj = {
        "latents": torch.randn(1, 16, w, generator=g) / w**0.5,
        "proj_in.weight": _normal(g, w, embed_dim),
        "proj_in.bias": _normal(g, w),
        "proj_out.weight": _normal(g, cross, w),
        "proj_out.bias": _normal(g, cross),
        **_norm(g, cross, "norm_out."),
    }
    proj |= resampler_blocks(g, w, w)
    return {"image_proj": proj, "ip_adapter": _ip_layers(unet, g)}


def resampler_blocks(g, w, inner, prefix=""):
    """A Resampler's 4 blocks in the original names (diffusers builds it with depth 4 and ff ratio 4): width
    `w`, attention `inner` wide."""
    proj = {}
    for i in range(4):
        p = f"{prefix}layers.{i}."
        proj |= _norm(g, w, p + "0.norm1.") | _norm(g, w, p + "0.norm2.") | _norm(g, w, p + "1.0.")
        proj |= {
            p + "0.to_q.weight": _normal(g, inner, w),
            p + "0.to_kv.weight": _normal(g, 2 * inner, w),
            p + "0.to_out.weight": _normal(g, w, inner),
            p + "1.1.weight": _normal(g, 4 * w, w),
            p + "1.3.weight": _normal(g, w, 4 * w),
        }
    return proj


def flat_ip_adapter(sd):
    """The nested {"image_proj": ..., "ip_adapter": ...} as the .safetensors files key it."""
    return {f"{part}.{k}": v for part in ("image_proj", "ip_adapter") for k, v in sd[part].items()}


# ------------------------------------------------------------------------------------------------
# Input images for the ControlNet / T2I-Adapter / PAG tests


def smooth_image(seed, size=(64, 64), mode="RGB"):
    """A smooth random picture (a coarse grid upsampled, so encoders see structure, not white noise)."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return PIL.Image.fromarray(coarse).resize(size, PIL.Image.BILINEAR).convert(mode)


def box_mask(size=(64, 64)):
    """White (repaint) in the middle half of each side, black around."""
    import numpy as np
    import PIL.Image

    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    m[size[1] // 4 : 3 * size[1] // 4, size[0] // 4 : 3 * size[0] // 4] = 255
    return PIL.Image.fromarray(m)


def offload_moves(model, module, call):
    """(the device moves of `module`, call() as loaded, call() under model offload): offload to "cpu:0",
    a device name that tells a move apart on this CPU-only machine."""
    want = call()
    model.offload_device = "cpu:0"
    moves, real_to = [], module.to
    module.to = lambda *a, **k: moves.append(str(a[0])) or real_to(*a, **k)
    try:
        return moves, want, call()
    finally:
        model.offload_device = None
        del module.to
