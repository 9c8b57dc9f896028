"""Model configs as small dataclasses, the SDXL presets, and inference of a config from the shapes
of a state dict in diffusers' key names (never from a path or a YAML file)."""

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280)
    layers_per_block: int = 2  # resnets per encoder level (a decoder level has one more)
    # transformer blocks per encoder level: one number, or one per resnet (diffusers'
    # transformer_layers_per_block; distilled UNets such as SSD-1B and Vega vary them); 0: no attention
    transformer_layers: tuple = (0, 2, 10)
    # per decoder level, in decoder order: a number or one per resnet (diffusers'
    # reverse_transformer_layers_per_block); None: the encoder's, reversed
    up_transformer_layers: tuple | None = None
    # the middle block's transformer blocks; 0: the middle block is one resnet (diffusers' UNetMidBlock2D:
    # SSD-1B, Vega); None: no middle block (diffusers' mid_block_type None)
    mid_transformer_layers: int | None = 10
    attention_head_dim: int = 64  # the real head size (diffusers' "attention_head_dim" is the head count)
    cross_attention_dim: int = 2048
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 2816  # pooled text (1280) + 6 or 5 time ids x 256
    norm_num_groups: int = 32
    sample_size: int = 128  # default latent size: 128 x 8 = 1024 px
    # guidance-distilled UNets (latent-consistency/lcm-sdxl): the guidance scale's embedding width, added to the
    # time embedding's input (diffusers' time_cond_proj_dim); None for every other SDXL UNet
    time_cond_proj_dim: int | None = None

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    def down_depths(self, i: int) -> tuple:
        """Transformer blocks after each resnet of encoder level i."""
        return _per_resnet(self.transformer_layers[i], self.layers_per_block)

    def up_depths(self, i: int) -> tuple:
        """Transformer blocks after each resnet of decoder level i (0: the deepest)."""
        if self.up_transformer_layers is not None:
            return _per_resnet(self.up_transformer_layers[i], self.layers_per_block + 1)
        d = self.transformer_layers[::-1][i]
        if isinstance(d, tuple):  # as diffusers, which asks for reverse_transformer_layers_per_block then
            raise ValueError("transformer_layers gives one depth per resnet: give up_transformer_layers too")
        return (d,) * (self.layers_per_block + 1)


def _per_resnet(depth, n: int) -> tuple:
    if isinstance(depth, int):
        return (depth,) * n
    if len(depth) != n:
        raise ValueError(f"{len(depth)} transformer depths for a level of {n} resnets")
    return tuple(depth)


@dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
    """A ControlNet: a UNet's encoder half (these UNetConfig fields) plus the control image's encoder.
    = diffusers ControlNetModel's config; the last two fields are read from its config.json only."""

    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)
    global_pool_conditions: bool = False  # residuals averaged over space (shuffle-style ControlNets)
    bgr: bool = False  # controlnet_conditioning_channel_order == "bgr": the control image's channels flipped


@dataclass(frozen=True)
class ControlNetUnionConfig(ControlNetConfig):
    """ControlNet-Union (xinsir/controlnet-union-sdxl-1.0): a ControlNet that reads several control images
    of known kinds at once. = diffusers ControlNetUnionModel's config; num_trans_head from config.json."""

    conditioning_embedding_out_channels: tuple = (48, 96, 192, 384)
    num_control_type: int = 6  # the control kinds it knows (ProMax: 8)
    num_trans_channel: int = 320
    num_trans_head: int = 8
    num_trans_layer: int = 1
    num_proj_channel: int = 320


@dataclass(frozen=True)
class T2IAdapterConfig:
    """A T2I-Adapter (full_adapter_xl); downscale_factor from its config.json."""

    in_channels: int = 3  # 1 for the sketch adapter (grey images)
    channels: tuple = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    # the pixel unshuffle: 1024 px -> 64 x 64, the UNet's first level after its downsample
    downscale_factor: int = 16


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.13025
    shift_factor: float | None = None
    force_upcast: bool = True
    sample_size: int = 1024
    # per-channel latent statistics (Playground v2.5): the UNet's latents are (z - mean) * scaling / std
    latents_mean: tuple | None = None
    latents_std: tuple | None = None


@dataclass(frozen=True)
class TAESDConfig:
    """TAESD / TAESDXL (madebyollin's tiny autoencoder, diffusers' AutoencoderTiny): per stage, its width and its
    residual blocks; encoder or decoder None where only the other half was loaded (A1111 ships the two apart)."""

    latent_channels: int = 4
    encoder_block_out_channels: tuple | None = (64, 64, 64, 64)
    num_encoder_blocks: tuple | None = (1, 3, 3, 3)
    decoder_block_out_channels: tuple | None = (64, 64, 64, 64)
    num_decoder_blocks: tuple | None = (3, 3, 3, 1)
    scaling_factor: float = 1.0  # TAESD reads and writes the UNet's latents as they are


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # bigG: 1280, with a text_projection; CLIP-L: none used by SDXL
    eos_token_id: int = 49407
    pad_token_id: int = 49407


