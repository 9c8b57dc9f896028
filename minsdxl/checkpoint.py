"""Loading SDXL checkpoints: diffusers folders and single-file sgm .safetensors.

Everything is renamed to diffusers' keys, built on the meta device and loaded with assign=True from
memory-mapped safetensors, so peak RAM is about one copy of the weights (none when no dtype change
is needed). The sgm <-> diffusers mapping is ONE table (`sgm_table`), generated from the topology
read off the keys, plus three tensor transforms (VAE attention squeeze, text_projection transpose,
in_proj split; listed above `sgm_topology`, each marked where it is applied); it is used in both
directions (`sgm_to_diffusers`, `diffusers_to_sgm`).
"""

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import layerwise, speed
from . import text_encoder as te
from .config import (
    TAESDConfig,
    UNetConfig,
    VAEConfig,
    VisionConfig,
    taesd_config_from_state_dict,
    text_config_from_state_dict,
    unet_config_from_state_dict,
    vae_config_from_state_dict,
    vision_config_from_state_dict,
)
from .image_encoder import CLIPVisionModelWithProjection
from .schedulers import SDXL_SCHEDULER_CONFIG
from .taesd import AutoencoderTiny
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the problem and the fix."""


def require_model(model, what: str) -> None:
    """A clear error where a function taking a loaded model (minsdxl.load) is given something else."""
    if not isinstance(model, SDXL):
        raise TypeError(f"{what} takes a model loaded by minsdxl.load(path), got {type(model).__name__}: {model!r:.80}")


@dataclass
class SDXL:
    """A loaded SDXL model: the components under diffusers' attribute names, plus what kind it is."""

    unet: torch.nn.Module | None = None
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None  # CLIP-L; None for the refiner
    text_encoder_2: torch.nn.Module | None = None  # OpenCLIP bigG
    tokenizer: object | None = None
    tokenizer_2: object | None = None
    scheduler_config: dict = field(default_factory=dict)
    kind: str = "base"  # "base" | "refiner" | "inpaint" | "instruct_pix2pix" (an 8-channel UNet: image + latents)
    force_zeros_for_empty_prompt: bool = True  # model_index.json; refiner: False
    requires_aesthetics_score: bool = False  # model_index.json; refiner: True
    source: str = ""
    scheduler: str | None = None  # default scheduler name for this model (None: the config's class)
    add_watermarker: bool | None = None  # None: on when invisible-watermark is installed (as diffusers)
    offload_device: str | None = None  # model offload: components wait on the CPU, run here one at a time
    cuda_graphs: bool = False  # compiled with CUDA graphs (minsdxl.compile(mode="reduce-overhead"))
    lora: object | None = field(default=None, repr=False)  # minsdxl.lora.LoRAs once an adapter is loaded
    image_encoder: torch.nn.Module | None = None  # CLIP vision tower, loaded with an IP-Adapter (minsdxl.ip_adapter)
    # = StableDiffusionXLInstructPix2PixPipeline(is_cosxl_edit=True): CosXL Edit's image latents are scaled
    is_cosxl_edit: bool = False

    def to(self, device=None, dtype=None):
        """Move every component; with fp16 the VAE stays fp32 when its config says force_upcast."""
        for name in ("unet", "text_encoder", "text_encoder_2", "vae", "image_encoder"):
            m = getattr(self, name)
            if m is not None:
                m.to(device=device, dtype=_vae_dtype(m.config, dtype) if name == "vae" else dtype)
        return self

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def device(self):
        return self.unet.device


def _vae_dtype(config, dtype):
    # = diffusers' upcast_vae: an fp16 VAE with force_upcast decodes in fp32; we keep it fp32 throughout
    return torch.float32 if dtype == torch.float16 and config.force_upcast else dtype


# ------------------------------------------------------------------------------------------------
# Reading files

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _safetensors_header(path) -> tuple[dict, int]:
    """(the JSON header, its length in bytes) of a .safetensors file, checked against the file size."""
    size = os.path.getsize(path)
    broken = f"{path} is truncated or not a safetensors file"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{broken} ({size} bytes); re-download or re-save it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{broken}: its header claims {n} bytes but the file has {size}; re-download it")
        try:
            return json.loads(f.read(n)), n
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{broken}: the header is not valid JSON ({e}); re-download it") from None


def safetensors_metadata(path) -> dict:
    """The string-to-string `__metadata__` of a .safetensors file ({} when it has none)."""
    return _safetensors_header(str(path))[0].get("__metadata__") or {}


