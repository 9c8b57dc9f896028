"""SDXL ControlNet (arXiv:2302.05543): a trainable copy of the UNet's encoder half that reads a control
image (edges, depth, pose, ...) and adds its features to the UNet's skips and middle block.

= diffusers ControlNetModel with SDXL's settings; attribute names are diffusers', so a diffusers
ControlNet state dict (diffusers/controlnet-canny-sdxl-1.0, xinsir/controlnet-*-sdxl-1.0, ...) loads
by identity. The sampler side (control images, scales, guidance windows, guess mode) is in
minsdxl.sampler; loading is load_controlnet here.

Control-LoRAs (stabilityai/control-lora: control-lora-canny-rank128.safetensors, ...) are ControlNets
stored as their difference to the UNet they were trained on, in the original layout without the
control_model. prefix and marked by a `lora_controlnet` key: `<layer>.up` / `<layer>.down` LoRA pairs
for every Linear / Conv2d weight the ControlNet shares with the UNet (conv_in, time_embed, label_emb,
input_blocks, middle_block), full tensors for the rest (biases and norms, input_hint_block, zero_convs,
middle_block_out). load_controlnet(path, unet=model.unet) copies the UNet's encoder half (= diffusers'
ControlNetModel.from_unet), puts the file's full tensors in and merges each pair at scale 1 (fp32):
an ordinary ControlNetModel, diffusers' keys. One deviation from diffusers' load_lora_adapter: the
file's biases of the layers that have a LoRA are used (= ComfyUI's ControlLora, the format's own
implementation); peft leaves the UNet's there.
"""

from dataclasses import asdict, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import layerwise
from .checkpoint import (
    CheckpointError,
    _build,
    _few,
    _unet_base,
    check_placement,
    component_file,
    ldm_controlnet_to_diffusers,
    read_state_dict,
    unet_config_json,
)
from .config import (
    ControlNetConfig,
    ControlNetUnionConfig,
    controlnet_config_from_state_dict,
    controlnet_union_config_from_state_dict,
)
from .lora import Pair
from .unet import TimestepEmbedding, UNet2DConditionModel, timestep_embedding


class ControlNetConditioningEmbedding(nn.Module):
    """The control image (pixels in [0, 1]) -> the first level's width at the latent size: 3x3 convs,
    three of stride 2 (8x down), SiLU between; conv_out starts at zero in training."""

    def __init__(self, out_channels: int, in_channels: int, channels: tuple):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(channels, channels[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, x):
        x = F.silu(self.conv_in(x))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class ControlNetModel(nn.Module):
    kind = "ControlNet"  # in error messages

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = cfg = config
        ch = cfg.block_out_channels
        self.encoder_half(cfg)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            ch[0], cfg.conditioning_channels, cfg.conditioning_embedding_out_channels
        )
        # one zero-initialised 1x1 conv per UNet skip, in the order the skips are pushed
        widths = [ch[0]]
        for i, c in enumerate(ch):
            widths += [c] * (cfg.layers_per_block + (i < len(ch) - 1))
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(c, c, 1) for c in widths)
        self.controlnet_mid_block = nn.Conv2d(ch[-1], ch[-1], 1)
        self.num_cross_attentions = len(self.cross_attentions())
        self.encoder_hid_proj = None  # no IP-Adapter: diffusers' ControlNet never sees the image prompt

    # the UNet's own code for what the two share (the same modules under the same names)
    encoder_half = UNet2DConditionModel.encoder_half
    dtype = UNet2DConditionModel.dtype
    device = UNet2DConditionModel.device
    cross_attentions = UNet2DConditionModel.cross_attentions
    transformer_blocks = UNet2DConditionModel.transformer_blocks
    project_context = UNet2DConditionModel.project_context
    contexts = UNet2DConditionModel.contexts
    embed = UNet2DConditionModel.embed

    def forward(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        controlnet_cond,
        text_embeds,
        time_ids,
        conditioning_scale: float = 1.0,
        guess_mode: bool = False,
    ) -> tuple[list, torch.Tensor]:
        """= diffusers ControlNetModel.forward(..., return_dict=False) with added_cond_kwargs spelled out:
        (down_block_res_samples, mid_block_res_sample) for UNet2DConditionModel.forward's
        down_block_additional_residuals / mid_block_additional_residual. controlnet_cond: [B, 3, H, W]
        in [0, 1] at 8x the latent size; encoder_hidden_states as the UNet takes it."""
        b = sample.shape[0]
        contexts = self.contexts(encoder_hidden_states, b)
        emb = self.embed(sample, timestep, text_embeds, time_ids)
        if self.config.bgr:
            controlnet_cond = controlnet_cond.flip(1)
        x = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        return self.outputs(x, emb, contexts, conditioning_scale, guess_mode)

    def outputs(self, x, emb, contexts, scale, guess_mode: bool) -> tuple[list, torch.Tensor]:
        """The encoder half from conv_in's output (with the control features added), its zero convs, and
        the output scales: `scale` (None: none), in guess mode log-spaced 0.1 .. 1.0 from the shallowest
        skip to the middle block (times `scale`); global pooling last."""
        skips = [x]
        for block in self.down_blocks:
            x = block(x, emb, contexts, skips)
        if self.mid_block is not None:
            x = self.mid_block(x, emb, contexts)
        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(x)
        pool = self.config.global_pool_conditions
        if guess_mode and not pool:
            scales = torch.logspace(-1, 0, len(down) + 1, device=x.device)
            scales = scales if scale is None else scales * scale
            down = [d * s for d, s in zip(down, scales)]
            mid = mid * scales[-1]
        elif scale is not None:
            down = [d * scale for d in down]
            mid = mid * scale
        if pool:
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return down, mid


