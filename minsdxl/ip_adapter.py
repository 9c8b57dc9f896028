"""IP-Adapter (Ye et al., arXiv:2308.06721): an image as a prompt. A CLIP image encoder embeds the
image, a small projection turns the embedding into a few "image tokens" in the text tokens' width, and
every UNet cross-attention attends to them with its own k/v projections (to_k_ip, to_v_ip), adding
`scale` times that attention to the text attention's output before to_out.

Numerics and names are diffusers' (loaders/unet.py _load_ip_adapter_weights, IPAdapterAttnProcessor2_0,
ImageProjection, IPAdapterPlusImageProjection, the pipelines' encode_image and
prepare_ip_adapter_image_embeds), so after `load_ip_adapter` the UNet's state_dict keys equal diffusers'
(`encoder_hid_proj.image_projection_layers.N.*`, `...attn2.processor.to_k_ip.N.weight`). Two kinds of
adapter file exist for SDXL, both handled: ip-adapter_sdxl(_vit-h) (ImageProjection: the pooled,
projected image embedding -> 4 tokens) and ip-adapter-plus(-face)_sdxl_vit-h (a perceiver resampler
over the encoder's penultimate hidden states -> 16 tokens). h94/IP-Adapter-FaceID's SDXL files load too:
ip-adapter-faceid_sdxl (IPAdapterFaceIDImageProjection: an insightface face embedding -> 4 tokens) and
ip-adapter-faceid-plus(v2)_sdxl (IPAdapterFaceIDPlusImageProjection: those tokens refined by a resampler over
the CLIP hidden states set as its `clip_embeds`); both carry a LoRA for every attention layer, merged through
minsdxl.lora as the adapter "faceid_N" (= diffusers' load_ip_adapter). Only `ip_adapter_image_embeds` drives
them: minsdxl has no insightface. Full-face (SD 1.5) adapters are refused.
"""

import math
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import CheckpointError, _build, load_image_encoder, read_state_dict
from .image import to_tensor
from .image_encoder import preprocess
from .lora import _owned, delete_adapters, get_active_adapters, load_lora_weights, read_lora, set_adapters
from .unet import Attention

# ------------------------------------------------------------------------------------------------
# The image projections (keys = diffusers')


class ImageProjection(nn.Module):
    """ip-adapter_sdxl: image_embeds [B, D] -> [B, tokens, cross_attention_dim]."""

    hidden_states = False  # reads the encoder's projected image_embeds, not its hidden states

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_tokens: int = 4):
        super().__init__()
        self.num_image_text_embeds = num_tokens
        self.image_embeds = nn.Linear(image_embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    @property
    def in_features(self) -> int:  # the image encoder's projection_dim it reads
        return self.image_embeds.in_features

    @property
    def out_features(self) -> int:  # the image tokens' width
        return self.norm.normalized_shape[0]

    def forward(self, x):
        x = self.image_embeds(x.to(self.image_embeds.weight.dtype))
        return self.norm(x.reshape(x.shape[0], self.num_image_text_embeds, -1))


class _GELU(nn.Module):
    """diffusers' GELU activation module: proj, then exact gelu (key net.0.proj)."""

    def __init__(self, dim: int, inner: int, bias: bool = False):
        super().__init__()
        self.proj = nn.Linear(dim, inner, bias=bias)

    def forward(self, x):
        return F.gelu(self.proj(x))


class _FeedForward(nn.Module):
    """diffusers' FeedForward(activation_fn="gelu"): dim -> inner -> out (default dim)."""

    def __init__(self, dim: int, inner: int, out: int | None = None, bias: bool = False):
        super().__init__()
        self.net = nn.ModuleList([_GELU(dim, inner, bias), nn.Dropout(0.0), nn.Linear(inner, out or dim, bias=bias)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class ResamplerBlock(nn.Module):
    """= diffusers IPAdapterPlusImageProjectionBlock: the latents attend to [image tokens, latents]."""

    def __init__(self, dim: int, heads: int, ff_inner: int):
        super().__init__()
        self.ln0 = nn.LayerNorm(dim)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, inner=heads * 64, out_bias=False)
        self.ff = nn.Sequential(nn.LayerNorm(dim), _FeedForward(dim, ff_inner))

    def forward(self, x, latents):
        q = self.ln1(latents)
        latents = self.attn(q, torch.cat([self.ln0(x), q], dim=-2)) + latents
        return self.ff(latents) + latents


class IPAdapterPlusImageProjection(nn.Module):
    """ip-adapter-plus: the encoder's penultimate hidden states [B, 257, width] -> [B, queries, output dim]
    through `depth` perceiver blocks over learned latents (diffusers' names; sizes read off the weights)."""

    hidden_states = True

    def __init__(self, embed_dims, output_dims, hidden_dims, depth, heads, num_queries, ff_inner):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, num_queries, hidden_dims))
        self.proj_in = nn.Linear(embed_dims, hidden_dims)
        self.proj_out = nn.Linear(hidden_dims, output_dims)
        self.norm_out = nn.LayerNorm(output_dims)
        self.layers = nn.ModuleList(ResamplerBlock(hidden_dims, heads, ff_inner) for _ in range(depth))

    @property
    def in_features(self) -> int:  # the image encoder's hidden_size it reads
        return self.proj_in.in_features

    @property
    def out_features(self) -> int:  # the image tokens' width
        return self.norm_out.normalized_shape[0]

    def forward(self, x):
        return _resample(self, self.proj_in(x), self.latents.repeat(x.shape[0], 1, 1))