@dataclass(frozen=True)
class VisionConfig:
    """A CLIP vision tower (IP-Adapter's image encoder). Defaults: OpenCLIP ViT-H/14."""

    hidden_size: int = 1280
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    intermediate_size: int = 5120
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 1024
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    num_channels: int = 3

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # the patches plus the class token


UNET_PRESETS = {
    "base": UNetConfig(),
    "refiner": UNetConfig(
        block_out_channels=(384, 768, 1536, 1536),
        transformer_layers=(0, 4, 4, 0),
        mid_transformer_layers=4,
        cross_attention_dim=1280,
        projection_class_embeddings_input_dim=2560,
    ),
    "inpaint": UNetConfig(in_channels=9),
}
VAE_PRESETS = {"sdxl": VAEConfig()}
TEXT_PRESETS = {
    "clip_l": TextConfig(),
    "bigg": TextConfig(
        hidden_size=1280,
        num_hidden_layers=32,
        num_attention_heads=20,
        intermediate_size=5120,
        hidden_act="gelu",
        projection_dim=1280,
        pad_token_id=0,
    ),
}
# IP-Adapter's two image encoders (h94/IP-Adapter; the same numbers as its config.json files):
# models/image_encoder (OpenCLIP ViT-H/14: SD 1.5 adapters and the SDXL "vit-h" / Plus ones) and
# sdxl_models/image_encoder (OpenCLIP ViT-bigG/14: the plain SDXL adapter). Both 224 px, exact gelu.
VISION_PRESETS = {
    "vit_h": VisionConfig(),
    "vit_bigg": VisionConfig(hidden_size=1664, num_hidden_layers=48, intermediate_size=8192, projection_dim=1280),
}


