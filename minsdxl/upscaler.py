"""ESRGAN-family image upscalers (RRDBNet), the models A1111's "hires fix" runs most: 4x-UltraSharp,
4x_NMKD-Siax, 4x-AnimeSharp, RealESRGAN_x4plus / x2plus / x4plus_anime_6B, A1111's own "ESRGAN_4x".

One network, three key layouts on disk, all renamed on load to Real-ESRGAN's (basicsr's RRDBNet) names,
which are ours:
  Real-ESRGAN / basicsr  conv_first, body.N.rdbR.convC, conv_body, conv_upI, conv_hr, conv_last; often
                         wrapped as {"params_ema": ...} or {"params": ...} (the EMA weights win, as in
                         Real-ESRGAN's RealESRGANer)
  old ESRGAN             positions in one nn.Sequential: model.0, model.1.sub.N.RDBR.convC.0, ... (4x-UltraSharp
                         and most community .pth files); renamed by `old_esrgan_table`
  ESRGAN repo / KAIR     RRDB_trunk.N.RDBR.convC, trunk_conv, upconvI, HRconv (BSRGAN, RealSR, A1111's
                         "ESRGAN_4x" download); renamed by `_KAIR_NAMES`
The config (channels, blocks, growth channels, scale, pixel-unshuffle) is read off the tensor shapes, as
spandrel does (the loader A1111 >= 1.8 and ComfyUI use for these files); the network is the same ops in
the same order as spandrel's, so fp32 outputs agree bit for bit (tests/test_upscaler.py).
Everything else (SwinIR, HAT, DAT, SPAN, Compact, ESRGAN+, ...) is refused, naming what the file looks like.
"""

import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, read_safetensors


@dataclass(frozen=True)
class ESRGANConfig:
    in_nc: int = 3  # image channels in (before pixel-unshuffle)
    out_nc: int = 3
    nf: int = 64  # trunk channels
    nb: int = 23  # RRDB blocks (RealESRGAN_x4plus_anime_6B: 6)
    gc: int = 32  # growth channels of the dense blocks
    n_up: int = 2  # nearest-x2 + conv stages: 2 = x4 network
    unshuffle: int = 1  # pixel_unshuffle before conv_first: Real-ESRGAN's x2 models 2, x1 models 4

    @property
    def scale(self) -> int:
        """Output size / input size: the x2 model is an x4 network fed a 2x pixel-unshuffled image."""
        return 2**self.n_up // self.unshuffle


# ------------------------------------------------------------------------------------------------
# The network


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each fed the concatenation of the input and all earlier outputs; residual x 0.2."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        for i in range(4):
            setattr(self, f"conv{i + 1}", nn.Conv2d(nf + i * gc, gc, 3, padding=1))
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, padding=1)

    def forward(self, x):
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2, inplace=True))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x  # no activation after conv5 ("CNA" mode)


