"""IP-Adapter's image encoder: a CLIP vision tower (transformers' CLIPVisionModelWithProjection),
and `preprocess`, the image preparation diffusers' IP-Adapter path applies before it.

The tower is a pre-LayerNorm ViT: 14x14-pixel patches (a bias-free conv) plus a class token, learned
positions, `pre_layrnorm` (sic, transformers' name), the same transformer layers as the text encoders
(reused from text_encoder.py, without a mask), then `post_layernorm` of the class token times a
bias-free `visual_projection`. IP-Adapter reads either that projection (`forward`: transformers'
`image_embeds`) or, for the Plus adapters, the hidden states before the last layer (`penultimate`:
transformers' `hidden_states[-2]`). Keys equal transformers' (`vision_model.embeddings.class_embedding`,
`vision_model.encoder.layers.N.self_attn.q_proj.weight`, `visual_projection.weight`, ...), without the
`position_ids` buffer. Presets: config.VISION_PRESETS ("vit_h", "vit_bigg").
Reference: transformers models/clip/modeling_clip.py and image_processing_clip.py (5.x).
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .config import VisionConfig
from .layerwise import compute_dtype
from .text_encoder import CLIPEncoder


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.class_embedding = nn.Parameter(torch.randn(d) * d**-0.5)  # transformers' init
        self.patch_embedding = nn.Conv2d(
            config.num_channels, d, config.patch_size, stride=config.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(config.num_positions, d)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [B, d, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # [B, grid * grid, d], row by row
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        # the whole position table (one row per token), no `position_ids` buffer: nothing to go stale or meta
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight.to(x.dtype)  # (float8: layerwise)


class CLIPVisionModel(nn.Module):
    """The vision transformer (transformers 5 CLIPVisionModel: keys without a prefix)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                f"{config.num_attention_heads}; pass the image encoder's config.json"
            )
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        """pixel_values [B, C, S, S] -> the hidden states after `num_layers` layers (all when None),
        = transformers' `hidden_states[num_layers]` ([0] is the pre_layrnorm output)."""
        c, s = self.config.num_channels, self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (c, s, s):
            # transformers interpolates the positions only on request (interpolate_pos_encoding=True), which
            # diffusers never makes: other sizes are an error there too
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)} but this image encoder takes "
                f"[batch, {c}, {s}, {s}]: use minsdxl.image_encoder.preprocess(images, size={s}) to resize, "
                "crop and normalize images"
            )
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        layers = self.encoder.layers
        for layer in layers if num_layers is None else layers[:num_layers]:
            x = layer(x, None)  # every patch sees every patch: no mask
        return x


class CLIPVisionModelWithProjection(nn.Module):
    """IP-Adapter's image encoder (keys = transformers 5 CLIPVisionModelWithProjection's)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionModel(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.visual_projection)

    @property
    def device(self) -> torch.device:
        return self.visual_projection.weight.device

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, C, S, S] -> image_embeds [B, projection_dim]: post_layernorm of the last
        layer's class token, projected (what plain IP-Adapters read)."""
        x = self.vision_model(pixel_values)
        return self.visual_projection(self.vision_model.post_layernorm(x[:, 0]))

    def penultimate(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, C, S, S] -> [B, 1 + (S // patch)**2, hidden]: the hidden states before the
        last layer (transformers' `hidden_states[-2]`, what IP-Adapter Plus reads); the last layer is
        not run."""
        return self.vision_model(pixel_values, num_layers=len(self.vision_model.encoder.layers) - 1)


# ------------------------------------------------------------------------------------------------
# Preprocessing: what diffusers' IP-Adapter path feeds the encoder for anything but a tensor, i.e.
# transformers' CLIPImageProcessor(size=S, crop_size=S) (load_ip_adapter builds it from the encoder's
# image_size). In transformers 5 that class is the torchvision backend (the PIL/numpy one is
# CLIPImageProcessorPil, and differs from it by up to one uint8 level after resizing); these steps are
# its steps on the CPU, in its order and dtypes, bit for bit.

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESCALE = 1 / 255


def _rgb(image) -> torch.Tensor:
    """One PIL image or HxWx3 uint8 array -> [3, H, W] uint8 RGB."""
    if isinstance(image, Image.Image):
        # transformers' convert_to_rgb: transparency is composited onto white (not dropped, as
        # PIL's convert("RGB") alone would); every other mode (L, P, CMYK, I;16, ...) is PIL's convert
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        arr = np.array(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            # transformers would take a float array as 0..255 values (a [0, 1] image becomes nearly
            # uniform gray) and resize it unrounded: refuse rather than silently differ or mislead
            raise ValueError(
                f"an image array must be uint8 (got {image.dtype}): convert a float image in [0, 1] with "
                "(arr * 255).round().astype(np.uint8), or pass a PIL image"
            )
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(
                f"an image array must be height x width x 3 RGB (got shape {image.shape}); "
                "convert other layouts with PIL.Image.fromarray(arr).convert('RGB')"
            )
        arr = np.array(image)  # a writable, contiguous copy (also of views such as arr[..., ::-1])
    else:
        raise TypeError(f"cannot preprocess a {type(image).__name__}: pass PIL images or HxWx3 uint8 arrays")
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _resize_crop_normalize(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    # transformers' get_resize_output_image_size(default_to_square=False): the short edge becomes
    # `size`, the long one int(size * long / short), truncated; small images are scaled up
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_h, new_w = (new_long, size) if w <= h else (size, new_long)
    if (new_h, new_w) != (h, w):
        # torchvision's resize of a uint8 CPU tensor: torch's own antialiased bicubic on uint8 (PIL's filter,
        # rounded and clamped inside the kernel), no float round trip
        x = F.interpolate(x[None], size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)[0]
    top, left = int((new_h - size) / 2.0), int((new_w - size) / 2.0)  # odd margins: one more pixel right/below
    x = x[:, top : top + size, left : left + size]
    # rescale (1/255) fused into normalize as transformers does: mean and std scaled by 1 / (1/255) in fp32
    mean = (torch.tensor(OPENAI_CLIP_MEAN) * (1.0 / _RESCALE)).view(-1, 1, 1)
    std = (torch.tensor(OPENAI_CLIP_STD) * (1.0 / _RESCALE)).view(-1, 1, 1)
    return x.to(torch.float32).sub_(mean).div_(std)


def preprocess(images, size: int = 224) -> torch.Tensor:
    """PIL image(s) or HxWx3 uint8 array(s) (one, a list, or an NxHxWx3 array) -> pixel_values
    [B, 3, size, size] float32 on the CPU, equal to diffusers' `feature_extractor(images,
    return_tensors="pt").pixel_values`: RGB (transparency onto white), the short edge resized to `size`
    (bicubic, antialiased), a center crop, then (x / 255 - OPENAI_CLIP_MEAN) / OPENAI_CLIP_STD.
    `size` is the encoder's config.image_size. A torch.Tensor is not an image here: diffusers passes
    tensors to the encoder as pixel_values unchanged, and so should the caller."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int (the encoder's config.image_size), not {size!r}")
    if isinstance(images, torch.Tensor):
        raise TypeError("preprocess takes images; a tensor is already pixel_values: pass it to the encoder as is")
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("preprocess got an empty list of images")
    return torch.stack([_resize_crop_normalize(_rgb(im), size) for im in images])


__all__ = ["CLIPVisionModel", "CLIPVisionModelWithProjection", "preprocess", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]