def _count(keys, prefix: str, after: str = "") -> int:
    """How many consecutive indices N exist for keys `prefix + N + "." + after...`."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.{after}") for k in keys):
        n += 1
    return n


def _depths(keys, prefix: str, n: int):
    """Transformer blocks after each of the n resnets of the level under `prefix` (diffusers names), as one
    number when they agree (0: a level without attention)."""
    if not any(k.startswith(prefix + "attentions.") for k in keys):
        return 0
    d = tuple(_count(keys, f"{prefix}attentions.{j}.transformer_blocks.") for j in range(n))
    return d[0] if len(set(d)) == 1 else d


def unet_config_from_state_dict(sd, base: UNetConfig | None = None) -> UNetConfig:
    """Infer a UNetConfig from a diffusers-named UNet state dict (keys without the `unet.` prefix)."""
    keys = list(sd)
    if "conv_in.weight" not in sd or "add_embedding.linear_1.weight" not in sd:
        raise ValueError("not an SDXL UNet: conv_in.weight or add_embedding.linear_1.weight is missing")
    levels = _count(keys, "down_blocks.")
    channels = tuple(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels))
    n = _count(keys, "down_blocks.0.resnets.")
    layers = tuple(_depths(keys, f"down_blocks.{i}.", n) for i in range(levels))
    up = tuple(_depths(keys, f"up_blocks.{i}.", n + 1) for i in range(levels))
    if not any(k.startswith("up_blocks.") for k in keys) or up == layers[::-1]:
        up = None  # a ControlNet (no decoder), or the encoder's depths reversed
    if any(k.startswith("mid_block.attentions.") for k in keys):
        mid_layers = _count(keys, "mid_block.attentions.0.transformer_blocks.")
    else:  # SSD-1B / Vega: one resnet; or no middle block at all
        mid_layers = 0 if any(k.startswith("mid_block.resnets.") for k in keys) else None
    attn_key = next((k for k in keys if k.endswith("attn2.to_k.weight")), None)
    if attn_key is None:
        raise ValueError("not an SDXL UNet: it has no cross-attention layers")
    first_attn = next(i for i, d in enumerate(layers) if d)
    q = sd[f"down_blocks.{first_attn}.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    base = base or UNetConfig()
    head_dim = base.attention_head_dim if q.shape[0] % base.attention_head_dim == 0 else q.shape[0]
    return replace(
        base,
        in_channels=sd["conv_in.weight"].shape[1],
        # a ControlNet has no conv_out
        out_channels=sd["conv_out.weight"].shape[0] if "conv_out.weight" in sd else base.out_channels,
        block_out_channels=channels,
        layers_per_block=n,
        transformer_layers=layers,
        up_transformer_layers=up,
        mid_transformer_layers=mid_layers,
        attention_head_dim=head_dim,
        cross_attention_dim=sd[attn_key].shape[1],
        projection_class_embeddings_input_dim=sd["add_embedding.linear_1.weight"].shape[1],
        norm_num_groups=base.norm_num_groups,
        time_cond_proj_dim=sd["time_embedding.cond_proj.weight"].shape[1]
        if "time_embedding.cond_proj.weight" in sd
        else None,
    )


def controlnet_config_from_state_dict(sd, base: ControlNetConfig | None = None) -> ControlNetConfig:
    """Infer a ControlNetConfig from a diffusers-named ControlNetModel state dict."""
    if "controlnet_cond_embedding.conv_in.weight" not in sd:
        raise ValueError("not a ControlNet: controlnet_cond_embedding.conv_in.weight is missing")
    cfg = unet_config_from_state_dict(sd, base or ControlNetConfig())
    e = "controlnet_cond_embedding."
    n = _count(list(sd), f"{e}blocks.")  # blocks 2k (same width) and 2k+1 (stride 2, wider)
    wider = tuple(sd[f"{e}blocks.{k}.weight"].shape[0] for k in range(1, n, 2))
    channels = (sd[f"{e}conv_in.weight"].shape[0],) + wider
    return replace(
        cfg, conditioning_channels=sd[f"{e}conv_in.weight"].shape[1], conditioning_embedding_out_channels=channels
    )


def controlnet_union_config_from_state_dict(sd, base: ControlNetUnionConfig | None = None) -> ControlNetUnionConfig:
    """Infer a ControlNetUnionConfig from a diffusers-named ControlNetUnionModel state dict."""
    if "task_embedding" not in sd:
        raise ValueError("not a ControlNet-Union: task_embedding is missing")
    cfg = controlnet_config_from_state_dict(sd, base or ControlNetUnionConfig())
    return replace(
        cfg,
        num_control_type=sd["task_embedding"].shape[0],
        num_trans_channel=sd["task_embedding"].shape[1],
        num_trans_layer=_count(list(sd), "transformer_layes."),
        num_proj_channel=sd["spatial_ch_projs.weight"].shape[0],
    )


def t2i_adapter_config_from_state_dict(sd, base: T2IAdapterConfig | None = None) -> T2IAdapterConfig:
    """Infer a T2IAdapterConfig from a diffusers-named T2IAdapter state dict."""
    base = base or T2IAdapterConfig()
    keys = list(sd)
    n = _count(keys, "adapter.body.")
    return replace(
        base,
        in_channels=sd["adapter.conv_in.weight"].shape[1] // base.downscale_factor**2,
        channels=tuple(sd[f"adapter.body.{i}.resnets.0.block1.weight"].shape[0] for i in range(n)),
        num_res_blocks=_count(keys, "adapter.body.0.resnets."),
    )


def vae_config_from_state_dict(sd, base: VAEConfig | None = None) -> VAEConfig:
    keys = list(sd)
    if "encoder.conv_in.weight" not in sd or "decoder.conv_in.weight" not in sd:
        raise ValueError("not an AutoencoderKL: encoder.conv_in.weight or decoder.conv_in.weight is missing")
    levels = _count(keys, "encoder.down_blocks.")
    base = base or VAEConfig()
    return replace(
        base,
        in_channels=sd["encoder.conv_in.weight"].shape[1],
        out_channels=sd["decoder.conv_out.weight"].shape[0],
        latent_channels=sd["decoder.conv_in.weight"].shape[1],
        block_out_channels=tuple(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)),
        layers_per_block=_count(keys, "encoder.down_blocks.0.resnets."),
    )


def _tiny_stages(sd, prefix: str, first: int) -> tuple:
    """(widths, blocks per stage) of a TAESD half: its Sequential holds convs and residual blocks (a block has
    `conv.0`), every stage opening (encoder) or closing (decoder) with a conv; `first`: the index of the first
    stage's first layer after the stem."""
    layers = sorted({int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)})
    blocks = [i for i in layers if f"{prefix}{i}.conv.0.weight" in sd]
    convs = [i for i in layers if i not in blocks and i >= first]
    widths, counts, start = [], [], first
    for c in convs:  # the blocks before each conv (decoder) / after each conv (encoder) form a stage
        inside = [b for b in blocks if start <= b < c]
        if inside:
            widths.append(sd[f"{prefix}{inside[0]}.conv.0.weight"].shape[0])
            counts.append(len(inside))
        start = c
    return tuple(widths), tuple(counts)