class RRDB(nn.Module):
    """Residual in Residual Dense Block: three dense blocks, residual scaled by 0.2 again."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (ResidualDenseBlock(nf, gc) for _ in range(3))

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """The ESRGAN generator: [B, in_nc, H, W] in [0, 1] -> [B, out_nc, H*scale, W*scale] (unclamped).
    LeakyReLUs run in place on fresh conv outputs (as spandrel's): at x4 the last three activations are
    nf x (4H) x (4W) each, the memory peak."""

    def __init__(self, config: ESRGANConfig):
        super().__init__()
        self.config = c = config
        self.conv_first = nn.Conv2d(c.in_nc * c.unshuffle**2, c.nf, 3, padding=1)
        self.body = nn.Sequential(*(RRDB(c.nf, c.gc) for _ in range(c.nb)))
        self.conv_body = nn.Conv2d(c.nf, c.nf, 3, padding=1)
        for i in range(1, c.n_up + 1):
            setattr(self, f"conv_up{i}", nn.Conv2d(c.nf, c.nf, 3, padding=1))
        self.conv_hr = nn.Conv2d(c.nf, c.nf, 3, padding=1)
        self.conv_last = nn.Conv2d(c.nf, c.out_nc, 3, padding=1)

    @property
    def scale(self) -> int:
        return self.config.scale

    @property
    def multiple(self) -> int:
        """Input sizes are padded to this multiple: 4 for pixel-unshuffle models (= spandrel's size
        requirement, what A1111 and ComfyUI run; RealESRGANer pads x2 to a multiple of 2 only), else 1."""
        return 4 if self.config.unshuffle > 1 else 1

    def forward(self, x):
        """= spandrel's ImageModelDescriptor call without its final clamp: pad (below), network, crop."""
        h, w = x.shape[-2:]
        x = _pad_to(x, self.multiple, minimum=2)
        if self.config.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.config.unshuffle)  # the body runs at 1/2 or 1/4 resolution
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(1, self.config.n_up + 1):
            up = getattr(self, f"conv_up{i}")
            feat = F.leaky_relu(up(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2, inplace=True)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2, inplace=True))
        return out[..., : h * self.scale, : w * self.scale]