def read_safetensors(path) -> dict:
    """Memory-map a .safetensors file: tensors are views of one private file mapping (pages are read
    on first touch and shared with the page cache), validated against the file size first."""
    path = str(path)
    size = os.path.getsize(path)
    broken = f"{path} is truncated or not a safetensors file"
    header, n = _safetensors_header(path)
    header.pop("__metadata__", None)
    data_start, data_size = 8 + n, size - 8 - n
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size) if size else None
    out = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = _ST_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{broken}: bad header entry for {name!r}; re-download it") from None
        nbytes = dtype.itemsize * _numel(shape)
        if end > data_size or end - begin != nbytes:
            raise CheckpointError(
                f"{broken}: tensor {name!r} needs bytes {begin}..{begin + nbytes} but the file has {data_size} "
                "bytes of data; the download was probably cut short, re-download it"
            )
        raw = torch.empty(0, dtype=torch.uint8).set_(storage, data_start + begin, (nbytes,))
        if (data_start + begin) % dtype.itemsize:
            raw = raw.clone()  # unaligned tensor: copy once so it can be viewed as `dtype`
        out[name] = raw.view(dtype).view(shape)
    return out


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def save_safetensors(sd: dict, path, dtype=None) -> None:
    """Write a .safetensors file one tensor at a time (cast to `dtype` on the way if given; float8 tensors, a
    layer stored narrow (minsdxl.layerwise), stay float8), so saving needs no second copy of the weights in
    memory. Written to a temporary name, then renamed."""
    names = {v: k for k, v in _ST_DTYPES.items()}
    recast = lambda t: dtype is not None and t.is_floating_point() and t.dtype.itemsize > 1  # noqa: E731
    stored = lambda t: dtype if recast(t) else t.dtype  # noqa: E731
    cast = lambda t: t.to(stored(t))  # noqa: E731
    header, offset = {}, 0
    for k, t in sd.items():
        out_dtype = stored(t)
        nbytes = t.numel() * out_dtype.itemsize
        header[k] = {"dtype": names[out_dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # keep the data 8-byte aligned, as the format recommends
    tmp = Path(str(path) + ".part")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for t in sd.values():
            f.write(cast(t).detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)


def read_pickle(path) -> dict:
    """.ckpt / .bin / .pt: only plain tensors are accepted (weights_only=True); never run pickled code."""
    import pickle

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain-tensor PyTorch file ({str(e).splitlines()[0]}). "
            "minsdxl never executes pickled code; convert it to .safetensors with a tool you trust"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def read_state_dict(path) -> dict:
    path = Path(path)
    if path.name.endswith(".safetensors.index.json") or path.name.endswith(".bin.index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        return {k: v for s in shards for k, v in read_state_dict(path.parent / s).items()}
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".ckpt", ".bin", ".pt", ".pth"):
        return read_pickle(path)
    raise CheckpointError(f"{path}: unknown weights format; expected .safetensors (or .ckpt/.bin)")


# ------------------------------------------------------------------------------------------------
# THE key table: sgm (original Stability single file) -> diffusers names


@dataclass(frozen=True)
class Topology:
    """What the table rows depend on, read off either layout's keys."""

    unet_attn: tuple = ()  # per UNet level: has transformer blocks
    unet_layers: int = 2  # resnets per down level (layers_per_block)
    vae_levels: int = 0
    vae_layers: int = 2
    clip_l: int = -1  # sgm conditioner.embedders index of CLIP-L (-1: absent)
    bigg: int = -1  # sgm conditioner.embedders index of OpenCLIP bigG (-1: absent)
    bigg_layers: int = 0


_UNET, _VAE = "model.diffusion_model.", "first_stage_model."
_RESNET = {
    "in_layers.0.": "norm1.",
    "in_layers.2.": "conv1.",
    "emb_layers.1.": "time_emb_proj.",
    "out_layers.0.": "norm2.",
    "out_layers.3.": "conv2.",
    "skip_connection.": "conv_shortcut.",
}
_VAE_RESNET = {
    "nin_shortcut.": "conv_shortcut.",
    "norm1.": "norm1.",
    "conv1.": "conv1.",
    "norm2.": "norm2.",
    "conv2.": "conv2.",
}
_VAE_ATTN = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}
_BIGG_LAYER = {
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
    "attn.out_proj.": "self_attn.out_proj.",
    "attn.in_proj_weight": "self_attn.in_proj_weight",
    "attn.in_proj_bias": "self_attn.in_proj_bias",
}
# older diffusers VAE files name the mid-block attention query/key/value/proj_attn
LEGACY_VAE_ATTN = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def sgm_table(t: Topology) -> dict:
    """Rows `sgm prefix (ending in ".") or full key -> diffusers prefix or full key` (None: drop).
    A key is renamed by its longest matching row."""
    rows = {}

    def block(src, dst, inner=None):
        rows[src] = dst
        for a, b in (inner or {}).items():
            rows[src + a] = dst + b

    u, L = _UNET, t.unet_layers
    for a, b in {
        "time_embed.0.": "time_embedding.linear_1.",
        "time_embed.2.": "time_embedding.linear_2.",
        "label_emb.0.0.": "add_embedding.linear_1.",
        "label_emb.0.2.": "add_embedding.linear_2.",
        "input_blocks.0.0.": "conv_in.",
        "out.0.": "conv_norm_out.",
        "out.2.": "conv_out.",
        "middle_block.1.": "mid_block.attentions.0.",
    }.items():
        block(u + a, "unet." + b)
    if t.unet_attn:
        block(u + "middle_block.0.", "unet.mid_block.resnets.0.", _RESNET)
        block(u + "middle_block.2.", "unet.mid_block.resnets.1.", _RESNET)
    levels = len(t.unet_attn)
    for i, attn in enumerate(t.unet_attn):
        for j in range(L + 1):  # sgm input_blocks.n holds level i = (n-1)//(L+1), slot j = (n-1)%(L+1)
            n = 1 + i * (L + 1) + j
            if j < L:
                block(f"{u}input_blocks.{n}.0.", f"unet.down_blocks.{i}.resnets.{j}.", _RESNET)
                if attn:
                    block(f"{u}input_blocks.{n}.1.", f"unet.down_blocks.{i}.attentions.{j}.")
            elif i < levels - 1:
                block(f"{u}input_blocks.{n}.0.op.", f"unet.down_blocks.{i}.downsamplers.0.conv.")
        up_attn = t.unet_attn[levels - 1 - i]  # output_blocks run the levels in reverse
        for j in range(L + 1):
            m = i * (L + 1) + j
            block(f"{u}output_blocks.{m}.0.", f"unet.up_blocks.{i}.resnets.{j}.", _RESNET)
            if up_attn:
                block(f"{u}output_blocks.{m}.1.", f"unet.up_blocks.{i}.attentions.{j}.")
            if j == L and i < levels - 1:
                block(f"{u}output_blocks.{m}.{2 if up_attn else 1}.conv.", f"unet.up_blocks.{i}.upsamplers.0.conv.")

    v = _VAE
    if t.vae_levels:
        for a in (
            "quant_conv.",
            "post_quant_conv.",
            "encoder.conv_in.",
            "encoder.conv_out.",
            "decoder.conv_in.",
            "decoder.conv_out.",
        ):
            block(v + a, "vae." + a)
        for side in ("encoder", "decoder"):
            block(f"{v}{side}.norm_out.", f"vae.{side}.conv_norm_out.")
            block(f"{v}{side}.mid.block_1.", f"vae.{side}.mid_block.resnets.0.", _VAE_RESNET)
            block(f"{v}{side}.mid.block_2.", f"vae.{side}.mid_block.resnets.1.", _VAE_RESNET)
            block(f"{v}{side}.mid.attn_1.", f"vae.{side}.mid_block.attentions.0.", _VAE_ATTN)
        last = t.vae_levels - 1
        for i in range(t.vae_levels):
            for j in range(t.vae_layers):
                block(f"{v}encoder.down.{i}.block.{j}.", f"vae.encoder.down_blocks.{i}.resnets.{j}.", _VAE_RESNET)
            for j in range(t.vae_layers + 1):  # the decoder's levels are numbered in reverse
                block(f"{v}decoder.up.{i}.block.{j}.", f"vae.decoder.up_blocks.{last - i}.resnets.{j}.", _VAE_RESNET)
            if i < last:
                block(f"{v}encoder.down.{i}.downsample.conv.", f"vae.encoder.down_blocks.{i}.downsamplers.0.conv.")
            if i > 0:
                block(f"{v}decoder.up.{i}.upsample.conv.", f"vae.decoder.up_blocks.{last - i}.upsamplers.0.conv.")

    if t.clip_l >= 0:  # HF CLIPTextModel names already; we keep transformers 5's unprefixed spelling
        p = f"conditioner.embedders.{t.clip_l}.transformer."
        rows[p + "text_model."] = "text_encoder."
        rows[p + "text_model.embeddings.position_ids"] = None  # a buffer, recomputed
    if t.bigg >= 0:
        p, q = f"conditioner.embedders.{t.bigg}.model.", "text_encoder_2.text_model."
        rows[p + "token_embedding."] = q + "embeddings.token_embedding."
        rows[p + "positional_embedding"] = q + "embeddings.position_embedding.weight"
        rows[p + "ln_final."] = q + "final_layer_norm."
        rows[p + "text_projection"] = "text_encoder_2.text_projection.weight"
        rows[p + "logit_scale"] = None
        rows[p + "attn_mask"] = None
        for n in range(t.bigg_layers):
            block(f"{p}transformer.resblocks.{n}.", f"{q}encoder.layers.{n}.", _BIGG_LAYER)
    return rows


def _split_qkv(key, x):
    base = key.rsplit(".", 1)[0] + "."
    kind = "weight" if key.endswith("in_proj_weight") else "bias"
    return {f"{base}{n}_proj.{kind}": t for n, t in zip("qkv", x.chunk(3, dim=0))}


def _fuse_qkv(keys_to_tensors):
    return torch.cat(keys_to_tensors, dim=0)


def _is_vae_attn_weight(key):
    return key.startswith("vae.") and ".mid_block.attentions.0.to_" in key and key.endswith("weight")


# Named tensor transforms applied after renaming (sgm -> diffusers); each has its inverse.
#  - VAE mid attention: sgm 1x1 convs [c, c, 1, 1] <-> diffusers Linear [c, c]
#  - open_clip text_projection is applied as x @ P; a Linear computes x @ W^T: transpose
#  - open_clip's fused attn.in_proj_{weight,bias} [3d, ...] <-> q_proj / k_proj / v_proj (order q, k, v)


def sgm_topology(keys) -> Topology:
    keys = list(keys)
    has = lambda p: any(k.startswith(p) for k in keys)  # noqa: E731
    L = 0
    while has(f"{_UNET}input_blocks.{L + 1}.0.in_layers."):
        L += 1  # stops at the first downsample slot
    attn, i = [], 0
    while has(f"{_UNET}input_blocks.{1 + i * (L + 1)}.0."):
        attn.append(has(f"{_UNET}input_blocks.{1 + i * (L + 1)}.1."))
        i += 1
    vae_levels = 0
    while has(f"{_VAE}encoder.down.{vae_levels}."):
        vae_levels += 1
    vae_layers = 0
    while has(f"{_VAE}encoder.down.0.block.{vae_layers}."):
        vae_layers += 1
    clip_l = next((e for e in range(3) if has(f"conditioner.embedders.{e}.transformer.")), -1)
    bigg = next((e for e in range(3) if has(f"conditioner.embedders.{e}.model.")), -1)
    bigg_layers = 0
    while bigg >= 0 and has(f"conditioner.embedders.{bigg}.model.transformer.resblocks.{bigg_layers}."):
        bigg_layers += 1
    return Topology(tuple(attn), L, vae_levels, vae_layers, clip_l, bigg, bigg_layers)


def diffusers_topology(components: dict) -> Topology:
    """The same Topology from diffusers-named component state dicts {"unet": sd, "vae": sd, ...}."""
    unet, vae = components.get("unet", {}), components.get("vae", {})
    attn, i = [], 0
    while any(k.startswith(f"down_blocks.{i}.") for k in unet):
        attn.append(any(k.startswith(f"down_blocks.{i}.attentions.") for k in unet))
        i += 1
    count = lambda sd, p: sum(1 for n in range(64) if any(k.startswith(f"{p}{n}.") for k in sd))  # noqa: E731
    te2 = components.get("text_encoder_2")
    has_l = components.get("text_encoder") is not None
    return Topology(
        tuple(attn),
        count(unet, "down_blocks.0.resnets."),
        count(vae, "encoder.down_blocks."),
        count(vae, "encoder.down_blocks.0.resnets."),
        0 if has_l else -1,
        (1 if has_l else 0) if te2 is not None else -1,
        count(te2 or {}, "text_model.encoder.layers."),
    )


def _rename(key: str, rows: dict):
    """Longest matching row; returns (new key, matched) where new key None means 'drop'."""
    if key in rows:
        return rows[key], True
    i = len(key)
    while (i := key.rfind(".", 0, i)) > 0:
        p = key[: i + 1]
        if p in rows:
            return (None if rows[p] is None else rows[p] + key[i + 1 :]), True
    return None, False


COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_SGM_PREFIXES = (_UNET, _VAE, "conditioner.embedders.")


def sgm_to_diffusers(sd: dict) -> tuple[dict, list]:
    """sgm single-file state dict -> ({component: diffusers-named state dict}, unmapped sgm keys).
    Keys outside the model's prefixes (model_ema.*, denoiser.*, ...) are ignored."""
    rows = sgm_table(sgm_topology(sd))
    out, unmapped = {}, []
    for key, t in sd.items():
        new, matched = _rename(key, rows)
        if not matched:
            if key.startswith(_SGM_PREFIXES):
                unmapped.append(key)
            continue
        if new is None:
            continue
        if _is_vae_attn_weight(new) and t.ndim == 4:
            t = t[:, :, 0, 0]  # vae_attn_squeeze
        if new == "text_encoder_2.text_projection.weight":
            t = t.T  # text_projection_transpose
        parts = _split_qkv(new, t) if new.endswith(("in_proj_weight", "in_proj_bias")) else {new: t}
        for k, v in parts.items():
            comp, rest = k.split(".", 1)
            out.setdefault(comp, {})[rest] = v
    return out, unmapped


_CONTROL = "control_model."


def controlnet_table(t: Topology, hint_convs: int) -> dict:
    """The original ControlNet layout (control_model.*) -> diffusers ControlNetModel names: sgm_table's
    UNet rows (the encoder half's are the ones a ControlNet's keys meet) under control_model., and the
    ControlNet's own convs: input_hint_block's convs (SiLU between: indices 0, 2, 4, ...), zero_convs
    (one per skip) and middle_block_out."""
    rows = {_CONTROL + k[len(_UNET) :]: v[len("unet.") :] for k, v in sgm_table(t).items() if k.startswith(_UNET)}
    hint, emb = _CONTROL + "input_hint_block.", "controlnet_cond_embedding."
    rows[hint + "0."] = emb + "conv_in."
    for k in range(1, hint_convs - 1):
        rows[f"{hint}{2 * k}."] = f"{emb}blocks.{k - 1}."
    rows[f"{hint}{2 * (hint_convs - 1)}."] = emb + "conv_out."
    for n in range(1 + len(t.unet_attn) * (t.unet_layers + 1)):
        rows[f"{_CONTROL}zero_convs.{n}.0."] = f"controlnet_down_blocks.{n}."
    rows[_CONTROL + "middle_block_out.0."] = "controlnet_mid_block."
    return rows


def ldm_controlnet_to_diffusers(sd: dict) -> dict:
    """A ControlNet file in the original layout (with or without the control_model. prefix) -> diffusers
    ControlNetModel keys; any other state dict is returned as it is."""
    if not any(k.startswith(("input_hint_block.", _CONTROL + "input_hint_block.")) for k in sd):
        return sd
    sd = {k if k.startswith(_CONTROL) else _CONTROL + k: v for k, v in sd.items()}
    hint_convs = 0  # convs at 0, 2, ..., 2(n-1); SiLUs (no weights) between
    while f"{_CONTROL}input_hint_block.{2 * hint_convs}.weight" in sd:
        hint_convs += 1
    t = sgm_topology(_UNET + k[len(_CONTROL) :] for k in sd)
    rows = controlnet_table(t, hint_convs)
    out, unmapped = {}, []
    for key, v in sd.items():
        new, matched = _rename(key, rows)
        if not matched:
            unmapped.append(key)
        elif new is not None:
            out[new] = v
    if unmapped:
        raise CheckpointError(
            f"{len(unmapped)} keys of this ControlNet have no known diffusers name ({_few(unmapped)}); it is "
            "not an SDXL ControlNet in the original layout that minsdxl understands"
        )
    return out


def diffusers_table(components: dict) -> dict:
    """sgm_table inverted (diffusers prefix or key -> sgm), for the topology of diffusers-named state dicts."""
    return {v: k for k, v in sgm_table(diffusers_topology(components)).items() if v is not None}


def diffusers_to_sgm(components: dict) -> dict:
    """The inverse: {component: diffusers-named state dict} -> one sgm single-file state dict."""
    rows = diffusers_table(components)
    out = {}
    for comp, sd in components.items():
        if sd is None:
            continue
        for key, t in sd.items():
            full = f"{comp}.{key}"
            if (
                full.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias"))
                and comp == "text_encoder_2"
            ):
                continue  # fused with q below
            if comp == "text_encoder_2" and full.endswith(("q_proj.weight", "q_proj.bias")):
                kind = full.rsplit(".", 1)[1]
                stem = full[: -len(f"q_proj.{kind}")]
                t = _fuse_qkv([sd[(stem + f"{n}_proj.{kind}").split(".", 1)[1]] for n in "qkv"])
                full = stem + f"in_proj_{kind}"
            if comp == "text_encoder" and key == "embeddings.position_ids":
                continue
            new, matched = _rename(full, rows)
            if not matched or new is None:
                raise KeyError(f"no sgm name for {full}")
            if _is_vae_attn_weight(full) and t.ndim == 2:
                t = t[:, :, None, None]
            if full == "text_encoder_2.text_projection.weight":
                t = t.T
            out[new] = t.contiguous()
    return out


# ------------------------------------------------------------------------------------------------
# Building models


def check_placement(dtype, device, what: str) -> None:
    """dtype= (a floating torch dtype, or None: as stored) and device= (a torch device that exists), named."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(
            f"{what}: dtype must be a floating torch dtype (torch.float32, float16, bfloat16), got {dtype!r}"
        )
    if dtype is not None and dtype.itemsize == 1:  # no kernel computes in float8: it is a storage format here
        raise ValueError(
            f"{what}: dtype={dtype} is the dtype the model computes in (torch.float32, float16, bfloat16); to store "
            f"the UNet's weights in float8 pass dtype=torch.bfloat16 (or float32) and storage_dtype={dtype}"
        )
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{what}: device {device!r} is not a torch device (cpu, cuda, cuda:1, mps): {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what}: device {device!r}, but torch finds no CUDA GPU here; use device='cpu'")


def _build(cls, cfg, sd: dict, name: str, dtype, device, storage_dtype=None):
    """Build `cls(cfg)` on the meta device and load `sd` into it with assign=True, after checking
    names and shapes (errors name every missing/unexpected key and both shapes of a mismatch).
    storage_dtype: the layers layerwise.enable casts are stored in it (computed in `dtype`)."""
    try:
        with torch.device("meta"):
            model = cls(cfg)
    except ValueError as e:  # (GroupNorm: channels not divisible by groups) a config that does not fit
        raise CheckpointError(
            f"the {name} cannot be built from its config ({e}): a checkpoint of other than SDXL's sizes needs its "
            "config.json files (a diffusers folder's, or config=DIR / --model-config DIR for a single file)"
        ) from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{name} weights do not match an SDXL {name}: "
            + (f"missing {len(missing)} keys ({_few(missing)})" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {len(unexpected)} keys ({_few(unexpected)})" if unexpected else "")
            + ". Is this the right file for this component?"
        )
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{name} weight {k} has shape {tuple(sd[k].shape)} in the checkpoint but the model built from "
                f"its config expects {tuple(v.shape)}; the checkpoint is not an SDXL {name} or is damaged"
            )
    narrow = set()
    # tensor by tensor (a whole model in `dtype` never exists); each via `dtype` first, as diffusers rounds it
    # (loaded in the compute dtype, then cast)
    if storage_dtype is not None:
        layerwise.check(storage_dtype, dtype, f"the {name}'s storage_dtype")
        narrow = {f"{n}.{p}" for n in layerwise.targets(model) for p in ("weight", "bias")}
    sd = {k: _placed(t, device, dtype, storage_dtype if k in narrow else None) for k, t in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    if storage_dtype is not None:
        layerwise.enable(model, storage_dtype, dtype)
    return model.eval().requires_grad_(False)


def _placed(t, device, dtype, storage_dtype=None):
    if not t.is_floating_point():
        return t.to(device)
    t = t.to(device=device, dtype=dtype)
    return t if storage_dtype is None else t.to(storage_dtype)


def _few(keys, n=6):
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def build_unet(sd, dtype=torch.float32, device="cpu", config_json=None, storage_dtype=None) -> UNet2DConditionModel:
    cfg = unet_config_from_state_dict(sd, _unet_base(config_json))
    return _build(UNet2DConditionModel, cfg, sd, "UNet", dtype, device, storage_dtype)


def build_vae(sd, dtype=torch.float32, device="cpu", config_json=None) -> AutoencoderKL:
    sd = {_legacy_vae(k): v for k, v in sd.items()}
    cfg = vae_config_from_state_dict(sd, _vae_base(config_json))
    vae_dtype = _vae_dtype(cfg, dtype)
    return _build(AutoencoderKL, cfg, sd, "VAE", vae_dtype, device)


def build_taesd(sd, dtype=torch.float32, device="cpu", config_json=None) -> AutoencoderTiny:
    cfg = taesd_config_from_state_dict(sd, _taesd_base(config_json))
    return _build(AutoencoderTiny, cfg, sd, "TAESD", dtype, device)


def _taesd_base(cj):
    """An AutoencoderTiny config.json's numbers; what TAESD itself fixes (ReLU, 2x nearest upsampling) checked.
    Another class's config (the SDXL folder's vae/, for load(vae=TAESD file)) says nothing of it."""
    cj = cj or {}
    cj = cj if cj.get("_class_name", "AutoencoderTiny") == "AutoencoderTiny" else {}
    fixed = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2}
    for key, value in fixed.items():
        if cj.get(key, value) != value:
            raise CheckpointError(f"this TAESD's config.json says {key}={cj[key]!r}; minsdxl's TAESD has {value!r}")
    return TAESDConfig(**({"scaling_factor": float(cj["scaling_factor"])} if "scaling_factor" in cj else {}))


# madebyollin's own TAESD files: one per half (taesdxl_encoder.pth, taesdxl_decoder.safetensors, ...), keys N.*
_TAESD_SUFFIXES = (".safetensors", ".pth", ".pt")


def _taesd_half(sd) -> str | None:
    """ "encoder" / "decoder" for an original TAESD half (keys N.weight, N.conv.0.weight, ...), else None: the
    encoder's first layer is a conv, the decoder's a parameter-free Clamp."""
    if not sd or not all(k.split(".", 1)[0].isdigit() for k in sd):
        return None
    return "encoder" if "0.weight" in sd else "decoder"


def _taesd_original(path: Path, sd: dict, half: str) -> dict:
    """An original TAESD half in diffusers' keys (the decoder's layers one down: DecoderTiny clamps in its forward),
    with the other half when its file lies beside it (name with encoder <-> decoder, as A1111's VAE-taesd)."""
    out = {}
    for name, part in [(path, sd)] + [(q, None) for q in _taesd_sibling(path, half)]:
        part = read_state_dict(name) if part is None else part
        which = _taesd_half(part)
        if which is None or (part is not sd and which == half):
            other = "decoder" if half == "encoder" else "encoder"
            raise CheckpointError(f"{name} is not the TAESD {other} its name says")
        shift = 1 if which == "decoder" else 0
        out |= {f"{which}.layers.{int(k.split('.', 1)[0]) - shift}.{k.split('.', 1)[1]}": v for k, v in part.items()}
    return out


def _taesd_sibling(path: Path, half: str) -> list:
    other = "encoder" if half == "decoder" else "decoder"
    if half not in path.stem:
        return []
    found = [path.with_name(path.stem.replace(half, other) + x) for x in _TAESD_SUFFIXES]
    return [q for q in found if q.is_file()][:1]


def _taesd_in_folder(p: Path) -> Path | None:
    """A folder of original TAESD files (A1111's models/VAE-taesd): its SDXL decoder (or encoder) file."""
    for name in ("taesdxl_decoder", "taesdxl_encoder"):
        for x in _TAESD_SUFFIXES:
            if (p / (name + x)).is_file():
                return p / (name + x)
    return None


def build_text_encoder(sd, with_projection: bool, dtype=torch.float32, device="cpu", config_json=None):
    sd = te.normalize_text_keys(sd, with_projection)
    cfg = text_config_from_state_dict(sd)
    if config_json:
        keep = ("num_attention_heads", "hidden_act", "layer_norm_eps", "eos_token_id", "pad_token_id")
        cfg = type(cfg)(**{**cfg.__dict__, **{k: config_json[k] for k in keep if k in config_json}})
    return _build(te.build_text_encoder, cfg, sd, "text encoder", dtype, device)


def build_image_encoder(sd, dtype=torch.float32, device="cpu", config_json=None) -> CLIPVisionModelWithProjection:
    """IP-Adapter's CLIP image encoder from a transformers CLIPVisionModelWithProjection state dict.
    config_json: its config.json, for what shapes cannot tell (heads, activation, eps)."""
    sd = {k: v for k, v in sd.items() if k != "vision_model.embeddings.position_ids"}  # a buffer we don't keep
    if "vision_model.embeddings.patch_embedding.weight" not in sd:
        text = any(k.endswith("embeddings.token_embedding.weight") for k in sd)
        what = "a CLIP text encoder, not" if text else "not"
        raise CheckpointError(
            f"these weights are {what} a CLIP image encoder (no vision_model.embeddings.patch_embedding.weight); "
            "IP-Adapter's image encoder is a transformers CLIPVisionModelWithProjection, e.g. the image_encoder "
            "folder of h94/IP-Adapter (models/ for ViT-H, sdxl_models/ for ViT-bigG)"
        )
    cfg = vision_config_from_state_dict(sd, _vision_base(config_json))
    return _build(CLIPVisionModelWithProjection, cfg, sd, "image encoder", dtype, device)


def _legacy_vae(key):
    for a, b in LEGACY_VAE_ATTN.items():
        key = key.replace(f"attentions.0.{a}", f"attentions.0.{b}")
    return key


def _unet_base(cj):
    """The parts of a diffusers unet/config.json that shapes cannot tell (head size, norm groups)."""
    if not cj:
        return None
    ch = cj["block_out_channels"]
    heads = cj.get("num_attention_heads") or cj.get("attention_head_dim", [c // 64 for c in ch])
    heads = heads if isinstance(heads, list) else [heads] * len(ch)
    dims = {c // h for c, h in zip(ch, heads)}
    if len(dims) != 1:
        raise CheckpointError(f"unet/config.json gives head sizes {sorted(dims)}; minsdxl needs one head size")
    return UNetConfig(
        attention_head_dim=dims.pop(),
        norm_num_groups=cj.get("norm_num_groups", 32),
        sample_size=cj.get("sample_size", 128),
        addition_time_embed_dim=cj.get("addition_time_embed_dim", 256),
        time_cond_proj_dim=cj.get("time_cond_proj_dim"),
    )


def _vision_base(cj):
    """The parts of a transformers clip_vision_model config.json that shapes cannot tell."""
    if not cj:
        return None
    keep = ("num_attention_heads", "hidden_act", "layer_norm_eps", "image_size")
    return VisionConfig(**{k: cj[k] for k in keep if k in cj})


def _vae_base(cj):
    if not cj:
        return None
    return VAEConfig(
        norm_num_groups=cj.get("norm_num_groups", 32),
        scaling_factor=cj.get("scaling_factor", 0.13025),
        shift_factor=cj.get("shift_factor"),
        force_upcast=cj.get("force_upcast", True),
        sample_size=cj.get("sample_size", 1024),
        latents_mean=_floats(cj.get("latents_mean")),
        latents_std=_floats(cj.get("latents_std")),
    )


def _floats(values) -> tuple | None:
    return None if values is None else tuple(float(v) for v in values)


# ------------------------------------------------------------------------------------------------
# Finding files and loading whole models

_STEMS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}


def _weights_file(folder: Path, stem: str, variant: str | None, dtype) -> Path:
    """diffusers' file naming: stem[.variant].safetensors, sharded *.index.json, or legacy .bin; for
    transformers' "model" also its older pytorch_model[.variant].bin (e.g. h94/IP-Adapter's ViT-H folder)."""
    variants = [variant] if variant else ([None, "fp16"] if dtype != torch.float16 else ["fp16", None])
    for var in variants:
        name = stem if var is None else f"{stem}.{var}"
        for suffix in (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json"):
            if (folder / (name + suffix)).is_file():
                return folder / (name + suffix)
    if stem == "model":
        try:
            return _weights_file(folder, "pytorch_model", variant, dtype)
        except CheckpointError:
            pass
    raise CheckpointError(
        f"no weights in {folder}: expected {stem}{'.' + variant if variant else ''}.safetensors"
        + ("" if variant else f" (or {stem}.fp16.safetensors)")
    )


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def _missing_path_error(path: str) -> CheckpointError:
    msg = (
        f"no such file or folder: {path}. Pass a diffusers SDXL folder (with model_index.json) or one .safetensors file"
    )
    if path.count("/") == 1 and not path.startswith((".", "/")):
        msg += (
            f". '{path}' looks like a Hugging Face repo id: minsdxl never downloads; fetch it first, e.g. "
            f"`huggingface-cli download {path} --local-dir ./{path.split('/')[1]}`, then pass that folder"
        )
    return CheckpointError(msg)


def _folder_configs(folder: Path) -> dict:
    """model_index.json and every component's config.json of a diffusers folder."""
    configs = {"model_index": _json(folder / "model_index.json")}
    configs |= {c: _json(folder / c / "config.json") for c in COMPONENTS if (folder / c / "config.json").is_file()}
    configs["scheduler"] = _json(folder / "scheduler" / "scheduler_config.json")
    return configs


def component_file(path, variant=None, dtype=None, config=None) -> tuple[Path, dict]:
    """(the weights file, its config.json) of a ControlNet or T2I-Adapter folder (or a pipeline folder's
    controlnet/) or file, as load_controlnet and load_t2i_adapter read them."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"no such file or folder: {path}. Pass a diffusers model folder (config.json + "
            "diffusion_pytorch_model.safetensors) or one .safetensors file, downloaded first"
        )
    if not p.is_dir():
        return p, _json(Path(config) / "config.json") if config else {}
    if not (p / "config.json").is_file() and (p / "controlnet" / "config.json").is_file():
        p = p / "controlnet"  # a pipeline folder
    return _weights_file(p, "diffusion_pytorch_model", variant, dtype), _json(p / "config.json")


def weights_file(folder, component: str, variant: str | None = None, dtype=None) -> Path:
    """The weights file of one component of a diffusers folder that `load` reads for this dtype."""
    return _weights_file(Path(folder) / component, _STEMS[component], variant, dtype)


def read_checkpoint(path, config=None) -> tuple[dict, dict]:
    """Any supported path -> ({component: diffusers-named state dict (memory-mapped), or for folders a
    reader for `read_component`}, {"model_index" / component / "scheduler": config json}) without
    building modules. `config`: a diffusers folder whose configs describe a single file."""
    p = Path(path)
    if not p.exists():
        raise _missing_path_error(str(path))
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            if (p / "config.json").is_file():
                raise CheckpointError(
                    f"{p} holds a single component (config.json), not a whole SDXL model; pass the folder above "
                    "it, or load it with minsdxl.load_component / as vae=..."
                )
            raise CheckpointError(f"{p} is not a diffusers model folder: it has no model_index.json")
        configs = _folder_configs(p)
        index = configs["model_index"]
        comps = {
            c: _Lazy(p / c, _STEMS[c])
            for c in COMPONENTS
            if (p / c).is_dir() and not (isinstance(index.get(c), list) and index[c][0] is None)
        }
        return comps, configs
    configs = _folder_configs(Path(config)) if config else {}
    sd = read_state_dict(p)
    keys = list(sd)
    if any(k.startswith("cond_stage_model.") for k in keys) or (
        any(k.startswith(_UNET) for k in keys) and f"{_UNET}label_emb.0.0.weight" not in sd
    ):
        raise CheckpointError(
            f"{p} is a Stable Diffusion 1.x/2.x checkpoint (no SDXL micro-conditioning embedding); "
            "minsdxl loads SDXL base, refiner and inpaint models only"
        )
    if any(k.startswith(_SGM_PREFIXES) for k in keys):
        comps, unmapped = sgm_to_diffusers(sd)
        if unmapped:
            raise CheckpointError(
                f"{p}: {len(unmapped)} keys of the SDXL model have no known diffusers name ({_few(unmapped)}); "
                "the file is not an SDXL checkpoint minsdxl understands"
            )
        if config:
            pass  # the folder's configs describe the file, as in diffusers' from_single_file(config=)
        elif "edm_mean" in sd and "edm_std" in sd:
            configs |= playground_configs(sd["edm_mean"], sd["edm_std"])
        elif "v_pred" in sd or "ztsnr" in sd:
            # A1111's and ComfyUI's marker keys of v-prediction / zero-terminal-SNR files (NoobAI-XL v-pred);
            # diffusers' loader ignores them and would sample such a model as an ε-model (a grey mess)
            v = dict(prediction_type="v_prediction") if "v_pred" in sd else {}
            configs["scheduler"] = {**SDXL_SCHEDULER_CONFIG, **v, "rescale_betas_zero_snr": "ztsnr" in sd}
        return comps, configs
    raise CheckpointError(
        f"{p} is not an SDXL single-file checkpoint (no model.diffusion_model.* keys); if it holds one "
        "component (a VAE, a UNet), load it with minsdxl.load_component or pass it as vae=..."
    )


# Playground v2.5 (an SDXL-architecture model trained in the EDM formulation): its single file carries the
# VAE's per-channel latent statistics as edm_mean / edm_std, by which diffusers' single_file_utils tells it
# apart ("playground-v2-5"); its VAE scaling factor (PLAYGROUND_VAE_SCALING_FACTOR) and scheduler are then
# those of playgroundai/playground-v2.5-1024px-aesthetic
PLAYGROUND_SCHEDULER_CONFIG = {
    "_class_name": "EDMDPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "rho": 7.0,
    "sample_max_value": 1.0,
    "sigma_data": 0.5,
    "sigma_max": 80.0,
    "sigma_min": 0.002,
    "solver_order": 2,
    "solver_type": "midpoint",
    "thresholding": False,
}


def playground_configs(edm_mean, edm_std) -> dict:
    """The VAE and scheduler configs of a Playground v2.5 single file, from its edm_mean / edm_std."""
    stats = {k: [float(v) for v in t.flatten()] for k, t in (("latents_mean", edm_mean), ("latents_std", edm_std))}
    return {"vae": {"scaling_factor": 0.5, **stats}, "scheduler": dict(PLAYGROUND_SCHEDULER_CONFIG)}


class _Lazy:
    """A diffusers component folder whose weights are read only if the component is needed."""

    def __init__(self, folder: Path, stem: str):
        self.folder, self.stem = folder, stem

    def read(self, variant, dtype) -> dict:
        return read_state_dict(_weights_file(self.folder, self.stem, variant, dtype))


def read_component(comp, variant=None, dtype=None) -> dict:
    """A component's state dict from what read_checkpoint returned (reads a folder's file now)."""
    return comp.read(variant, dtype) if isinstance(comp, _Lazy) else comp


def load_component(path, dtype=torch.float32, device="cpu", variant=None, config=None, storage_dtype=None):
    """One component from a file or a component folder (e.g. a standalone VAE): detected from keys.
    config: a component folder whose config.json fills in what shapes cannot tell (for a file).
    storage_dtype: a UNet's layers stored in it, computed in `dtype` (see load)."""
    p = Path(path)
    if not p.exists():
        raise _missing_path_error(str(path))
    config_dir = p if p.is_dir() else Path(config) if config else None
    cj = _json(config_dir / "config.json") if config_dir else {}
    if p.is_dir() and not (p / "config.json").is_file() and (original := _taesd_in_folder(p)):
        p = original
    if p.is_dir():  # transformers names its weights model.*, diffusers diffusion_pytorch_model.*
        stem = "model" if any(f.name.startswith("model.") for f in p.iterdir()) else "diffusion_pytorch_model"
        sd = _Lazy(p, stem).read(variant, dtype)
    else:
        sd = read_state_dict(p)
        half = _taesd_half(sd)
        sd = _taesd_original(p, sd, half) if half else sd
    if any(k.startswith(("encoder.down.", _VAE)) for k in sd):  # an sgm-layout VAE file
        sd = sgm_to_diffusers({k if k.startswith(_VAE) else _VAE + k: v for k, v in sd.items()})[0].get("vae", {})
    elif any(k.startswith(_UNET) for k in sd):  # an sgm UNet (or a whole single file: take its UNet)
        sd = sgm_to_diffusers(sd)[0].get("unet", {})
    if "encoder.conv_in.weight" in sd:
        return build_vae(sd, dtype, device, cj)
    if "encoder.layers.0.weight" in sd or "decoder.layers.0.weight" in sd:
        return build_taesd(sd, dtype, device, cj)
    if "conv_in.weight" in sd:
        return build_unet(sd, dtype, device, cj, storage_dtype)
    if any(k.endswith("embeddings.token_embedding.weight") for k in sd):
        return build_text_encoder(sd, "text_projection.weight" in sd, dtype, device, cj)
    if "vision_model.embeddings.patch_embedding.weight" in sd:
        return build_image_encoder(sd, dtype, device, cj)
    raise CheckpointError(f"{p}: cannot tell which SDXL component these weights are (no VAE, TAESD, UNet or CLIP keys)")


def load_image_encoder(folder, dtype=torch.float32, device="cpu") -> CLIPVisionModelWithProjection:
    """IP-Adapter's image encoder from a transformers folder (config.json + model.safetensors, or
    model.fp16.safetensors / pytorch_model.bin), e.g. h94/IP-Adapter's models/image_encoder (ViT-H,
    which ships both model.safetensors and pytorch_model.bin) or sdxl_models/image_encoder (ViT-bigG)."""
    p = Path(folder)
    if not p.is_dir():
        raise CheckpointError(
            f"no such folder: {folder}. Pass an image encoder folder (config.json + model.safetensors), e.g. "
            "h94/IP-Adapter's models/image_encoder or sdxl_models/image_encoder, downloaded first"
        )
    if not (p / "config.json").is_file() and (p / "image_encoder").is_dir():
        raise CheckpointError(
            f"{p} holds no image encoder itself; pass its image_encoder folder: {p / 'image_encoder'}"
        )
    try:
        weights = _weights_file(p, "model", None, dtype)
    except CheckpointError:
        raise CheckpointError(
            f"no weights in {p}: expected model.safetensors (or model.fp16.safetensors, pytorch_model.bin), "
            "as transformers writes an image encoder folder"
        ) from None
    try:
        return build_image_encoder(read_state_dict(weights), dtype, device, _json(p / "config.json"))
    except CheckpointError as e:
        raise CheckpointError(f"{weights}: {e}") from None


# a UNet's input channels beside the 4 latent ones tell these kinds: mask + masked image, the image to edit
_KINDS = {9: "inpaint", 8: "instruct_pix2pix"}


def load(
    path,
    dtype=torch.float32,
    device="cpu",
    share=None,
    vae=None,
    variant=None,
    config=None,
    scheduler=None,
    add_watermarker=None,
    offload=False,
    attention=None,
    compile=False,
    unet=None,
    storage_dtype=None,
) -> SDXL:
    """Load an SDXL base, refiner or inpaint model from a diffusers folder or a single file; the name
    "tiny" loads the small SDXL-topology model bundled with minsdxl (see minsdxl.tiny).

    share: another loaded SDXL (the base) whose text_encoder_2, tokenizer_2 and VAE are reused (a
    refiner then costs only its UNet). vae: a path to a VAE (file or folder) overriding the model's, or to a TAESD
    (minsdxl.taesd: a diffusers AutoencoderTiny folder, madebyollin's taesdxl_decoder / _encoder files, or
    A1111's folder of them) to decode in a fraction of the time; unet: the
    same for the UNet (e.g. an SDXL-Lightning or Hyper-SD UNet file, either layout, over its base model).
    variant: "fp16" to pick diffusers' *.fp16.safetensors (default: the file matching `dtype`).
    config: for a single file, a diffusers folder whose config files fill in what shapes cannot tell
    (head size, norm groups, VAE scaling factor, scheduler); SDXL's values are the default.
    scheduler: the default sampler name for this model ("euler", "DPM++ 2M Karras", ...).
    add_watermarker: None = on when invisible-watermark is installed (diffusers' default), False = off.
    offload: keep the weights on the CPU and move the text encoders, then the UNet, then the VAE to
    `device` only while each runs (for GPUs too small to hold all of SDXL at once).
    attention: "sdpa" | "triton" | "math" for this model's attention layers (None: the process default,
    SDPA unless MINSDXL_ATTENTION says otherwise); "triton" = minsdxl's flash-attention kernel on CUDA.
    compile: torch.compile the UNet, VAE decoder and text encoders (minsdxl.compile(model): fullgraph,
    compiled once per image size on the first call; on CUDA with CUDA graphs and, unless `attention`
    names another backend, Triton attention).
    storage_dtype: the UNet's layers stored in this dtype (torch.float8_e4m3fn: 2.6 GB of weights) and each
    computed in `dtype` (= diffusers' unet.enable_layerwise_casting(storage_dtype, compute_dtype=dtype); see
    minsdxl.layerwise, which also casts other modules); None: stored in `dtype`.
    A module reused through `share` is the base's own object: attention= and compile= then apply to
    it in both models.
    """
    if attention is not None:  # before any weights are read
        speed.attention.check_backend(attention, "load(attention=...) got")
    check_placement(dtype, device, "load")
    if storage_dtype is not None:
        layerwise.check(storage_dtype, dtype, "load(storage_dtype=, dtype=)")
    offload_device, device = (str(device), "cpu") if offload else (None, device)
    path = resolve(path)
    comps, configs = read_checkpoint(path, config)
    layout = "diffusers" if Path(path).is_dir() else "sgm"
    folder = path if layout == "diffusers" else config  # configs / tokenizers for what the weights cannot tell
    index = configs.get("model_index", {})
    if unet is not None:  # the checkpoint's own UNet is not read
        unet = _override(unet, UNet2DConditionModel, "unet", dtype, device, folder, storage_dtype)
    elif "unet" not in comps:
        raise CheckpointError(f"{path} has no UNet; is it an SDXL checkpoint?")
    else:
        unet = read_component(comps["unet"], variant, dtype)
        unet = build_unet(unet, dtype, device, configs.get("unet"), storage_dtype)
    refiner = "text_encoder" not in comps
    kind = _KINDS.get(unet.config.in_channels, "refiner" if refiner else "base")
    model = SDXL(
        unet=unet,
        kind=kind,
        source=str(path),
        scheduler=scheduler,
        add_watermarker=add_watermarker,
        offload_device=offload_device,
    )
    model.force_zeros_for_empty_prompt = index.get("force_zeros_for_empty_prompt", not refiner)
    model.requires_aesthetics_score = index.get("requires_aesthetics_score", refiner)
    model.scheduler_config = configs.get("scheduler", {})

    def component(name, build, *args):
        if name not in comps:
            raise CheckpointError(f"{path} has no {name}; an SDXL checkpoint needs one (or pass share=base)")
        return build(read_component(comps[name], variant, dtype), *args, dtype, device, configs.get(name))

    if share is not None:
        require_model(share, "load(share=)")
        model.text_encoder_2, model.tokenizer_2, model.vae = share.text_encoder_2, share.tokenizer_2, share.vae
    else:
        model.text_encoder_2 = component("text_encoder_2", build_text_encoder, True)
        model.tokenizer_2 = _tokenizer(folder, "tokenizer_2", pad="!")
        if vae:  # an SDXL VAE or a TAESD
            model.vae = _override(vae, (AutoencoderKL, AutoencoderTiny), "vae", dtype, device, folder)
            if model.vae.decoder is None:  # found now, not after the last denoising step
                raise CheckpointError(
                    f"vae={vae} is a TAESD encoder alone; the model decodes with it: pass taesdxl_decoder (its encoder "
                    "file beside it is found)"
                )
        else:
            model.vae = component("vae", build_vae)
    if not refiner:
        model.text_encoder = component("text_encoder", build_text_encoder, False)
        model.tokenizer = _tokenizer(folder, "tokenizer", pad="<|endoftext|>")
    if attention is not None:
        speed.set_attention(attention, model)
    if compile:  # an explicit attention= stays: compile's "auto" would pick Triton on CUDA
        speed.compile(model, attention_backend=attention or "auto")
    return model


def _override(path, cls, name, dtype, device, folder=None, storage_dtype=None):
    """load(vae=... / unet=...): that component from its own file or folder, checked to be one; what its shapes
    cannot tell (head size, VAE scaling factor, ...) from the model folder's `name`/config.json where there is one."""
    own = folder is not None and (Path(folder) / name / "config.json").is_file() and not Path(path).is_dir()
    config = Path(folder) / name if own else None
    module = load_component(path, dtype, device, config=config, storage_dtype=storage_dtype)
    if not isinstance(module, cls):
        kinds = " or ".join(c.__name__ for c in (cls if isinstance(cls, tuple) else (cls,)))
        raise CheckpointError(f"{name}={path} holds {type(module).__name__} weights, not a {kinds}: pass the {name}")
    return module


def resolve(path) -> Path:
    """A model path, or the bundled tiny model for the name "tiny" (a local folder named tiny: "./tiny")."""
    from . import tiny

    if str(path) != tiny.NAME:
        return Path(path)
    if not (tiny.PATH / "model_index.json").is_file():
        raise CheckpointError(
            f"the bundled tiny model is missing from this minsdxl install ({tiny.PATH}); reinstall minsdxl, or "
            "train it again with `python scripts/train_tiny.py`"
        )
    return tiny.PATH


def _tokenizer(folder, name, pad):
    # single files carry no tokenizer: the CLIP BPE vocabulary ships with minsdxl. SDXL's tokenizer_2
    # pads with "!" (id 0; diffusers' single-file loader forces pad_token="!"), tokenizer with EOS.
    from .tokenizer import CLIPTokenizer

    if folder and (Path(folder) / name).is_dir():
        return CLIPTokenizer.from_folder(Path(folder) / name)
    return CLIPTokenizer.bundled(pad_token=pad)


# ------------------------------------------------------------------------------------------------
# Writing diffusers folders (config.json files as diffusers / transformers write them)


def unet_config_json(cfg: UNetConfig, decoder: bool = True) -> dict:
    """diffusers' unet/config.json for a UNetConfig (diffusers' `attention_head_dim` is the head COUNT);
    decoder=False: without the decoder's fields (a ControlNet's encoder half)."""
    levels = range(len(cfg.block_out_channels))
    mid, last = cfg.mid_transformer_layers, cfg.down_depths(levels[-1])[0]
    if mid and last and mid != last:
        raise ValueError(
            f"diffusers gives the mid block as many transformer layers as the last level's first resnet ({last}), "
            f"this UNet has {mid}: its config cannot be written for diffusers (add identity layers: all-zero "
            "weights, norms 1)"
        )
    down = ["CrossAttnDownBlock2D" if any(cfg.down_depths(i)) else "DownBlock2D" for i in levels]
    up = ["CrossAttnUpBlock2D" if any(cfg.up_depths(i)) else "UpBlock2D" for i in levels] if decoder else None
    out = dict(
        _class_name="UNet2DConditionModel",
        sample_size=cfg.sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=list(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        # a level without attention ignores its number, the mid block reads the last one's: the mid depth there
        transformer_layers_per_block=[
            list(d) if isinstance(d, tuple) else d or mid or 1 for d in cfg.transformer_layers
        ],
        mid_block_type="UNetMidBlock2DCrossAttn" if mid else None if mid is None else "UNetMidBlock2D",
        attention_head_dim=[c // cfg.attention_head_dim for c in cfg.block_out_channels],
        cross_attention_dim=cfg.cross_attention_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=cfg.addition_time_embed_dim,
        time_cond_proj_dim=cfg.time_cond_proj_dim,
        projection_class_embeddings_input_dim=cfg.projection_class_embeddings_input_dim,
        norm_num_groups=cfg.norm_num_groups,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        center_input_sample=False,
        upcast_attention=False,
    )
    uneven = cfg.up_transformer_layers is not None or any(isinstance(d, tuple) for d in cfg.transformer_layers)
    if decoder and uneven:  # (diffusers insists on it when the encoder's depths are per resnet)
        out["reverse_transformer_layers_per_block"] = [list(cfg.up_depths(i)) for i in levels]
    return out


def vae_config_json(cfg: VAEConfig) -> dict:
    n = len(cfg.block_out_channels)
    out = dict(
        _class_name="AutoencoderKL",
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        latent_channels=cfg.latent_channels,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        scaling_factor=cfg.scaling_factor,
        force_upcast=cfg.force_upcast,
        sample_size=cfg.sample_size,
        act_fn="silu",
    )
    extra = {k: getattr(cfg, k) for k in ("shift_factor", "latents_mean", "latents_std") if getattr(cfg, k) is not None}
    return out | {k: list(v) if isinstance(v, tuple) else v for k, v in extra.items()}


def text_config_json(cfg) -> dict:
    """transformers' CLIPTextConfig as SDXL's text_encoder(_2)/config.json spell it: bos 0, eos 2, pad 1
    (transformers then pools at input_ids.argmax(-1), as we do)."""
    out = dict(
        architectures=["CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"],
        model_type="clip_text_model",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        attention_dropout=0.0,
        dropout=0.0,
        initializer_factor=1.0,
        initializer_range=0.02,
    )
    return out | ({"projection_dim": cfg.projection_dim} if cfg.projection_dim else {})


_PIPELINES = {
    "base": "StableDiffusionXLPipeline",
    "refiner": "StableDiffusionXLImg2ImgPipeline",
    "inpaint": "StableDiffusionXLInpaintPipeline",
    "instruct_pix2pix": "StableDiffusionXLInstructPix2PixPipeline",
}


def save(model: SDXL, folder, dtype=None, variant: str | None = None) -> Path:
    """Write `model` as a diffusers SDXL folder (model_index.json, scheduler/, unet/, vae/,
    text_encoder*/, tokenizer*/) that minsdxl.load and diffusers' from_pretrained both read.
    dtype: cast the weights on the way (e.g. torch.float16; a UNet loaded with storage_dtype keeps its float8
    layers, as `minsdxl convert --storage-dtype fp8` writes them); variant: "fp16" names the weight files
    *.fp16.safetensors. The folder must not exist yet: it is written under a temporary name and
    renamed when complete, so a failure never leaves a half-written model."""
    import shutil

    folder = Path(folder)
    _check_saving(model, folder, "folder")
    tmp = folder.with_name(folder.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    encoders = ("text_encoder", "text_encoder_2") if model.text_encoder is not None else ("text_encoder_2",)
    index = {"_class_name": _PIPELINES[model.kind], "_diffusers_version": "0.19.0"}
    for name in encoders:
        cls = "CLIPTextModelWithProjection" if name == "text_encoder_2" else "CLIPTextModel"
        index[name] = ["transformers", cls]
        index[name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    if model.text_encoder is None:
        index |= {"text_encoder": [None, None], "tokenizer": [None, None]}
    # a single file carries no scheduler config: write SDXL's, which load() used (not the class defaults)
    scheduler = dict(model.scheduler_config or SDXL_SCHEDULER_CONFIG)
    index |= {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", scheduler.get("_class_name", "EulerDiscreteScheduler")],
        "force_zeros_for_empty_prompt": model.force_zeros_for_empty_prompt,
    }
    if model.kind == "refiner" or model.requires_aesthetics_score:
        index["requires_aesthetics_score"] = model.requires_aesthetics_score
    configs = {"unet": unet_config_json(model.unet.config), "vae": vae_config_json(model.vae.config)}
    configs |= {name: text_config_json(getattr(model, name).config) for name in encoders}
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    try:
        tmp.mkdir(parents=True)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        for name, cj in configs.items():
            (tmp / name).mkdir()
            (tmp / name / "config.json").write_text(json.dumps(cj, indent=2) + "\n")
            save_safetensors(getattr(model, name).state_dict(), tmp / name / (_STEMS[name] + suffix), dtype)
        for name in encoders:
            name = name.replace("text_encoder", "tokenizer")
            getattr(model, name).save(tmp / name)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _check_saving(model: SDXL, path: Path, what: str) -> None:
    if path.exists():
        raise FileExistsError(f"{path} exists; minsdxl writes a new {what} (remove it first)")
    if getattr(model.unet, "encoder_hid_proj", None) is not None:
        raise ValueError(
            f"an IP-Adapter is loaded; an SDXL {what} has no place for its weights: minsdxl.unload_ip_adapter(model) "
            "first (and load it again after saving)"
        )
    if not isinstance(model.vae, AutoencoderKL):
        raise ValueError(
            f"this model decodes with TAESD ({type(model.vae).__name__}); an SDXL {what} holds the full VAE: load "
            "the model without vae= to save it"
        )


def save_single_file(model: SDXL, path, dtype=None) -> Path:
    """Write `model` as one Stability-layout .safetensors file (model.diffusion_model.*, first_stage_model.*,
    conditioner.embedders.*; = diffusers' convert_diffusers_to_original_sdxl), which minsdxl.load, diffusers'
    from_single_file, A1111 and ComfyUI read. What the file format has no config for goes in as the loaders
    look for it: Playground's latent statistics as edm_mean / edm_std ([1, 4, 1, 1]), a v-prediction / zero
    terminal SNR scheduler as A1111's empty v_pred / ztsnr keys. Written under a temporary name, then renamed."""
    path = Path(path)
    _check_saving(model, path, "file")
    if model.unet.config.time_cond_proj_dim is not None:
        raise ValueError(
            "this UNet is guidance-distilled (time_cond_proj_dim, e.g. LCM-SDXL): Stability's single-file layout has "
            "no name for its time_embedding.cond_proj; save it as a diffusers folder (minsdxl.checkpoint.save)"
        )
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    sd = diffusers_to_sgm({n: getattr(model, n).state_dict() for n in names if getattr(model, n) is not None})
    vae = model.vae.config
    if vae.latents_mean is not None and vae.latents_std is not None:
        sd |= {
            k: torch.tensor(v).view(1, -1, 1, 1)
            for k, v in (("edm_mean", vae.latents_mean), ("edm_std", vae.latents_std))
        }
    sched = model.scheduler_config or {}
    markers = ("v_pred", sched.get("prediction_type") == "v_prediction"), ("ztsnr", sched.get("rescale_betas_zero_snr"))
    sd |= {k: torch.zeros(0) for k, on in markers if on}
    save_safetensors(sd, path, dtype)
    return path