class ResidualAttentionBlock(nn.Module):
    """ControlNet-Union's transformer layer over the control features (CLIP's block: pre-LayerNorm
    attention and QuickGELU MLP; = diffusers' ResidualAttentionBlock, nn.MultiheadAttention's keys)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads)
        self.ln_1 = nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(dim, 4 * dim)
        self.mlp.c_proj = nn.Linear(4 * dim, dim)
        self.ln_2 = nn.LayerNorm(dim)

    def forward(self, x):
        # x is [batch, tokens, dim] but nn.MultiheadAttention is not batch_first here, as in diffusers and
        # the original ControlNet++: attention runs across the batch, per token. The weights were trained so
        x = x + self.attn(*[self.ln_1(x)] * 3, need_weights=False)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))  # QuickGELU


class ControlNetUnionModel(ControlNetModel):
    """ControlNet-Union / ProMax (arXiv:2404.07987 "ControlNet++"; = diffusers ControlNetUnionModel): one
    ControlNet for several control kinds. Each control image is encoded as by a ControlNet; its spatial
    mean plus a learned embedding of its kind, with the latents' mean, goes through a small transformer,
    whose outputs shift each image's features before they join the latents; the kinds in use (one-hot
    `control_type`) also enter the time embedding."""

    kind = "ControlNet-Union"

    def __init__(self, config):
        super().__init__(config)
        cfg = config
        d = cfg.num_trans_channel
        self.task_embedding = nn.Parameter(torch.empty(cfg.num_control_type, d))
        self.transformer_layes = nn.ModuleList(  # (sic: diffusers' and the original's key)
            ResidualAttentionBlock(d, cfg.num_trans_head) for _ in range(cfg.num_trans_layer)
        )
        self.spatial_ch_projs = nn.Linear(d, cfg.num_proj_channel)
        self.control_add_embedding = TimestepEmbedding(
            cfg.addition_time_embed_dim * cfg.num_control_type, cfg.time_embed_dim
        )

    def forward(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        controlnet_cond: list,
        text_embeds,
        time_ids,
        control_type,
        control_type_idx: list,
        conditioning_scale: list,
        guess_mode: bool = False,
        from_multi: bool = False,
    ) -> tuple[list, torch.Tensor]:
        """= diffusers ControlNetUnionModel.forward(..., return_dict=False): controlnet_cond, one image per
        kind in control_type_idx (indices into the kinds), control_type [B, num_control_type] the kinds in
        use (one-hot), conditioning_scale one per image. One image (or from_multi: one net of several,
        diffusers' MultiControlNetUnionModel) is scaled at the output; several are scaled each at the input,
        the output not at all (guess mode: log-spaced only)."""
        b, cfg = sample.shape[0], self.config
        contexts = self.contexts(encoder_hidden_states, b)
        kinds = timestep_embedding(control_type.flatten(), cfg.addition_time_embed_dim).reshape(b, -1)
        emb = self.embed(sample, timestep, text_embeds, time_ids, self.control_add_embedding(kinds.to(self.dtype)))
        x = self.conv_in(sample)
        one = from_multi or len(control_type_idx) == 1
        tokens, features = [], []
        for cond, idx, scale in zip(controlnet_cond, control_type_idx, conditioning_scale):
            f = self.controlnet_cond_embedding(cond)
            t = (f.mean(dim=(2, 3)) + self.task_embedding[idx])[:, None]
            tokens.append(t if one else t * scale)
            features.append(f if one else f * scale)
        tokens.append(x.mean(dim=(2, 3))[:, None])
        seq = torch.cat(tokens, dim=1)
        for layer in self.transformer_layes:
            seq = layer(seq)
        fused = x * 0.0  # (diffusers' sample * 0.0: NaN/inf in x carry over)
        for k, (f, scale) in enumerate(zip(features, conditioning_scale)):
            shift = self.spatial_ch_projs(seq[:, k])[:, :, None, None]
            fused = fused + (f + shift if one else f + shift * scale)
        return self.outputs(x + fused, emb, contexts, conditioning_scale[0] if one else None, guess_mode)


def controlnet_config_json(cfg: ControlNetConfig) -> dict:
    """diffusers' config.json for a ControlNetConfig or ControlNetUnionConfig (to save one, or build
    diffusers' model in tests)."""
    unet = unet_config_json(cfg, decoder=False)
    keep = (
        "in_channels",
        "block_out_channels",
        "layers_per_block",
        "transformer_layers_per_block",
        "attention_head_dim",
        "cross_attention_dim",
        "addition_embed_type",
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
        "norm_num_groups",
        "use_linear_projection",
        "flip_sin_to_cos",
        "freq_shift",
    )
    out = {k: unet[k] for k in keep if k in unet}
    out["down_block_types"] = unet["down_block_types"]
    # a distilled UNet's middle block is named; diffusers' ControlNetUnionModel takes no such key
    if unet["mid_block_type"] != "UNetMidBlock2DCrossAttn":
        out["mid_block_type"] = unet["mid_block_type"]
    out |= {
        "_class_name": "ControlNetModel",
        "conditioning_channels": cfg.conditioning_channels,
        "conditioning_embedding_out_channels": list(cfg.conditioning_embedding_out_channels),
        "global_pool_conditions": cfg.global_pool_conditions,
        "controlnet_conditioning_channel_order": "bgr" if cfg.bgr else "rgb",
        "upcast_attention": False,
    }
    if isinstance(cfg, ControlNetUnionConfig):
        union = ("num_control_type", "num_trans_channel", "num_trans_head", "num_trans_layer", "num_proj_channel")
        out |= {"_class_name": "ControlNetUnionModel"} | {k: getattr(cfg, k) for k in union}
    return out


def _config_base(cj: dict, union: bool) -> ControlNetConfig:
    """What a ControlNet's config.json says that its shapes cannot."""
    cls = ControlNetUnionConfig if union else ControlNetConfig
    if not cj:
        return cls()
    kind = cj.get("_class_name", cls.__name__.replace("Config", "Model"))
    if kind not in ("ControlNetModel", "ControlNetUnionModel"):
        raise CheckpointError(
            f"this is a diffusers {kind}; minsdxl loads ControlNetModel and ControlNetUnionModel (SDXL ControlNets "
            "and ControlNet-Union / ProMax)"
        )
    if (kind == "ControlNetUnionModel") != union:
        has = "has" if union else "has no"
        raise CheckpointError(f"config.json says {kind} but the weights {has} a Union's task_embedding")
    u = _unet_base(cj)
    extra = {"num_trans_head": cj.get("num_trans_head", 8)} if union else {}
    return cls(
        attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_num_groups,
        addition_time_embed_dim=u.addition_time_embed_dim,
        global_pool_conditions=bool(cj.get("global_pool_conditions", False)),
        bgr=cj.get("controlnet_conditioning_channel_order", "rgb") == "bgr",
        **extra,
    )


CONTROL_LORA_MARK = "lora_controlnet"  # a Control-LoRA's marker key (diffusers' is_sai_sd_control_lora, ComfyUI's)


def _control_lora(sd: dict, unet, base: ControlNetConfig, dtype, device) -> tuple[ControlNetConfig, dict]:
    """A Control-LoRA, diffusers-named (full tensors and `<layer>.up` / `.down` pairs), on the UNet it was made
    for -> (the ControlNet's config, its full state dict): the UNet's tensors copied (never shared: the UNet
    may change in place later), the file's full tensors instead where it has them, each pair merged into
    the copied weight."""
    full, pairs = {}, {}
    for k, v in sd.items():
        stem, _, part = k.rpartition(".")
        if part in ("up", "down"):
            pairs.setdefault(stem, {})[part] = v
        else:
            full[k] = v
    if "controlnet_cond_embedding.conv_in.weight" not in full:
        raise CheckpointError(
            f"this has the {CONTROL_LORA_MARK} key of a Control-LoRA but no control image encoder (input_hint_block); "
            "it is not a Control-LoRA"
        )
    if not any(k.startswith("add_embedding.") for k in sd):
        raise CheckpointError(
            "this is a Stable Diffusion 1.x/2.x Control-LoRA (no label_emb: no SDXL micro-conditioning); minsdxl "
            "needs an SDXL one"
        )
    if not isinstance(unet, UNet2DConditionModel):
        raise CheckpointError(
            "this is a Control-LoRA (stabilityai/control-lora): a ControlNet stored as its difference to the SDXL "
            "UNet it was trained on; pass that UNet: load_controlnet(path, unet=model.unet)"
            + ("" if unet is None else f", not a {type(unet).__name__}")
        )
    unet_sd = unet.state_dict()
    # the UNet's fields, only the control image encoder's from the file (config= may give bgr / global pooling)
    encoder = {k: v for k, v in full.items() if k.startswith("controlnet_cond_embedding.")}
    cfg = controlnet_config_from_state_dict(unet_sd | encoder, replace(base, **asdict(unet.config)))
    with torch.device("meta"):
        expected = ControlNetModel(cfg).state_dict()
    unfit = [k for k in full if k not in expected] + [s + ".weight" for s in pairs if s + ".weight" not in expected]
    if unfit:
        raise CheckpointError(
            f"this Control-LoRA does not fit this UNet: the ControlNet copied from it has no {_few(unfit)}; was it "
            "made for another base model?"
        )

    def fits(key, shape, got):
        if shape != tuple(expected[key].shape):
            raise CheckpointError(
                f"this Control-LoRA does not fit this UNet: {key} is {tuple(expected[key].shape)} in the ControlNet "
                f"copied from it but {got} in the file; was it made for another base model?"
            )

    for k, t in full.items():
        fits(k, tuple(t.shape), tuple(t.shape))
    for stem, p in pairs.items():
        if p.keys() != {"up", "down"}:
            raise CheckpointError(f"{stem} has a LoRA {next(iter(p))} but no partner")
        if stem + ".weight" in full:
            raise CheckpointError(f"{stem}.weight is in it both as a full tensor and as a LoRA pair")
        up, down = p["up"].shape, p["down"].shape  # [out, r(, 1, 1)] @ [r, in(, kh, kw)]
        fits(stem + ".weight", (up[0], *down[1:]) if up[1] == down[0] else None, f"{tuple(up)} @ {tuple(down)}")
    # the file's tensors, its biases too where the layer has a LoRA (= ComfyUI's ControlLora; diffusers keeps the
    # UNet's there: peft wraps the layer, whose bias becomes base_layer.bias, a name no file key has); the rest
    # copied from the UNet (a ControlNet-only tensor missing from the file: _build names it)
    out = {}
    for k in expected:
        if k in full:
            out[k] = full[k]
        elif k in unet_sd:
            stem = k.removesuffix(".weight")
            out[k] = unet_sd[k].to(device=device, dtype=torch.float32 if stem in pairs else dtype, copy=True)
    for stem, p in pairs.items():
        # fp32, scale 1: diffusers' load_lora_adapter sets lora_alpha = r (alpha_pattern = rank_pattern) for a
        # Control-LoRA, and ComfyUI's ControlLoraOps computes weight + up @ down
        w = out[stem + ".weight"]
        Pair(p["down"], p["up"], alpha=p["down"].shape[0]).add_to(w, 1.0)
        out[stem + ".weight"] = w.to(dtype)
    return cfg, out


def load_controlnet(
    path, dtype=torch.float32, device="cpu", variant=None, config=None, unet=None, storage_dtype=None
) -> ControlNetModel:
    """An SDXL ControlNet, or a ControlNet-Union / ProMax (a ControlNetUnionModel, e.g.
    xinsir/controlnet-union-sdxl-1.0), from a diffusers folder (config.json + diffusion_pytorch_model[.fp16]
    .safetensors, e.g. diffusers/controlnet-canny-sdxl-1.0; a pipeline folder's controlnet/ is found too)
    or from one file: diffusers' keys, or the original layout (control_model.input_blocks / zero_convs /
    input_hint_block / middle_block_out). config: for a file, a folder whose config.json gives what the
    shapes cannot (global_pool_conditions, the channel order, the head size, a Union's num_trans_head;
    default: SDXL's).
    A Control-LoRA (stabilityai/control-lora, marked by its lora_controlnet key) needs unet=, the UNet it
    was made for (model.unet, SDXL base): the ControlNet starts as a copy of its encoder half, with its
    current weights (a LoRA merged into it comes along, as with diffusers' ControlNetModel.from_unet), and
    the file's LoRA pairs merged in. unet= is not used for other ControlNets.
    storage_dtype: its layers stored in this dtype (torch.float8_e4m3fn), each computed in `dtype` (see
    minsdxl.load; = diffusers' controlnet.enable_layerwise_casting)."""
    check_placement(dtype, device, "load_controlnet")
    if storage_dtype is not None:
        layerwise.check(storage_dtype, dtype, "load_controlnet(storage_dtype=, dtype=)")
    file, cj = component_file(path, variant, dtype, config)
    sd = read_state_dict(file)
    if sd.pop(CONTROL_LORA_MARK, None) is not None:
        try:
            cfg, sd = _control_lora(ldm_controlnet_to_diffusers(sd), unet, _config_base(cj, False), dtype, device)
            return _build(ControlNetModel, cfg, sd, "Control-LoRA", dtype, device, storage_dtype)
        except (CheckpointError, ValueError) as e:
            raise CheckpointError(f"{file}: {e}") from None
    sd = ldm_controlnet_to_diffusers(sd)
    if "controlnet_cond_embedding.conv_in.weight" not in sd:
        raise CheckpointError(
            f"{file} is not a ControlNet (no controlnet_cond_embedding / input_hint_block weights); "
            "for a UNet, VAE or text encoder use minsdxl.load_component, for a LoRA minsdxl.load_lora_weights"
        )
    if "add_embedding.linear_1.weight" not in sd:
        raise CheckpointError(
            f"{file} is a Stable Diffusion 1.x/2.x ControlNet (no SDXL micro-conditioning embedding); "
            "minsdxl needs an SDXL ControlNet"
        )
    union = "task_embedding" in sd
    try:
        base = _config_base(cj, union)
        if union:
            cfg = controlnet_union_config_from_state_dict(sd, base)
            return _build(ControlNetUnionModel, cfg, sd, "ControlNet-Union", dtype, device, storage_dtype)
        cfg = controlnet_config_from_state_dict(sd, base)
        return _build(ControlNetModel, cfg, sd, "ControlNet", dtype, device, storage_dtype)
    except (CheckpointError, ValueError) as e:
        raise CheckpointError(f"{file}: {e}") from None