def _pad_to(x: torch.Tensor, multiple: int, minimum: int) -> torch.Tensor:
    """Pad bottom/right to at least `minimum` and a multiple of `multiple`: reflect as far as the image allows
    (size - 1), replicate beyond (= spandrel's pad_tensor)."""
    h, w = x.shape[-2:]
    H, W = (-(-max(n, minimum) // multiple) * multiple for n in (h, w))
    if (H, W) == (h, w):
        return x
    rh, rw = min(H - h, h - 1), min(W - w, w - 1)
    x = F.pad(x, (0, rw, 0, rh), mode="reflect")
    return F.pad(x, (0, W - w - rw, 0, H - h - rh), mode="replicate")


# ------------------------------------------------------------------------------------------------
# Key layouts and the config


def old_esrgan_table(nb: int, n_up: int) -> list[tuple[str, str]]:
    """THE old-layout mapping, (regex on an old key's start, our prefix). Old ESRGAN saved one
    nn.Sequential: model.0 conv_first; model.1 a shortcut around `sub` = nb RRDBs (each conv a
    Sequential(conv, act), hence the .0) then the trunk conv; per x2 stage (Upsample, conv, LeakyReLU)
    at 3i-1..3i+1; then HR conv, LeakyReLU, last conv."""
    top = 3 * n_up + 4
    return [
        (r"model\.0\.", "conv_first."),
        (r"model\.1\.sub\.(\d+)\.RDB([123])\.conv([1-5])\.0\.", r"body.\1.rdb\2.conv\3."),
        (rf"model\.1\.sub\.{nb}\.", "conv_body."),
        *[(rf"model\.{3 * i}\.", f"conv_up{i}.") for i in range(1, n_up + 1)],
        (rf"model\.{top - 2}\.", "conv_hr."),
        (rf"model\.{top}\.", "conv_last."),
    ]


# the ESRGAN repo's later RRDBNet_arch (also KAIR, BSRGAN, RealSR): our layout under other names
_KAIR_NAMES = [
    ("RRDB_trunk.", "body."),
    (".RDB", ".rdb"),
    ("trunk_conv.", "conv_body."),
    ("upconv", "conv_up"),
    ("HRconv.", "conv_hr."),
]

# telltale keys of what a file that is not an ESRGAN might be, for the error (first match wins)
_LOOKS_LIKE = [
    ("lora", "a LoRA"),
    ("model.diffusion_model.", "a Stable Diffusion checkpoint"),
    ("relative_position_index_SA", "HAT / ATD (transformer upscalers)"),
    ("residual_group", "SwinIR / Swin2SR (transformer upscalers)"),
    ("layers.0.swin1.", "DRCT (a transformer upscaler)"),
    ("before_RG.", "DAT / RGT (transformer upscalers)"),
    ("block_1.c1_r.", "SPAN"),
    ("feats.1.", "PLKSR"),
    ("residual_layer.0.", "OmniSR"),
    ("unet1.conv1.", "Real-CUGAN"),
    ("m_head.", "SCUNet"),
    ("stylegan_decoder.", "GFPGAN (a face restorer)"),
    ("decoder.up", "a VAE"),
    ("body.0.weight", "Compact / SRVGGNetCompact (realesr-general-x4v3, realesr-animevideov3)"),
]
_SUPPORTED = (
    "supported: ESRGAN / RRDBNet upscalers (4x-UltraSharp, NMKD Siax, AnimeSharp, RealESRGAN_x4plus, x2plus, "
    "x4plus_anime_6B) in the old (model.0.weight, model.1.sub.0.RDB1...), Real-ESRGAN (conv_first, body.0.rdb1...) "
    "or ESRGAN-repo (conv_first, RRDB_trunk.0.RDB1...) layout."
)


def _unwrap(sd: dict) -> dict:
    """The state dict inside basicsr's / trainers' wrappers ("params_ema" before "params", as RealESRGANer),
    without DataParallel's "module." prefix."""
    for key in ("params_ema", "params", "state_dict", "model", "net"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def to_our_layout(sd: dict, source: str = "this file") -> dict:
    """Any supported layout -> ours (Real-ESRGAN's names), or a CheckpointError naming what it is."""
    sd = _unwrap(sd)
    if any(".conv1x1." in k for k in sd):
        raise CheckpointError(
            f"{source} looks like ESRGAN+ (RRDB blocks with extra 1x1 convs), not supported; {_SUPPORTED}"
        )
    if "model.0.weight" in sd and "model.1.sub.0.RDB1.conv1.0.weight" in sd:
        top = max(int(k.split(".")[1]) for k in sd if k.startswith("model."))
        nb = max(int(k.split(".")[3]) for k in sd if k.startswith("model.1.sub."))
        table = [(re.compile(p), r) for p, r in old_esrgan_table(nb, (top - 4) // 3)]
        renamed = {}
        for k, v in sd.items():
            for p, r in table:
                if p.match(k):
                    k = p.sub(r, k, count=1)
                    break
            renamed[k] = v  # an unmatched key stays as is and is reported by _check_keys
        return renamed
    if "conv_first.weight" in sd and "RRDB_trunk.0.RDB1.conv1.weight" in sd:
        for old, new in _KAIR_NAMES:
            sd = {k.replace(old, new): v for k, v in sd.items()}
        return sd
    if "conv_first.weight" in sd and "body.0.rdb1.conv1.weight" in sd:
        return sd
    what = next((name for key, name in _LOOKS_LIKE if any(key in k for k in sd)), None)
    if not sd:
        raise CheckpointError(f"{source} holds no tensors; it is not an upscaler. {_SUPPORTED}")
    if what is None:
        some = ", ".join(list(sd)[:4])
        raise CheckpointError(f"{source} is not a known upscaler (its first keys: {some}). {_SUPPORTED}")
    raise CheckpointError(f"{source} looks like {what}, not an ESRGAN-family upscaler. {_SUPPORTED}")


def config_from_state_dict(sd: dict) -> ESRGANConfig:
    """The config, from the shapes of a state dict in our layout. Pixel-unshuffle is recognised as spandrel
    does: conv_first reads 4x or 16x the channels that conv_last writes (Real-ESRGAN x2: 12 in, 3 out)."""
    nf, c_in = sd["conv_first.weight"].shape[:2]
    out_nc = sd["conv_last.weight"].shape[0] if "conv_last.weight" in sd else 3
    unshuffle = next((f for f in (2, 4) if c_in == out_nc * f * f), 1)
    return ESRGANConfig(
        in_nc=c_in // unshuffle**2,
        out_nc=out_nc,
        nf=nf,
        nb=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("body.")),
        gc=sd["body.0.rdb1.conv1.weight"].shape[0],
        n_up=sum(1 for k in sd if re.fullmatch(r"conv_up\d+\.weight", k)),
        unshuffle=unshuffle,
    )


def _check_keys(model: nn.Module, sd: dict, source: str) -> None:
    """Missing, unexpected or misshapen tensors as one readable error, not load_state_dict's wall of text."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = {
        "missing": [k for k in want if k not in sd],
        "unexpected": [k for k in sd if k not in want],
        "misshapen": [
            f"{k} {tuple(v.shape)} (expected {want[k]})" for k, v in sd.items() if want.get(k, v.shape) != v.shape
        ],
    }
    if any(problems.values()):
        said = "; ".join(
            f"{len(ks)} {name}: {', '.join(ks[:4])}{', ...' * (len(ks) > 4)}" for name, ks in problems.items() if ks
        )
        raise CheckpointError(
            f"{source} looks like an ESRGAN (RRDBNet) upscaler ({model.config}) but its tensors do not fit: {said}. "
            + _SUPPORTED
        )


# ------------------------------------------------------------------------------------------------
# Loading


def read_upscaler_file(path) -> dict:
    """The raw state dict of a .pth/.pt/.ckpt/.bin (plain tensors only: weights_only=True; both the zip and
    the pre-1.6 format) or .safetensors (memory-mapped), with the failure named rather than a stack trace."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no such file: {p}")
    if p.is_dir():
        raise CheckpointError(f"{p} is a folder; pass the upscaler's .pth or .safetensors file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p} is empty (0 bytes); re-download it")
    if p.suffix == ".safetensors":
        return read_safetensors(p)
    if p.suffix not in (".pth", ".pt", ".ckpt", ".bin"):
        raise CheckpointError(f"{p}: unknown file type {p.suffix!r}; ESRGAN upscalers come as .pth or .safetensors")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:
            raise CheckpointError(
                f"{p} is truncated or not a PyTorch file (unreadable pickle); re-download it"
            ) from None
        raise CheckpointError(
            f"refusing to load {p}: it holds a pickled {found[1]}, not only tensors, and minsdxl never runs pickled "
            "code (weights_only=True); convert it to .safetensors, or re-download it if the download was cut short"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:
        why = f" ({str(e).split('. ')[0]})" if isinstance(e, RuntimeError) else ""
        raise CheckpointError(f"{p} is truncated or not a PyTorch file{why}; re-download it") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p} holds a {type(obj).__name__}, not a state dict; it is not an upscaler")
    return obj


def load_upscaler(path, dtype: torch.dtype = torch.float32, device="cpu") -> RRDBNet:
    """An ESRGAN-family upscaler file -> RRDBNet in eval mode (`.config`, `.scale`), any supported layout."""
    sd = to_our_layout(read_upscaler_file(path), source=str(path))
    config = config_from_state_dict(sd)
    with torch.device("meta"):
        model = RRDBNet(config)
    _check_keys(model, sd, str(path))
    model.load_state_dict(sd, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# Running on images


def _tiles(size: int, tile: int, overlap: int):
    """(core start, core end, input start, input end) along one axis: cores of `tile` pixels, each read with
    `overlap` pixels of context on both sides where the image has them."""
    for start in range(0, size, tile):
        end = min(start + tile, size)
        yield start, end, max(start - overlap, 0), min(end + overlap, size)


@torch.inference_mode()
def upscale(
    model: RRDBNet,
    image: PIL.Image.Image,
    scale: float | None = None,
    tile: int = 512,
    overlap: int = 32,
    *,
    bgr: bool = False,
) -> PIL.Image.Image:
    """Upscale an image by the model: RGB / 255 in (float64, then the model's dtype), the network, clamp to
    [0, 1], x255, round half to even, 8-bit out: A1111's upscaler_utils conversion (its BGR flip only with
    bgr=True, below). Alpha is dropped (A1111's img.convert("RGB")).

    Tiling (tile <= 0: the whole image at once): the image is cut into cores of `tile` input pixels; each
    core runs with `overlap` pixels of real context on every side (fewer at the image border) and only its
    own upscaled core is kept (cropping, not blending: Real-ESRGAN's tile/tile_pad). So an image no larger
    than one tile gives exactly the untiled result, and elsewhere every output pixel comes from one tile
    that saw >= `overlap` pixels around it; the network's reach is wider, so seams differ from the untiled
    result by a little (tests/test_upscaler.py measures it). For x2/x1 models (pixel-unshuffle) tile and
    overlap are rounded to multiples of 4 (`RRDBNet.multiple`) so tiles keep the untiled unshuffle grid.
    A1111 tiles otherwise (192 px, 8 px overlap blended in PIL), so images larger than its tile do not match
    A1111's bytes near its seams.

    `scale` other than the model's (A1111's hires fix: e.g. 1.5 with a 4x model): as A1111's
    Upscaler.upscale, the model is run (again, up to 3 passes, while the image is smaller than the target),
    then the result is resized with PIL LANCZOS to (int(w * scale), int(h * scale)): A1111's hires target
    hr_upscale_to_x = int(width * hr_scale). (A1111 first resizes to that size rounded down to a multiple of 8
    when it is not one; SDXL sizes times the usual factors are.)

    bgr=True feeds the network BGR, as A1111's pil_image_to_torch_bgr does (the models were trained on RGB:
    ESRGAN's test.py, RealESRGANer, ComfyUI feed RGB), to reproduce A1111's images."""
    if scale is not None and scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    image = image.convert("RGB")
    target = None if scale is None else (int(image.width * scale), int(image.height * scale))
    for _ in range(3 if target else 1):
        size = image.size
        image = _run_tiled(model, image, tile, overlap, bgr)
        if image.size == size or target is None or (image.width >= target[0] and image.height >= target[1]):
            break
    if target is not None and image.size != target:
        image = image.resize(target, resample=PIL.Image.Resampling.LANCZOS)
    return image


def _run_tiled(model: RRDBNet, image: PIL.Image.Image, tile: int, overlap: int, bgr: bool) -> PIL.Image.Image:
    param = next(model.parameters())
    arr = np.asarray(image)[:, :, ::-1] if bgr else np.asarray(image)
    # A1111: np.array(img) / 255 (float64), then .to(dtype); the float32 cast of the float64 quotient
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)) / 255).to(param.dtype)[None]
    h, w = x.shape[-2:]
    s, m = model.scale, model.multiple
    if tile <= 0 or tile >= max(h, w):
        tile, overlap = max(h, w), 0
    else:  # tiles on the padding grid: inner tiles need no padding, edge tiles pad as the whole image does
        tile, overlap = max(tile // m, 1) * m, math.ceil(overlap / m) * m
    out = torch.empty(h * s, w * s, 3, dtype=torch.uint8)
    for y0, y1, iy0, iy1 in _tiles(h, tile, overlap):
        for x0, x1, ix0, ix1 in _tiles(w, tile, overlap):
            y = model(x[..., iy0:iy1, ix0:ix1].to(param.device))[0]
            y = y[:, (y0 - iy0) * s : (y1 - iy0) * s, (x0 - ix0) * s : (x1 - ix0) * s]
            # A1111's torch_bgr_to_pil_image: .float(), clamp(0, 1), 255 * x, round(), uint8 (fp32 multiply and
            # round-half-to-even are the same in torch and numpy), done per tile where the tile is
            y = (y.float().clamp(0, 1) * 255).round().to(torch.uint8)
            out[y0 * s : y1 * s, x0 * s : x1 * s] = y.permute(1, 2, 0).cpu()
    arr = out.numpy()
    return PIL.Image.fromarray(np.ascontiguousarray(arr[:, :, ::-1]) if bgr else arr, "RGB")