def _resample(proj, x, latents):
    """The perceiver blocks of a Plus / FaceID Plus projection: `latents` attend to the projected
    image tokens `x`, then proj_out and norm_out."""
    for block in proj.layers:
        latents = block(x, latents)
    return proj.norm_out(proj.proj_out(latents))


class IPAdapterFaceIDImageProjection(nn.Module):
    """ip-adapter-faceid_sdxl (= diffusers IPAdapterFaceIDImageProjection): an insightface face embedding
    [B, 512] -> FeedForward (exact gelu, biases) -> [B, tokens, width] -> LayerNorm. Reads no image encoder."""

    face_id = True
    hidden_states = False
    in_features = None  # no image encoder feature

    def __init__(self, id_dim: int, inner: int, cross_attention_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.ff = _FeedForward(id_dim, inner, cross_attention_dim * num_tokens, bias=True)
        self.norm = nn.LayerNorm(cross_attention_dim)

    @property
    def id_features(self) -> int:  # the face embedding's width (insightface: 512)
        return self.ff.net[0].proj.in_features

    @property
    def out_features(self) -> int:
        return self.norm.normalized_shape[0]

    def forward(self, x):
        x = self.ff(x.to(self.norm.weight.dtype))
        return self.norm(x.reshape(-1, self.num_tokens, self.out_features))


class IPAdapterFaceIDPlusImageProjection(nn.Module):
    """ip-adapter-faceid-plus(v2)_sdxl (= diffusers IPAdapterFaceIDPlusImageProjection): the face embedding
    [B, 512] -> `num_tokens` normed tokens, which then attend through perceiver blocks to the image encoder's
    penultimate hidden states, set beforehand as the attribute `clip_embeds` ([rows, images, 257, 1280], one
    row per UNet batch row, as diffusers' prepare_ip_adapter_image_embeds makes them). Plus v2:
    `shortcut = True` adds those tokens back, the resampler's output scaled by `shortcut_scale`."""

    face_id = True
    hidden_states = True  # clip_embeds are the encoder's hidden states (ip_adapter_image makes them)

    def __init__(self, id_dim, id_inner, embed_dims, num_tokens, hidden_dims, output_dims, depth, heads, ff_inner):
        super().__init__()
        self.num_tokens = num_tokens
        self.clip_embeds = None  # diffusers' attributes, set by the user
        self.shortcut = False
        self.shortcut_scale = 1.0
        self.proj = _FeedForward(id_dim, id_inner, embed_dims * num_tokens, bias=True)
        self.norm = nn.LayerNorm(embed_dims)
        self.proj_in = nn.Linear(hidden_dims, embed_dims)
        self.proj_out = nn.Linear(embed_dims, output_dims)
        self.norm_out = nn.LayerNorm(output_dims)
        self.layers = nn.ModuleList(ResamplerBlock(embed_dims, heads, ff_inner) for _ in range(depth))

    @property
    def id_features(self) -> int:
        return self.proj.net[0].proj.in_features

    @property
    def in_features(self) -> int:  # the image encoder's hidden_size clip_embeds have
        return self.proj_in.in_features

    @property
    def out_features(self) -> int:
        return self.norm_out.normalized_shape[0]

    def forward(self, id_embeds):
        clip = self.clip_embeds
        if not isinstance(clip, torch.Tensor) or clip.ndim != 4:
            raise ValueError(_CLIP_EMBEDS.format(i="i", width=self.in_features))
        w = self.proj_in.weight
        ids = self.proj(id_embeds.to(w.dtype))
        ids = self.norm(ids.reshape(-1, self.num_tokens, self.norm.normalized_shape[0]))
        x = self.proj_in(clip.to(device=w.device, dtype=w.dtype)).flatten(0, 1)
        if x.shape[0] != ids.shape[0]:  # diffusers fails in the attention's concatenation
            raise ValueError(
                f"a FaceID Plus adapter's clip_embeds hold {clip.shape[0]} rows x {clip.shape[1]} images for "
                f"{ids.shape[0]} face embeddings: give one row per row of the UNet batch (under guidance the "
                "negative half, then the positive; prompts x num_images_per_prompt rows each), the images as in "
                "ip_adapter_image_embeds"
            )
        out = _resample(self, x, ids)
        return ids + self.shortcut_scale * out if self.shortcut else out


_CLIP_EMBEDS = (
    "a FaceID Plus adapter needs the face image's CLIP hidden states: set "
    "model.unet.encoder_hid_proj.image_projection_layers[{i}].clip_embeds to a [rows, faces, tokens, {width}] "
    "tensor, one row per row of the UNet batch (= diffusers' prepare_ip_adapter_image_embeds; with the image "
    "encoder loaded and one adapter: minsdxl.ip_adapter.image_embeds(model, [face_image], None, "
    "num_images_per_prompt, True, prompts * num_images_per_prompt, device)[0]), and .shortcut = True for Plus v2"
)


class MultiIPAdapterImageProjection(nn.Module):
    """The UNet's `encoder_hid_proj` with adapters loaded: one projection per adapter."""

    def __init__(self, layers):
        super().__init__()
        self.image_projection_layers = nn.ModuleList(layers)
        # FaceID adapters' LoRAs (names in minsdxl.lora) and the adapters active before they were loaded,
        # {name: weight}: unload_ip_adapter removes the first and brings back the second
        self.loras: list[str] = []
        self.active_before: dict = {}

    def forward(self, image_embeds: list) -> list:
        """One [B, images, dim] (or [B, images, tokens, dim]) per adapter -> [B, images, tokens, width] each."""
        if not isinstance(image_embeds, (list, tuple)) or len(image_embeds) != len(self.image_projection_layers):
            n = len(image_embeds) if isinstance(image_embeds, (list, tuple)) else "a tensor"
            raise ValueError(
                f"image_embeds: got {n}, need a list of one tensor per loaded IP-Adapter "
                f"({len(self.image_projection_layers)})"
            )
        out = []
        for e, proj in zip(image_embeds, self.image_projection_layers):
            b, n = e.shape[:2]
            y = proj(e.reshape(b * n, *e.shape[2:]))
            out.append(y.reshape(b, n, *y.shape[1:]))
        return out


class IPAdapterLayer(nn.Module):
    """One cross-attention's image k/v projections, one pair per adapter, and the adapters' scales
    (diffusers' IPAdapterAttnProcessor2_0 state; it sits at attn2.processor)."""

    def __init__(self, dim: int, context_dim: int, adapters: int):
        super().__init__()
        self.to_k_ip = nn.ModuleList(nn.Linear(context_dim, dim, bias=False) for _ in range(adapters))
        self.to_v_ip = nn.ModuleList(nn.Linear(context_dim, dim, bias=False) for _ in range(adapters))
        self.scale = [1.0] * adapters

    def project(self, tokens: list, masks=None) -> tuple:
        """Each adapter's image tokens [B, images, tokens, width] -> (k, v, scale, mask) for Attention
        (= IPAdapterAttnProcessor2_0). Without a mask all of an adapter's images' tokens are attended to
        together (diffusers views them as one sequence); with a mask ([1, images, H, W]) each image
        separately, its output kept inside its region, with its own scale when the adapter's scale is a
        list. An adapter whose scales are all 0 is left out, as diffusers skips it."""
        out = []
        for a, (t, s, to_k, to_v) in enumerate(zip(tokens, self.scale, self.to_k_ip, self.to_v_ip)):
            mask = None if masks is None else masks[a]
            if all(x == 0 for x in (s if isinstance(s, list) else [s])):
                continue
            if mask is None:
                t = t.flatten(1, -2)
                out.append((to_k(t), to_v(t), s, None))
                continue
            for i, si in enumerate(s if isinstance(s, list) else [s] * t.shape[1]):
                out.append((to_k(t[:, i]), to_v(t[:, i]), si, RegionMask(mask[:, i])))
        return tuple(out)


class RegionMask:
    """One image prompt's region, [1, H, W] in {0, 1}, resized to an attention's query grid when
    called (= IPAdapterMaskProcessor.downsample): the grid's height from the number of queries and the
    mask's aspect ratio, bicubic, flattened, padded or cut to the queries (with diffusers' warning)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        """[B, queries, width] queries -> [B, queries, 1] weights in q's dtype."""
        batch, n = q.shape[:2]
        h, w = self.mask.shape[1:]
        mh = int(math.sqrt(n / (w / h)))
        mh = mh + int(n % mh != 0)
        m = F.interpolate(self.mask[None], size=(mh, n // mh), mode="bicubic")[0]
        m = m.repeat(batch, 1, 1) if m.shape[0] < batch else m
        m = m.reshape(m.shape[0], -1)
        if m.shape[1] != n:
            warnings.warn(
                "The aspect ratio of the mask does not match the aspect ratio of the output image. "
                "Please update your masks or adjust the output size for optimal performance.",
                UserWarning,
                stacklevel=2,
            )
            m = F.pad(m, (0, n - m.shape[1])) if m.shape[1] < n else m[:, :n]
        return m[:, :, None].to(dtype=q.dtype, device=q.device)


def preprocess_masks(masks, height: int, width: int) -> torch.Tensor:
    """IP-Adapter region masks (PIL images, arrays or tensors; white = the image prompt's region) ->
    [n, 1, height, width] in {0, 1} (= diffusers' IPAdapterMaskProcessor().preprocess). For one adapter
    with n images pass `[m.reshape(1, n, height, width)]` as cross_attention_kwargs["ip_adapter_masks"]."""
    return to_tensor(masks, height, width, mask=True)


# ------------------------------------------------------------------------------------------------
# Reading an adapter file (the original IP-Adapter layout) into diffusers' names

# the original Resampler's names -> IPAdapterPlusImageProjection's (= diffusers
# _convert_ip_adapter_image_proj_to_diffusers); to_kv is split into to_k, to_v
_PLUS_NAMES = (
    (r"layers\.(\d+)\.0\.norm1\.", r"layers.\1.ln0."),
    (r"layers\.(\d+)\.0\.norm2\.", r"layers.\1.ln1."),
    (r"layers\.(\d+)\.0\.to_(q|kv)\.", r"layers.\1.attn.to_\2."),
    (r"layers\.(\d+)\.0\.to_out\.", r"layers.\1.attn.to_out.0."),
    (r"layers\.(\d+)\.1\.0\.", r"layers.\1.ff.0."),
    (r"layers\.(\d+)\.1\.1\.", r"layers.\1.ff.1.net.0.proj."),
    (r"layers\.(\d+)\.1\.3\.", r"layers.\1.ff.1.net.2."),
)


def _split(sd: dict, name: str) -> tuple[dict, dict]:
    """A file's tensors -> (image_proj, ip_adapter): nested dicts (the original .bin) or flat
    `image_proj.*` / `ip_adapter.*` keys (the .safetensors files)."""
    if isinstance(sd.get("image_proj"), dict) and isinstance(sd.get("ip_adapter"), dict):
        return sd["image_proj"], sd["ip_adapter"]
    parts = ({}, {})
    for k, v in sd.items():
        for i, prefix in enumerate(("image_proj.", "ip_adapter.")):
            if k.startswith(prefix):
                parts[i][k[len(prefix) :]] = v
    if not (parts[0] and parts[1]):
        raise CheckpointError(
            f"{name} is not an IP-Adapter file: it has no image_proj.* and ip_adapter.* weights (an IP-Adapter "
            "is e.g. h94/IP-Adapter's sdxl_models/ip-adapter_sdxl.safetensors)"
        )
    return parts


def _resampler(p: dict) -> dict:
    """A Resampler's weights in the original names -> diffusers' (to_kv split into to_k, to_v)."""
    sd = {}
    for k, v in p.items():
        for pattern, repl in _PLUS_NAMES:
            k = re.sub("^" + pattern, repl, k)
        if ".to_kv." in k:
            sd[k.replace(".to_kv.", ".to_k.")], sd[k.replace(".to_kv.", ".to_v.")] = v.chunk(2)
        else:
            sd[k] = v
    return sd


def _blocks(sd: dict) -> dict:
    """A resampler's depth, heads (64 wide, as diffusers assumes) and feed-forward width, off its weights."""
    depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    return dict(
        depth=depth,
        heads=sd["layers.0.attn.to_q.weight"].shape[0] // 64 if depth else 1,
        ff_inner=sd["layers.0.ff.1.net.0.proj.weight"].shape[0] if depth else 1,
    )


def _ff(key: str, prefix: str) -> str:
    """The original Sequential(Linear, GELU, Linear) `proj.0` / `proj.2` -> FeedForward's `net.0.proj` / `net.2`."""
    return re.sub(r"^proj\.2\.", prefix + "net.2.", re.sub(r"^proj\.0\.", prefix + "net.0.proj.", key))


def _need(p: dict, keys, what: str, name: str) -> None:
    missing = [k for k in keys if k not in p]
    if missing:
        raise CheckpointError(f"{name} looks like {what} file but its image_proj has no {missing}: it is damaged")


def _projection(p: dict, name: str, dtype, device) -> nn.Module:
    """The adapter's image projection, its kind told by its keys in diffusers' order
    (_convert_ip_adapter_image_proj_to_diffusers), its sizes read off the weights' shapes."""
    if "proj.weight" in p:  # 4 tokens, as diffusers assumes for this kind
        sd = {("image_embeds." + k[5:] if k.startswith("proj.") else k): v for k, v in p.items()}
        w = sd["image_embeds.weight"]
        make = lambda _: ImageProjection(w.shape[1], w.shape[0] // 4)  # noqa: E731
    elif "proj.3.weight" in p:
        raise CheckpointError(
            f"{name} is an IP-Adapter full-face (SD 1.5) file; minsdxl supports the SDXL IP-Adapter, Plus and FaceID "
            "kinds"
        )
    elif "perceiver_resampler.proj_in.weight" in p:  # FaceID Plus (v2: the same weights, shortcut=True)
        _need(p, ("proj.0.weight", "proj.2.weight", "norm.weight"), "an IP-Adapter FaceID Plus", name)
        prefix = "perceiver_resampler."
        sd = {_ff(k, "proj."): v for k, v in p.items() if not k.startswith(prefix)}
        sd |= _resampler({k[len(prefix) :]: v for k, v in p.items() if k.startswith(prefix)})
        embed = sd["norm.weight"].shape[0]
        sizes = dict(
            id_dim=p["proj.0.weight"].shape[1],
            id_inner=p["proj.0.weight"].shape[0],
            embed_dims=embed,
            num_tokens=p["proj.2.weight"].shape[0] // embed,  # diffusers' fixed 4 (ProjPlusModel's)
            hidden_dims=sd["proj_in.weight"].shape[1],
            output_dims=sd["proj_out.weight"].shape[0],
            **_blocks(sd),
        )
        make = lambda _: IPAdapterFaceIDPlusImageProjection(**sizes)  # noqa: E731
    elif "norm.weight" in p:  # FaceID: tokens = proj.2's rows / the width, as diffusers reads them
        _need(p, ("proj.0.weight", "proj.2.weight"), "an IP-Adapter FaceID", name)
        sd = {_ff(k, "ff."): v for k, v in p.items()}
        (inner, id_dim), width = p["proj.0.weight"].shape, p["norm.weight"].shape[0]
        tokens = p["proj.2.weight"].shape[0] // width
        make = lambda _: IPAdapterFaceIDImageProjection(id_dim, inner, width, tokens)  # noqa: E731
    elif "latents" in p and "proj_in.weight" in p:
        sd = _resampler(p)
        sizes = dict(
            embed_dims=sd["proj_in.weight"].shape[1],
            output_dims=sd["proj_out.weight"].shape[0],
            hidden_dims=sd["latents"].shape[2],
            num_queries=sd["latents"].shape[1],
            **_blocks(sd),
        )
        make = lambda _: IPAdapterPlusImageProjection(**sizes)  # noqa: E731
    else:
        raise CheckpointError(f"{name}: its image_proj weights are not an IP-Adapter projection minsdxl knows")
    return _build(make, None, sd, "IP-Adapter image projection", dtype, device)


def _cross_attentions(unet) -> list:
    """[(name, attn2)] in diffusers' attn_processors order, which numbers an adapter file's layers:
    down blocks, then up blocks, then the mid block (UNet2DConditionModel registers mid_block last)."""
    group = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}
    named = [(n, m) for n, m in unet.named_modules() if n.endswith(".attn2")]
    return sorted(named, key=lambda nm: group[nm[0].split(".")[0]])


def _read(source, subfolder, weight_name) -> tuple[dict, str]:
    if isinstance(source, dict):
        return source, "the state dict"
    path = Path(source) / (subfolder or "")
    if weight_name:
        path = path / weight_name
    elif path.is_dir():
        raise ValueError(f"{path} is a folder: pass weight_name= (e.g. 'ip-adapter_sdxl.safetensors')")
    if not path.is_file():
        raise CheckpointError(
            f"no IP-Adapter file at {path}. minsdxl never downloads: fetch it first, e.g. `huggingface-cli download "
            "h94/IP-Adapter --include 'sdxl_models/*' --local-dir IP-Adapter`"
        )
    return read_state_dict(path), str(path)


def _as_list(x, n):
    x = list(x) if isinstance(x, (list, tuple)) else [x]
    return x * n if len(x) == 1 else x


def load_ip_adapter(
    model, pretrained_model_name_or_path_or_dict, subfolder=None, weight_name=None, image_encoder_folder="image_encoder"
) -> None:
    """= diffusers' pipeline.load_ip_adapter for local files: one adapter, or several (lists of paths,
    subfolders, weight names). A path is a folder (with subfolder / weight_name, as on the Hub), a file,
    or a state dict. Loading replaces adapters loaded before. The CLIP image encoder is loaded too,
    unless the model has one: from `image_encoder_folder` under the subfolder (a name without "/") or
    under the path (with "/", e.g. "models/image_encoder" for h94/IP-Adapter's ViT-H adapters), or an
    absolute path; None loads none (then pass ip_adapter_image_embeds=). Weights take the UNet's dtype
    and device. A FaceID file's LoRA is merged as the LoRA adapter "faceid_<its index>", which (as in
    diffusers' set_adapters there) is then the only active LoRA; unload_ip_adapter, or loading other
    adapters, removes it again. Raises before changing the model if anything does not fit."""
    unet = model.unet
    names = _as_list(weight_name, 1)
    sources = _as_list(pretrained_model_name_or_path_or_dict, len(names))
    subfolders = _as_list(subfolder, len(names))
    if not len(sources) == len(subfolders) == len(names):
        raise ValueError("weight_name, subfolder and the paths must be lists of the same length (or single values)")
    dtype, device = unet.dtype, unet.device
    attns = _cross_attentions(unet)
    projections, layers, loras = [], [dict() for _ in attns], {}
    for source, sub, weight in zip(sources, subfolders, names):
        sd, name = _read(source, sub, weight)
        proj_sd, ip_sd = _split(sd, name)
        lora = {k: v for k, v in ip_sd.items() if _LORA_KEY.match(k)}
        ip_sd = {k: v for k, v in ip_sd.items() if k not in lora}
        proj = _projection(proj_sd, name, dtype, device)
        width = proj.out_features
        if width != unet.config.cross_attention_dim:
            raise CheckpointError(
                f"{name} makes {width}-wide image tokens but this UNet's cross-attention takes "
                f"{unet.config.cross_attention_dim}: it is an adapter for another model (SD 1.5: 768, SDXL: 2048)"
            )
        expected = {f"{2 * j + 1}.to_{kv}_ip.weight" for j in range(len(attns)) for kv in "kv"}
        if set(ip_sd) != expected:
            found = len({k.split(".")[0] for k in ip_sd})
            raise CheckpointError(
                f"{name} has image k/v weights for {found} cross-attention layers but this UNet has "
                f"{len(attns)} (SDXL base: 70, SD 1.5: 16): it is not an adapter for this model"
            )
        for j, (_, attn) in enumerate(attns):
            for kv in "kv":
                w = ip_sd[f"{2 * j + 1}.to_{kv}_ip.weight"]
                if tuple(w.shape) != (attn.to_q.out_features, width):
                    raise CheckpointError(
                        f"{name}: {2 * j + 1}.to_{kv}_ip.weight has shape {tuple(w.shape)}, this UNet's layer needs "
                        f"{(attn.to_q.out_features, width)}"
                    )
                layers[j][f"to_{kv}_ip.{len(projections)}.weight"] = w
        if lora:  # = diffusers: the LoRA of adapter k is "faceid_k"
            loras[f"faceid_{len(projections)}"] = _faceid_lora(model, lora, attns, name)
        projections.append(proj)

    encoder = model.image_encoder
    if encoder is None and image_encoder_folder is not None:
        if isinstance(sources[0], dict):
            raise ValueError("the image encoder cannot be found from a state dict: pass image_encoder_folder=None")
        folder = Path(image_encoder_folder)
        if not folder.is_absolute():
            root = Path(sources[0]) if Path(sources[0]).is_dir() else Path(sources[0]).parent
            folder = root / folder if "/" in image_encoder_folder else root / (subfolders[0] or "") / folder
        encoder = load_image_encoder(folder, dtype, device)
    for proj, name in zip(projections, names):
        if encoder is not None and proj.in_features is not None:  # plain FaceID reads no encoder
            wants = encoder.config.hidden_size if proj.hidden_states else encoder.config.projection_dim
            if wants != proj.in_features:
                raise CheckpointError(
                    f"IP-Adapter {name or ''} reads {proj.in_features}-wide image features but the image encoder "
                    f"gives {wants}: ip-adapter_sdxl needs sdxl_models/image_encoder (ViT-bigG), the *_vit-h adapters "
                    "models/image_encoder (ViT-H)"
                )

    ours = getattr(unet.encoder_hid_proj, "loras", [])
    taken = [n for n in loras if n in _lora_adapters(model) and n not in ours]
    if taken:
        raise ValueError(
            f"a LoRA named {taken[0]!r} is loaded, and this FaceID adapter's LoRA takes that name: "
            f"minsdxl.delete_adapters(model, {taken[0]!r}) first"
        )
    if loras:
        _owned(model, {("unet", None)})  # a UNet shared with another model carries that model's LoRAs only

    # everything fits: install
    _remove_loras(model)
    model.image_encoder = encoder
    unet.encoder_hid_proj = MultiIPAdapterImageProjection(projections)
    ctx = unet.config.cross_attention_dim
    for (_, attn), sd in zip(attns, layers):
        with torch.device("meta"):  # no throwaway init of ~340 M weights (SDXL base)
            layer = IPAdapterLayer(attn.to_q.out_features, ctx, len(projections))
        layer.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, assign=True)
        attn.processor = layer.eval().requires_grad_(False)
    if loras:
        active = [a for a in _lora_adapters(model).values() if a.active]
        unet.encoder_hid_proj.active_before = {a.name: a.weight for a in active}
    for adapter, lora in loras.items():
        # = diffusers' load_lora_weights(lora, adapter_name=...) + set_adapters([adapter], [1.0]): minsdxl's
        # load_lora_weights, like PEFT's, leaves the adapter just loaded the only active one, at weight 1
        load_lora_weights(model, lora, adapter_name=adapter)
        unet.encoder_hid_proj.loras.append(adapter)


# a FaceID file's LoRA, per attention processor (numbered as its to_k_ip keys are): 0.to_q_lora.down.weight
_LORA_KEY = re.compile(r"^(\d+)\.to_(q|k|v|out)_lora\.(down|up)\.weight$")


def _faceid_lora(model, lora: dict, attns: list, name: str) -> dict:
    """A FaceID file's LoRA keys -> diffusers' old processor-LoRA keys (= UNet2DConditionModel
    _load_ip_adapter_loras), checked against the model by minsdxl.lora.read_lora. diffusers numbers every
    attention processor: each block's attn1, then its attn2 (its to_k_ip is at 2j+1)."""
    processors = [n for a, _ in attns for n in (a[:-1] + "1", a)]
    out = {}
    for k, v in lora.items():
        i, rest = k.split(".", 1)
        if int(i) >= len(processors):
            raise CheckpointError(
                f"{name} has LoRA weights for attention layer {i} but this UNet has {len(processors)}: it is not an "
                "adapter for this model"
            )
        out[f"unet.{processors[int(i)]}.processor.{rest}"] = v
    read_lora(model, out)  # every name and shape checked now, before anything changes
    return out


def _lora_adapters(model) -> dict:
    """minsdxl.lora's loaded adapters by name (without creating its state)."""
    return model.lora.adapters if getattr(model, "lora", None) is not None else {}


def _remove_loras(model) -> None:
    """Remove the FaceID LoRAs load_ip_adapter merged (those still loaded). The LoRAs active before come
    back, with their weights, unless the active set was changed since (set_adapters, another load)."""
    proj, loaded = model.unet.encoder_hid_proj, _lora_adapters(model)
    ours = [n for n in getattr(proj, "loras", []) if n in loaded]
    if not ours:
        return
    before = {n: w for n, w in proj.active_before.items() if n in loaded and n not in ours}
    if before and set(get_active_adapters(model)) <= set(ours):
        set_adapters(model, list(before), list(before.values()))
    delete_adapters(model, ours)
    proj.loras = []


def unload_ip_adapter(model) -> None:
    """= diffusers' unload_ip_adapter: drop the image encoder, the projections and every image k/v; and,
    unlike diffusers (which leaves it merged), a FaceID adapter's LoRA: the weights are as before loading."""
    _remove_loras(model)
    model.image_encoder = None
    model.unet.encoder_hid_proj = None
    for _, attn in _cross_attentions(model.unet):
        attn.processor = None


def _loaded(model) -> list:
    layers = [(n, a.processor) for n, a in _cross_attentions(model.unet) if a.processor is not None]
    if not layers:
        raise ValueError("no IP-Adapter is loaded: minsdxl.load_ip_adapter(model, ...) first")
    return layers


def set_ip_adapter_scale(model, scale) -> None:
    """= diffusers' set_ip_adapter_scale. `scale`: a number for every layer; a dict per block
    (InstantStyle: {"up": {"block_0": [0.0, 1.0, 0.0]}} = style only; blocks left out get 0, a block's
    value is a number or one per attention in it); a list of numbers, one per image of a masked image
    prompt ([[0.7, 0.4]] for one adapter); or a list of those, one per loaded adapter. One value is used
    for every adapter (diffusers refuses it with several loaded)."""
    layers = _loaded(model)
    n = len(layers[0][1].scale)
    scales = scale if isinstance(scale, list) else [scale]
    if len(scales) not in (1, n):
        raise ValueError(f"got {len(scales)} scales for {n} loaded IP-Adapters: pass one, or one per adapter")
    per_layer = [_layer_scales(s, model.unet) for s in scales]
    for name, layer in layers:
        prefix = ".".join(name.split(".")[:4]) if name.startswith(("down", "up")) else "mid_block"
        for i in range(n):
            s = per_layer[i if len(per_layer) > 1 else 0]
            layer.scale[i] = s[prefix] if isinstance(s, dict) else list(s) if isinstance(s, list) else s


def _layer_scales(scale, unet):
    """A number as it is; a list of numbers (one per image, for masked image prompts) as it is; a block
    dict -> {"down_blocks.1.attentions.0": s, ..., "mid_block": s} for every attention (= diffusers
    _maybe_expand_lora_scales with default 0)."""
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    if number(scale):
        return float(scale)
    if isinstance(scale, list) and scale and all(map(number, scale)):
        return [float(x) for x in scale]
    if not isinstance(scale, dict):
        raise TypeError(f"an IP-Adapter scale is a number, a list of numbers or a dict of blocks, got {scale!r}")
    unknown = set(scale) - {"down", "mid", "up"}
    if unknown:
        raise ValueError(f"IP-Adapter scale keys are 'down', 'mid', 'up'; got {sorted(unknown)}")
    mid = scale.get("mid", 0.0)
    if isinstance(mid, list):
        if len(mid) != 1:
            raise ValueError(f"the mid block has one attention: give one scale, got {mid}")
        mid = mid[0]
    out = {"mid_block": float(mid)}
    for part in ("down", "up"):
        blocks = {
            f"block_{i}": len(b.attentions) for i, b in enumerate(getattr(unet, f"{part}_blocks")) if b.attentions
        }
        given = scale.get(part, 0.0)
        given = given if isinstance(given, dict) else dict.fromkeys(blocks, given)
        if set(given) - set(blocks):
            raise ValueError(
                f"{part} blocks with attention are {sorted(blocks)}; got {sorted(set(given) - set(blocks))}"
            )
        for block, count in blocks.items():
            s = given.get(block, 0.0)
            s = s * count if isinstance(s, list) and len(s) == 1 else s if isinstance(s, list) else [s] * count
            if len(s) != count:
                raise ValueError(f"{part}.{block} has {count} attentions: give one scale or {count}, got {len(s)}")
            for j, v in enumerate(s):
                out[f"{part}_blocks.{block[6:]}.attentions.{j}"] = float(v)
    return out


# ------------------------------------------------------------------------------------------------
# The image prompt's embeddings for one sampler call


def encode_image(model, image, hidden_states: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """= the pipelines' encode_image (num_images_per_prompt=1): (embeds, negative embeds) of one
    adapter's image(s). A tensor is taken as CLIP pixel values as it is; anything else goes through
    CLIPImageProcessor's resize / crop / normalize. The negative is the encoder's hidden states of an
    all-zero image for Plus adapters, zeros for the others."""
    enc = model.image_encoder
    if not isinstance(image, torch.Tensor):
        image = preprocess(image, enc.config.image_size)
    image = image.to(device=enc.device, dtype=enc.dtype)
    if hidden_states:
        return enc.penultimate(image), enc.penultimate(torch.zeros_like(image))
    e = enc(image)
    return e, torch.zeros_like(e)


def check_inputs(model, image, embeds) -> None:
    """The sampler's checks of ip_adapter_image / ip_adapter_image_embeds, before any heavy work."""
    if image is None and embeds is None:
        return
    if image is not None and embeds is not None:
        raise ValueError("pass either ip_adapter_image= or ip_adapter_image_embeds=, not both")
    proj = model.unet.encoder_hid_proj
    if proj is None:
        raise ValueError("ip_adapter_image needs an IP-Adapter: call minsdxl.load_ip_adapter(model, ...) first")
    n = len(proj.image_projection_layers)
    given = image if embeds is None else embeds
    count = len(given) if isinstance(given, list) else 1
    if count != n:
        what = "ip_adapter_image" if embeds is None else "ip_adapter_image_embeds"
        raise ValueError(
            f"{what} has {count} entries for {n} loaded IP-Adapters: give one per adapter (several images for "
            "one adapter go in a nested list: [[image_a, image_b]])"
        )
    layers = proj.image_projection_layers
    for i, layer in enumerate(layers):
        if getattr(layer, "face_id", False) and embeds is None:
            raise ValueError(
                f"IP-Adapter {i} is a FaceID adapter: it reads an insightface face embedding, which minsdxl cannot "
                "make from an image. Pass ip_adapter_image_embeds=[...] instead: the face's normed_embedding "
                f"(insightface FaceAnalysis) as a [2, faces, {layer.id_features}] tensor, zeros then the embedding, "
                f"under guidance ([1, faces, {layer.id_features}] without)"
                + (", and set the layer's clip_embeds" if layer.hidden_states else "")
            )
    if embeds is None and model.image_encoder is None:
        raise ValueError(
            "no image encoder is loaded (load_ip_adapter(..., image_encoder_folder=None)): pass "
            "ip_adapter_image_embeds= instead, or load the adapter with its image encoder"
        )
    if embeds is not None:
        if not isinstance(embeds, list):
            raise ValueError(f"ip_adapter_image_embeds must be a list of tensors, got {type(embeds).__name__}")
        for i, (e, layer) in enumerate(zip(embeds, layers)):
            if not isinstance(e, torch.Tensor) or e.ndim not in (3, 4):
                raise ValueError("ip_adapter_image_embeds must be a list of 3D or 4D tensors (one per adapter)")
            if not getattr(layer, "face_id", False):
                continue
            if e.ndim != 3 or e.shape[-1] != layer.id_features:
                raise ValueError(
                    f"ip_adapter_image_embeds[{i}] has shape {tuple(e.shape)}; FaceID adapter {i} takes insightface "
                    f"embeddings [rows, faces, {layer.id_features}] (rows: negative then positive under guidance)"
                )
            clip = layer.clip_embeds if layer.hidden_states else None  # FaceID Plus
            if layer.hidden_states and (not isinstance(clip, torch.Tensor) or clip.shape[-1:] != (layer.in_features,)):
                raise ValueError(_CLIP_EMBEDS.format(i=i, width=layer.in_features))


def check_masks(model, masks, image, embeds) -> list | None:
    """cross_attention_kwargs["ip_adapter_masks"] -> one [1, images, H, W] tensor (or None) per adapter
    (diffusers' older form, one [adapters, 1, H, W] tensor, is taken too); checked before heavy work."""
    if masks is None:
        return None
    if image is None and embeds is None:
        raise ValueError("ip_adapter_masks place image prompts: pass ip_adapter_image= (or ip_adapter_image_embeds=)")
    if isinstance(masks, torch.Tensor):
        masks = list(masks.unsqueeze(1))
    n = len(model.unet.encoder_hid_proj.image_projection_layers)
    if not isinstance(masks, list) or len(masks) != n:
        raise ValueError(f"ip_adapter_masks must be a list of one mask tensor (or None) per loaded IP-Adapter ({n})")
    for m in masks:
        if m is not None and (not isinstance(m, torch.Tensor) or m.ndim != 4 or m.shape[0] != 1):
            raise ValueError(
                "each of ip_adapter_masks is a [1, images, height, width] tensor: make them with "
                "minsdxl.ip_adapter.preprocess_masks(masks, height, width).reshape(1, -1, height, width)"
            )
    return masks


def _check_masks_fit(model, embeds: list, masks) -> None:
    """Masks name one region per image of their adapter, and per-image scales need masks."""
    scales = next(a.processor.scale for _, a in _cross_attentions(model.unet) if a.processor is not None)
    for i, (e, s) in enumerate(zip(embeds, scales)):
        mask = None if masks is None else masks[i]
        if mask is None and isinstance(s, list):
            raise ValueError(
                f"IP-Adapter {i} has one scale per image ({s}), which needs a region per image: pass "
                "cross_attention_kwargs={'ip_adapter_masks': ...}, or set one number with set_ip_adapter_scale"
            )
        if mask is not None and mask.shape[1] != e.shape[1]:
            raise ValueError(f"ip_adapter_masks[{i}] has {mask.shape[1]} masks for {e.shape[1]} images of adapter {i}")
        if mask is not None and isinstance(s, list) and len(s) != mask.shape[1]:
            raise ValueError(f"IP-Adapter {i} has {len(s)} scales for {mask.shape[1]} masked images")


def image_embeds(model, image, embeds, num_images_per_prompt: int, cfg: bool, batch: int, device) -> list | None:
    """= prepare_ip_adapter_image_embeds: one tensor per adapter, [negative, positive] rows under CFG,
    each half `batch` rows. diffusers makes num_images_per_prompt rows per half; with several prompts one
    image prompt is spread over all of them here, which gives diffusers' (0.42) images: each prompt as if
    run alone (tests/test_ip_adapter.py)."""
    if image is None and embeds is None:
        return None
    layers = model.unet.encoder_hid_proj.image_projection_layers
    if embeds is None:
        image = image if isinstance(image, list) else [image]  # = diffusers: one entry per adapter
        pairs = [encode_image(model, im, layer.hidden_states) for im, layer in zip(image, layers)]
        pos, neg = [p[None] for p, _ in pairs], [n[None] for _, n in pairs]
    elif cfg:
        neg, pos = zip(*(e.chunk(2) for e in embeds))
    else:
        pos, neg = embeds, [None] * len(embeds)
    out = []
    for p, n in zip(pos, neg):
        halves = [torch.cat([x] * num_images_per_prompt) for x in ([n, p] if cfg else [p])]
        rows = halves[0].shape[0]
        if rows != batch:
            if rows != num_images_per_prompt:
                raise ValueError(
                    f"ip_adapter_image_embeds give {rows // num_images_per_prompt} image rows per guidance half for "
                    f"{batch // num_images_per_prompt} prompts: give 1 or one per prompt"
                )
            halves = [h[:1].expand(batch, *h.shape[1:]) for h in halves]
        out.append(torch.cat(halves).to(device))
    return out


def image_prompt(model, image, embeds, masks, num_images_per_prompt: int, cfg: bool, batch: int, device):
    """The sampler's (image_embeds, masks) for a call: image_embeds' list and the masks on the device."""
    out = image_embeds(model, image, embeds, num_images_per_prompt, cfg, batch, device)
    if out is None:
        return None, None
    _check_masks_fit(model, out, masks)
    return out, None if masks is None else [None if m is None else m.to(device, torch.float32) for m in masks]