def taesd_config_from_state_dict(sd, base: TAESDConfig | None = None) -> TAESDConfig:
    """A TAESDConfig from an AutoencoderTiny state dict in diffusers' keys (encoder.layers.N / decoder.layers.N)."""
    base = base or TAESDConfig()
    enc, dec = "encoder.layers.0.weight" in sd, "decoder.layers.0.weight" in sd
    if not enc and not dec:
        raise ValueError("not a TAESD: encoder.layers.0.weight and decoder.layers.0.weight are both missing")
    cfg = dict(encoder_block_out_channels=None, num_encoder_blocks=None)
    cfg |= dict(decoder_block_out_channels=None, num_decoder_blocks=None)
    if enc:  # conv, then per stage: (a stride-2 conv but for the first,) its blocks; a last conv to the latents
        n = max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
        widths, counts = _tiny_stages(sd, "encoder.layers.", 1)
        cfg |= dict(encoder_block_out_channels=widths, num_encoder_blocks=counts)
        latent = sd[f"encoder.layers.{n}.weight"].shape[0]
    if dec:  # conv, ReLU, then per stage: its blocks, (Upsample,) a conv
        widths, counts = _tiny_stages(sd, "decoder.layers.", 2)
        cfg |= dict(decoder_block_out_channels=widths, num_decoder_blocks=counts)
        latent = sd["decoder.layers.0.weight"].shape[1]
    return replace(base, latent_channels=latent, **cfg)


def text_config_from_state_dict(sd, base: TextConfig | None = None) -> TextConfig:
    """Infer a TextConfig from a CLIPTextModel(WithProjection) state dict (with or without the
    `text_model.` prefix). Head count and activation are not in the shapes: they come from `base`
    (a preset chosen by width: 768 -> CLIP-L, 1280 -> bigG) or from the folder's config.json."""
    p = "text_model." if any(k.startswith("text_model.") for k in sd) else ""
    tok = sd[f"{p}embeddings.token_embedding.weight"]
    hidden = tok.shape[1]
    if base is None:
        base = TEXT_PRESETS["bigg"] if hidden == 1280 else TEXT_PRESETS["clip_l"]
    proj = sd.get("text_projection.weight")
    return replace(
        base,
        vocab_size=tok.shape[0],
        hidden_size=hidden,
        num_hidden_layers=_count(list(sd), f"{p}encoder.layers."),
        intermediate_size=sd[f"{p}encoder.layers.0.mlp.fc1.weight"].shape[0],
        max_position_embeddings=sd[f"{p}embeddings.position_embedding.weight"].shape[0],
        projection_dim=None if proj is None else proj.shape[0],
    )


def vision_config_from_state_dict(sd, base: VisionConfig | None = None) -> VisionConfig:
    """Infer a VisionConfig from a CLIPVisionModelWithProjection state dict (transformers' keys).

    Width, depth, MLP size, patch size, channels, projection size and the image size (from the number
    of positions) are in the shapes. Head count, activation and LayerNorm eps are not: they come from
    `base` (what the folder's config.json says), else from the preset of the same width, else 16 heads
    and exact gelu: every OpenCLIP tower from ViT-L up has 16 heads (head size 64 for ViT-L/14, 80 for
    ViT-H/14, 104 for ViT-bigG/14) and gelu. OpenAI's own towers (quick_gelu; ViT-B: 12 heads) need
    their config.json."""
    p = "vision_model."
    if f"{p}embeddings.patch_embedding.weight" not in sd:
        raise ValueError(f"not a CLIP vision model: {p}embeddings.patch_embedding.weight is missing")
    patch = sd[f"{p}embeddings.patch_embedding.weight"]  # [hidden, channels, patch, patch]
    hidden, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
    if base is None:
        base = next((c for c in VISION_PRESETS.values() if c.hidden_size == hidden), VisionConfig())
    grid = math.isqrt(sd[f"{p}embeddings.position_embedding.weight"].shape[0] - 1)
    # the config's own image_size when it gives the same patch grid (e.g. 225 px with 14 px patches)
    image_size = base.image_size if base.image_size // patch_size == grid else grid * patch_size
    proj = sd.get("visual_projection.weight")
    return replace(
        base,
        hidden_size=hidden,
        num_hidden_layers=_count(list(sd), f"{p}encoder.layers."),
        intermediate_size=sd[f"{p}encoder.layers.0.mlp.fc1.weight"].shape[0],
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=base.projection_dim if proj is None else proj.shape[0],  # no projection: _build says so
        num_channels=channels,
    )


__all__ = [
    "UNetConfig",
    "ControlNetConfig",
    "ControlNetUnionConfig",
    "T2IAdapterConfig",
    "VAEConfig",
    "TAESDConfig",
    "TextConfig",
    "VisionConfig",
    "UNET_PRESETS",
    "VAE_PRESETS",
    "TEXT_PRESETS",
    "VISION_PRESETS",
    "unet_config_from_state_dict",
    "controlnet_config_from_state_dict",
    "controlnet_union_config_from_state_dict",
    "t2i_adapter_config_from_state_dict",
    "vae_config_from_state_dict",
    "taesd_config_from_state_dict",
    "text_config_from_state_dict",
    "vision_config_from_state_dict",
]
