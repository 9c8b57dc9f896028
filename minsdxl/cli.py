"""The `minsdxl` command line: the public Python API for generating, plus checkpoint's reading
helpers (resolve, read_checkpoint, build_*) for `info` and its hashes.

    minsdxl generate -p "a cat" --model sdxl-base               text2img -> outputs/00000-<seed>.png
    minsdxl generate -p "a cat" -i in.png --strength 0.5 ...     img2img (add --mask m.png: inpaint)
    minsdxl generate -p "make it red" -i in.png --model edit     an InstructPix2Pix model edits the image
    minsdxl generate ... --refiner sdxl-refiner                  base -> refiner handoff at --refiner-switch
    minsdxl generate --from-png outputs/00000-42.png             the same image again (flags given override)
    minsdxl generate --prompts-file prompts.txt --model sdxl-base   a job per line (prompt or flags), models loaded once
    minsdxl info sdxl-base                                       what a checkpoint is, without generating
    minsdxl convert sdxl-base sdxl.safetensors --dtype fp16      one layout to the other (.safetensors: one file)

`generate` may be left out, and `python -m minsdxl` is the same command. Flag names follow
stable-diffusion.cpp and A1111; each flag that is a sampler keyword defaults to the Python API's
default (shown by --help; -p, required in practice, defaults to ""), so defaults are written once, in
sampler.py.
"""

import argparse
import contextlib
import copy
import csv
import dataclasses
import functools
import inspect
import itertools
import json
import math
import os
import re
import secrets
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

import PIL.Image
import torch

import minsdxl
from minsdxl import checkpoint, guidance, tiny
from minsdxl.image import blur_mask, canny, outpaint_canvas, watermark_available
from minsdxl.metadata import SCHEMA, infotext, parse_infotext, read_png_metadata, save_png, sha256, short_hash
from minsdxl.prompt import WEIGHTINGS, hires_prompt
from minsdxl.schedulers import A1111_NAMES, SCHEDULERS, SDXL_SCHEDULER_CONFIG
from minsdxl.upscaler import load_upscaler, upscale

__all__ = ["main", "read_png_metadata", "describe_checkpoint"]

MODES = {
    "text2img": minsdxl.text2img,
    "img2img": minsdxl.img2img,
    "inpaint": minsdxl.inpaint,
    "instruct_pix2pix": minsdxl.instruct_pix2pix,
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STORAGE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# A1111's hires-fix upscalers that need no upscaler model: latent ones (F.interpolate's mode, antialias) and
# image ones (PIL's resampling); A1111's names
HIRES_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
    "Lanczos": PIL.Image.LANCZOS,
    "Nearest": PIL.Image.NEAREST,
}

# CLI argument -> sampler keyword. Unset (None), the keyword keeps the API's default.
API_KWARGS = {
    "prompt": "prompt",
    "prompt_2": "prompt_2",
    "negative_prompt": "negative_prompt",
    "negative_prompt_2": "negative_prompt_2",
    "steps": "num_inference_steps",
    "cfg": "guidance_scale",
    "image_cfg": "image_guidance_scale",
    "width": "width",
    "height": "height",
    "strength": "strength",
    "mask_padding": "padding_mask_crop",
    "original_size": "original_size",
    "crop_top_left": "crops_coords_top_left",
    "target_size": "target_size",
    "negative_original_size": "negative_original_size",
    "negative_crop_top_left": "negative_crops_coords_top_left",
    "negative_target_size": "negative_target_size",
    "aesthetic_score": "aesthetic_score",
    "negative_aesthetic_score": "negative_aesthetic_score",
    "clip_skip": "clip_skip",
    "prompt_weighting": "prompt_weighting",
    "eta": "eta",
    "controlnet_scale": "controlnet_conditioning_scale",
    "control_start": "control_guidance_start",
    "control_end": "control_guidance_end",
    "guess_mode": "guess_mode",
    "control_mode": "control_mode",
    "adapter_scale": "adapter_conditioning_scale",
    "adapter_factor": "adapter_conditioning_factor",
    "pag_scale": "pag_scale",
    "pag_adaptive_scale": "pag_adaptive_scale",
    "pag_layers": "pag_applied_layers",
    "tiling": "tiling",
    "guider": "guider",
    "variation_seed": "variation_seed",
    "variation_strength": "variation_strength",
}
# flags that say where and how a run runs, not what it makes: not stored for --from-png (a PNG made
# on a GPU replays on a CPU), and ignored where an older file stored them
RUN_ONLY = (
    "output",
    "outdir",
    "overwrite",
    "from_png",
    "batch",
    "verbose",
    "quiet",
    "no_metadata",
    "offload",
    "device",
    "compile",
    "prompts_file",
    "xyz",
)
# what a --prompts-file line may set: what one image is made of (the sampler keywords, seed, sampler, batch, its
# input images, hires fix, the refiner's handoff). The other flags load or change a model, or say where and how the
# run runs: the command line's, once for every line
LINE_OPTIONS = (
    *API_KWARGS,
    "seed",
    "sampler",
    "batch",
    "init_image",
    "mask",
    "outpaint",
    "outpaint_overlap",
    "mask_blur",
    "ip_adapter_image",
    "ip_adapter_embeds",
    "control_image",
    "adapter_image",
    "canny",
    "hires_scale",
    "hires_steps",
    "hires_strength",
    "refiner_mode",
    "refiner_switch",
    "refiner_strength",
)
# AUTOMATIC1111's prompts_from_file.py spellings that are one of our flags (its --prompt, --steps, --seed, --width
# and --height are ours already)
A1111_LINE_FLAGS = {
    "--negative_prompt": "--negative-prompt",
    "--cfg_scale": "--cfg",
    "--sampler_name": "--sampler",
    "--batch_size": "--batch",
}
# sampler keywords the metadata leaves out (tensors and hooks the CLI never sets)
UNRECORDED = (
    "generator",
    "latents",
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "masked_image_latents",
    "callback_on_step_end",
    "callback_on_step_end_tensor_inputs",
    "progress",
)


# ------------------------------------------------------------------------------------------------
# Arguments


def _size(text: str) -> tuple:
    """`WxH` -> (height, width), the order of diffusers' original_size / target_size."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 1024x1024, got {text!r}")
    return int(m.group(2)), int(m.group(1))


def _sides(text: str) -> tuple:
    """`L,T,R,B` -> (left, top, right, bottom) pixels."""
    m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected LEFT,TOP,RIGHT,BOTTOM pixels such as 0,0,256,0, got {text!r}")
    return tuple(int(v) for v in m.groups())


def _canny(text: str) -> tuple:
    """`LOW,HIGH` -> Canny's two thresholds."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH thresholds such as 100,200, got {text!r}") from None
    return low, high


def _pair(text: str) -> tuple:
    """`TOP,LEFT` -> (top, left), diffusers' crops_coords_top_left."""
    m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected TOP,LEFT such as 0,0, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _numbers(kind):
    """`0.5` -> 0.5, `0.5,0.8` -> [0.5, 0.8]: one value for all ControlNets (or control images), or one each."""

    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a {kind.__name__} or a comma-separated list, got {text!r}"
            ) from None
        return values[0] if len(values) == 1 else values

    return parse


def _each(value) -> list:
    """A flag that may be given once or several times (a path, or a list of them), or a metadata file entry
    (one {path, sha256, ...}, or a list of them), as a list."""
    return [] if value is None else [value] if isinstance(value, (str, dict)) else list(value)


def _one_or_list(value):
    """The other way: one path as itself (what a single --controlnet always stored), several as a list."""
    items = _each(value)
    return None if not items else items[0] if len(items) == 1 else items


def _freeu(text: str) -> tuple:
    """`S1,S2,B1,B2` -> the four FreeU factors (UNet2DConditionModel.enable_freeu's order)."""
    try:
        factors = tuple(float(v) for v in text.split(","))
    except ValueError:
        factors = ()
    if len(factors) != 4:
        raise argparse.ArgumentTypeError(f"expected S1,S2,B1,B2 such as 0.9,0.2,1.3,1.4 (SDXL's), got {text!r}")
    return factors


GUIDERS = {  # --guider NAME: minsdxl.guidance's rules (= diffusers' guiders)
    "cfg": "ClassifierFreeGuidance",
    "apg": "AdaptiveProjectedGuidance",
    "cfg_zero_star": "ClassifierFreeZeroStarGuidance",
    "tcfg": "TangentialClassifierFreeGuidance",
    "mambo": "MagnitudeAwareGuidance",
    "apg_mix": "AdaptiveProjectedMixGuidance",
    "fdg": "FrequencyDecoupledGuidance",
    "slg": "SkipLayerGuidance",
    "pag": "PerturbedAttentionGuidance",
    "seg": "SmoothedEnergyGuidance",
    "auto": "AutoGuidance",
}
# a layer guider's layers=BLOCKS.I+BLOCKS.J and how each is perturbed (LayerSkipConfig's) go to its configs
LAYER_KEYS = ("skip_attention", "skip_attention_scores", "skip_ff", "dropout")
# the APG paper's names for diffusers' long ones
GUIDER_ALIASES = {
    "momentum": "adaptive_projected_guidance_momentum",
    "norm_threshold": "adaptive_projected_guidance_rescale",
}


def make_guider(spec: str):
    """`NAME[:KEY=VALUE,...]` -> a minsdxl.guidance rule, e.g. apg:momentum=-0.5,norm_threshold=15,eta=1 or
    cfg:stop=0.8 (keys: the rule's own argument names; its guidance_scale defaults to --cfg)."""
    name, _, rest = spec.partition(":")
    if name not in GUIDERS:
        raise argparse.ArgumentTypeError(f"unknown guider {name!r}; one of {', '.join(GUIDERS)} (e.g. apg:eta=0.5)")
    cls = getattr(guidance, GUIDERS[name])
    layered = bool(cls._config)  # slg, pag, seg, auto: their layers=
    fields = [f.name for f in dataclasses.fields(cls) if not f.name.endswith(("_layers", "_config"))]
    keys = fields + (["layers"] + list(LAYER_KEYS) * (name != "seg")) * layered
    kw, layer_kw, layers = {}, {}, None
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        key = GUIDER_ALIASES.get(key.strip(), key.strip())
        if key not in keys or not eq:
            raise argparse.ArgumentTypeError(
                f"--guider {spec}: {item!r} is not KEY=VALUE with a key of {name}'s: {', '.join(keys)}"
            )
        try:
            if key == "layers":
                layers = _guider_layers(value)
            else:
                (layer_kw if key in LAYER_KEYS else kw)[key] = _guider_value(key, value)
        except (ValueError, KeyError):
            kind = (
                "BLOCKS.INDEX[+...]"
                if key == "layers"
                else "1 or 0"
                if key in GUIDER_FLAGS
                else "data or freq"
                if key == "guidance_rescale_space"
                else "a number (N+M+...: one per frequency level)"
            )
            raise argparse.ArgumentTypeError(f"--guider {spec}: {key} takes {kind}, got {value!r}") from None
    if layered:
        if layers is None:
            raise argparse.ArgumentTypeError(
                f"--guider {spec}: {name} perturbs layers: give layers=BLOCKS.INDEX[+...], e.g. "
                "layers=mid_block.attentions.0.transformer_blocks.0 (SDXL's middle block has 10, .0 to .9)"
            )
        make = guidance.SmoothedEnergyGuidanceConfig if name == "seg" else guidance.LayerSkipConfig
        try:
            configs = [make(indices, fqn, **layer_kw) for fqn, indices in layers.items()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"--guider {spec}: {e}") from None
        kw[cls._config] = configs
    try:
        return cls(**kw)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--guider {spec}: {e}") from None


GUIDER_FLAGS = ("use_original_formulation", "upcast_to_double", "skip_attention", "skip_attention_scores", "skip_ff")


def _guider_value(key: str, value: str):
    """A --guider value: a flag (1/0), FDG's rescale space, a step count, N+M+... (FDG's per-level values), a
    number, or "none" (no momentum)."""
    if key in GUIDER_FLAGS:
        return {"1": True, "true": True, "0": False, "false": False}[value.lower()]
    if key == "guidance_rescale_space":
        return {"data": "data", "freq": "freq"}[value]
    if value.lower() == "none":
        return None
    if key in ("zero_init_steps", "adaptive_projected_guidance_start_step"):
        return int(value)
    return tuple(float(v) for v in value.split("+")) if "+" in value or key == "guidance_scales" else float(value)


def _guider_layers(value: str) -> dict:
    """`BLOCKS.I+BLOCKS.J+...` (transformer blocks by their diffusers names) -> {BLOCKS: [I, J]}, in order."""
    out = {}
    for name in value.split("+"):
        fqn, _, index = name.strip().rpartition(".")
        if not fqn:
            raise ValueError(name)
        out.setdefault(fqn, []).append(int(index))
    return out


def _guider(text: str) -> str:
    make_guider(text)  # checked now; stored as written, made per call (and so replayed by --from-png)
    return text


def _deepcache(text: str) -> list[int]:
    """`N[:BRANCH]` -> [cache_interval, cache_branch_id] (a list: the PNG metadata's JSON keeps it one)."""
    interval, _, branch = text.partition(":")
    try:
        value = [int(interval), int(branch or 0)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--deepcache {text}: give N or N:BRANCH, whole numbers (e.g. 3:0)") from None
    if value[0] < 1 or not 0 <= value[1] <= 8:
        raise argparse.ArgumentTypeError(f"--deepcache {text}: N >= 1 (steps between full UNets), BRANCH in 0..8")
    return value


def _lora_spec(text: str) -> tuple[str, float]:
    """`PATH[:SCALE]` -> (path, scale); a colon that belongs to the path (C:\\loras\\x) stays in it."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def _embedding_spec(spec: str) -> tuple[str, str]:
    """`PATH[:TOKEN]` -> (path, token), the token defaulting to the file's name; a colon of the path stays."""
    path, sep, token = spec.rpartition(":")
    return (path, token) if sep and path and not Path(spec).is_file() else (spec, Path(spec).stem)


def _embeddings(args) -> list[tuple[str, str]]:
    """Every textual-inversion embedding of the run as (path, token): --embedding PATH[:TOKEN] flags (the
    token defaults to the file's name), then, as A1111 finds them, each --embedding-dir file whose name the
    prompts use as a word ("negativeXL_D" in the negative prompt loads negativeXL_D.safetensors)."""
    specs = []
    for spec in args.embedding or ():
        path, token = _embedding_spec(spec)
        if not Path(path).is_file():
            raise ValueError(f"--embedding {spec}: no file {path} (the form: PATH or PATH:TOKEN)")
        specs.append((path, token))
    if args.embedding_dir is not None:
        if not Path(args.embedding_dir).is_dir():
            raise ValueError(f"--embedding-dir {args.embedding_dir}: no such folder")
        text = " ".join(t for t in (args.prompt, args.prompt_2, args.negative_prompt, args.negative_prompt_2) if t)
        taken = {t.lower() for _, t in specs}
        for f in sorted(Path(args.embedding_dir).glob("*.safetensors")):
            used = re.search(rf"(?<![\w-]){re.escape(f.stem)}(?![\w-])", text, re.IGNORECASE)
            if used and f.stem.lower() not in taken:
                specs.append((str(f), f.stem))
    return specs


# A1111 / stable-diffusion.cpp extra-network tags: <lora:NAME> or <lora:NAME:W>
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")


def _loras(args) -> list[tuple[str, float]]:
    """Every LoRA of the run: --lora PATH[:SCALE] flags, then the prompts' <lora:NAME:W> tags."""
    specs = []
    for spec in args.lora or ():
        path, w = _lora_spec(spec)
        if not Path(path).is_file():
            raise ValueError(
                f"--lora {spec}: no file {path} (the form: PATH or PATH:SCALE, e.g. style.safetensors:0.8)"
            )
        specs.append((path, w))
    for name, w in (tag for text in (args.prompt, args.prompt_2) for tag in _LORA_TAG.findall(text or "")):
        tag = f"<lora:{name}{':' + w if w else ''}>"
        if args.lora_dir is None:
            raise ValueError(f"the prompt has {tag}: pass --lora-dir DIR, the folder holding {name}.safetensors")
        path = Path(args.lora_dir) / f"{name}.safetensors"
        if not path.is_file():
            raise ValueError(f"the prompt's {tag}: no file {path}")
        try:
            specs.append((str(path), float(w) if w else 1.0))
        except ValueError:
            raise ValueError(
                f"the prompt's {tag}: the weight must be one number (separate text-encoder and UNet weights "
                "are not supported)"
            ) from None
    return specs


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows argparse's defaults and, for flags left to the API, the API's default (from its signature)."""

    def _get_help_string(self, action):
        if action.dest in API_KWARGS and action.default is None:
            return action.help + _api_default(API_KWARGS[action.dest])
        if action.default in (None, False, ""):
            return action.help
        return super()._get_help_string(action)


def _api_default(keyword: str) -> str:
    found = {}
    for name, fn in MODES.items():
        p = inspect.signature(fn).parameters.get(keyword)
        if p is not None and p.default is not None:
            found.setdefault(p.default, []).append(name)
    if not found:
        return ""
    if len(found) == 1:
        return f" (default: {next(iter(found))})"
    return " (default: " + ", ".join(f"{v} for {'/'.join(names)}" for v, names in found.items()) + ")"


def build_parser():
    """(top-level parser, {"generate": parser, "info": parser})."""
    top = argparse.ArgumentParser(
        prog="minsdxl", description="Stable Diffusion XL in plain PyTorch.", formatter_class=_Help
    )
    top.add_argument("--version", action="version", version=f"minsdxl {minsdxl.__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="{generate,info,convert}")
    g = sub.add_parser(
        "generate", help="make images (the default command)", usage="%(prog)s [options]", formatter_class=_Help
    )
    add, out, talk = g.add_argument, g.add_mutually_exclusive_group(), g.add_mutually_exclusive_group()
    # fmt: off
    add("-p", "--prompt",                          default="",        help="what to draw")
    add("-n", "--negative-prompt",                 default=None,      help="what to avoid")
    add("--prompt-2",                              default=None,      help="prompt for the 2nd text encoder (bigG)")
    add("--negative-prompt-2",                     default=None,      help="negative prompt for the 2nd encoder")
    add("--steps",                     type=int,   default=None,      help="denoising steps")
    add("--cfg", "--guidance", "--cfg-scale", dest="cfg", type=float, default=None,
                                                                      help="classifier-free guidance scale")
    add("-s", "--seed",                type=int,   default=None,      help="seed (omitted or < 0: random, reported)")
    add("-W", "--width",               type=int,   default=None,      help="image width, a multiple of 8 (default: "
                                                                           "the init image's, else the model's)")
    add("-H", "--height",              type=int,   default=None,      help="image height, a multiple of 8")
    add("--sampler",                               default=None,      help=f"{', '.join(SCHEDULERS)} or A1111's "
                                                   f"{', '.join(A1111_NAMES)} (default: the model's)")
    add("--timestep-spacing", choices=("leading", "trailing", "linspace"), default=None,
                                                                      help="the sampler's timestep spacing over "
                                                                           "the model's (trailing for few-step "
                                                                           "UNets: SDXL-Lightning, Hyper-SD, Turbo)")
    add("--strength",                  type=float, default=None,      help="img2img/inpaint: how much to change")
    add("--image-cfg",                 type=float, default=None,      help="InstructPix2Pix models: how closely to "
                                                                           "keep the image (1.5)")
    add("--eta",                       type=float, default=None,      help="--sampler tcd: its gamma in [0, 1] "
                                                                           "(0.3 is TCD's usual)")
    add("-i", "--init-image",                      default=None,      help="start from this image (img2img); a "
                                                                           "folder: each image in it, the outputs "
                                                                           "named as the inputs (A1111's batch)")
    add("--mask",                                  default=None,      help="with -i: repaint its white part (with "
                                                                           "an -i folder: a folder of masks named "
                                                                           "as the images)")
    add("--outpaint", metavar="L,T,R,B", type=_sides, default=None,   help="with -i: extend the image by these "
                                                                           "pixels on its left, top, right and "
                                                                           "bottom, inpainting the new area")
    add("--outpaint-overlap", metavar="N", type=int, default=0,      help="--outpaint redraws N px of the image "
                                                                           "along the extended sides too")
    add("--mask-padding", metavar="N", type=int,   default=None,      help="inpaint only the box around the mask, "
                                                                           "N px wider, at -W x -H, and paste it "
                                                                           "back (A1111's 'only masked')")
    add("--mask-blur", metavar="N",    type=int,   default=None,      help="blur the mask, radius N px (diffusers' "
                                                                           "mask_processor.blur): --mask-padding "
                                                                           "pastes back with the soft edge")
    add("--hires-scale", metavar="F",  type=float, default=None,      help="A1111's hires fix: the text2img image "
                                                                           "is upscaled F times and reworked by "
                                                                           "img2img at --hires-strength")
    add("--hires-upscaler", metavar="NAME", default="Latent",        help="how the hires fix upscales: "
                                                                           + ", ".join(HIRES_UPSCALERS) + ", an "
                                                                           "ESRGAN-family upscaler file (e.g. "
                                                                           "4x-UltraSharp.pth), or its name in "
                                                                           "--upscaler-dir")
    add("--upscaler-dir", metavar="DIR", default=None,                help="where --hires-upscaler NAME (A1111's "
                                                                           "models/ESRGAN) finds NAME.pth")
    add("--hires-steps", metavar="N",  type=int,   default=None,      help="the hires pass's steps (default: "
                                                                           "--steps)")
    add("--hires-strength",            type=float, default=0.7,       help="the hires pass's denoising strength")
    add("-b", "--batch",               type=int,   default=1,         help="images, with seeds seed, seed+1, ...")
    out.add_argument("-o", "--output",             default=None,      help="output .png ({seed}, {index} allowed)")
    out.add_argument("--outdir",                   default="outputs", help="folder for {counter:05d}-{seed}.png")
    add("--overwrite",                 action="store_true",           help="replace existing output files")
    add("--from-png",                              default=None,      help="make the image this PNG's metadata "
                                                                           "describes again (flags given override)")
    add("--prompts-file", "--from-file", metavar="FILE", default=None, help="A1111's 'prompts from file': one "
                                                                           "job a line of FILE (-: standard input; "
                                                                           "blank and # lines skipped), models "
                                                                           "loaded once. A plain line is the prompt; "
                                                                           "a line starting with -- holds per-image "
                                                                           "flags (-p, -n, --steps, --cfg, -s, -W, "
                                                                           "-H, --sampler, -b, -i, ...; also A1111's "
                                                                           "--negative_prompt, --cfg_scale, "
                                                                           "--sampler_name, --batch_size) over these "
                                                                           "for that line (a line's <lora:> tags "
                                                                           "are its own). Model flags stay here")
    add("--xyz", metavar="FLAG=V1,V2,...", action="append", default=None,
                                                                      help="A1111's X/Y/Z plot: an axis (up to "
                                                                           "three: X, Y, Z) of a per-image flag's "
                                                                           "values (cfg=4,6,8; sampler=euler,"
                                                                           "dpmpp_2m; prompt-sr=red,blue replaces "
                                                                           "'red' in the prompt); every "
                                                                           "combination's image and a labelled "
                                                                           "grid of them")
    add("--model",                                 default="tiny",    help="diffusers SDXL folder or .safetensors "
                                                                           "(default: the bundled tiny model, which "
                                                                           "draws coloured shapes)")
    add("--model-config",                          default=None,      help="diffusers folder with the configs of "
                                                                           "a non-SDXL single-file --model")
    add("--vae",                                   default=None,      help="VAE file or folder to use instead, or "
                                                                           "TAESDXL (taesdxl_decoder.pth, its folder): "
                                                                           "fast, lower-quality decoding")
    add("--unet",                                  default=None,      help="UNet file or folder to use instead "
                                                                           "(e.g. SDXL-Lightning's or Hyper-SD's "
                                                                           "UNet over its base --model)")
    add("--lora-dir", "--lora-model-dir", metavar="DIR", default=None, help="where <lora:NAME:W> in the prompt "
                                                                           "finds NAME.safetensors (A1111 / "
                                                                           "stable-diffusion.cpp)")
    add("--lora", metavar="PATH[:SCALE]", action="append", default=None,
                                                                      help="a LoRA for the base model (kohya or "
                                                                           "diffusers .safetensors), SCALE default "
                                                                           "1; repeat to combine several")
    add("--embedding", metavar="PATH[:TOKEN]", action="append", default=None,
                                                                      help="an SDXL textual-inversion embedding "
                                                                           "(.safetensors with clip_l, clip_g), "
                                                                           "used where the prompts say TOKEN "
                                                                           "(default: the file's name); repeatable")
    add("--embedding-dir", "--embd-dir", metavar="DIR", default=None, help="embeddings a prompt names by file "
                                                                           "name load from here (A1111's "
                                                                           "embeddings/ folder)")
    add("--ip-adapter", metavar="FILE",            default=None,      help="an IP-Adapter for the base model (e.g. "
                                                                           "ip-adapter_sdxl.safetensors): "
                                                                           "--ip-adapter-image is the image prompt")
    add("--ip-adapter-image", metavar="IMAGE",     default=None,      help="the image prompt for --ip-adapter")
    add("--ip-adapter-embeds", metavar="FILE",     default=None,      help="instead of --ip-adapter-image: its "
                                                                           "embeddings, as diffusers' "
                                                                           "ip_adapter_image_embeds (a .safetensors "
                                                                           "or .pt tensor, [negative, positive] "
                                                                           "rows; e.g. a FaceID adapter's "
                                                                           "insightface embeddings)")
    add("--ip-adapter-scale",          type=float, default=None,      help="how much the image prompt counts "
                                                                           "(default 1; 0.5 is a common mix)")
    add("--image-encoder", metavar="DIR",          default=None,      help="--ip-adapter's CLIP image encoder "
                                                                           "folder (default: image_encoder next "
                                                                           "to the adapter file)")
    add("--controlnet", metavar="PATH", action="append", help="an SDXL ControlNet (or Control-LoRA) for the base "
                                                                           "model (diffusers folder or .safetensors)"
                                                                           "; --control-image is its input; again "
                                                                           "for several")
    add("--control-image", metavar="IMAGE", action="append", help="the --controlnet's control image (edges, "
                                                                           "depth, pose...): its size is the default"
                                                                           " text2img size; one per --controlnet, "
                                                                           "or several for one ControlNet-Union")
    add("--controlnet-scale", type=_numbers(float), default=None, help="how much the ControlNet counts "
                                                                           "(default 1.0; img2img 0.8); a,b: each")
    add("--control-start", type=_numbers(float), default=None, help="fraction of the steps where the "
                                                                           "ControlNet starts (default 0); a,b: each")
    add("--control-end", type=_numbers(float), default=None, help="... and where it stops (default 1)")
    add("--guess-mode", action="store_true",       default=None,      help="ControlNet guess mode: it sees no "
                                                                           "prompt (diffusers' guess_mode)")
    add("--control-mode", type=_numbers(int), default=None, help="a ControlNet-Union's kind of control "
                                                                           "image (xinsir: 0 openpose, 1 depth, 3 "
                                                                           "canny, ...); a,b: each image's")
    add("--canny", metavar="LOW,HIGH", nargs="?", type=_canny, const=(100.0, 200.0), default=None,
                                                                      help="the control / adapter images are "
                                                                           "photos: their Canny edges (OpenCV's, "
                                                                           "thresholds 100,200 unless given) drive "
                                                                           "the ControlNet or T2I-Adapter")
    add("--t2i-adapter", metavar="PATH",           default=None,      help="an SDXL T2I-Adapter (text2img; "
                                                                           "diffusers folder or .safetensors): "
                                                                           "--adapter-image is its input")
    add("--adapter-image", metavar="IMAGE",        default=None,      help="the --t2i-adapter's image (its size, "
                                                                           "rounded to 16, is the default size)")
    add("--adapter-scale",             type=float, default=None,      help="how much the T2I-Adapter counts "
                                                                           "(default 1.0)")
    add("--adapter-factor",            type=float, default=None,      help="fraction of the steps it acts in, "
                                                                           "from the start (default 1.0)")
    add("--refiner",                               default=None,      help="SDXL refiner folder or file")
    add("--refiner-config",                        default=None,      help="configs of a non-SDXL single-file refiner")
    add("--refiner-mode",   choices=("switch", "img2img"), default="switch",
                                                                      help="switch: the base hands its noisy latents "
                                                                           "over at --refiner-switch; img2img: the "
                                                                           "refiner reworks the finished image")
    add("--refiner-switch",            type=float, default=0.8,       help="fraction of the schedule the base runs")
    add("--refiner-strength",          type=float, default=0.3,       help="strength of the img2img refiner")
    add("--original-size",             type=_size, default=None,      help="micro-conditioning original size WxH")
    add("--crop-top-left",             type=_pair, default=None,      help="micro-conditioning crop TOP,LEFT")
    add("--target-size",               type=_size, default=None,      help="micro-conditioning target size WxH")
    add("--negative-original-size",    type=_size, default=None,      help="negative original size WxH")
    add("--negative-crop-top-left",    type=_pair, default=None,      help="negative crop TOP,LEFT")
    add("--negative-target-size",      type=_size, default=None,      help="negative target size WxH")
    add("--aesthetic-score",           type=float, default=None,      help="refiner aesthetic conditioning")
    add("--negative-aesthetic-score",  type=float, default=None,      help="refiner negative aesthetic score")
    add("--clip-skip",                 type=int,   default=None,      help="read N layers before SDXL's penultimate "
                                                                           "CLIP layer (diffusers' clip_skip)")
    add("--prompt-weighting",          choices=WEIGHTINGS, default=None, help="read the prompts in A1111's syntax: "
                                                                           "(word:1.3), (word), [word], BREAK, "
                                                                           "no 77-token limit (off: diffusers')")
    add("--dtype",           choices=("auto", *DTYPES), default="auto", help="auto: fp16 on CUDA, else fp32")
    add("--storage-dtype",     choices=STORAGE_DTYPES, default=None, help="store the UNet's layers in float8 "
                                                                           "(fp8: e4m3fn), each computed in --dtype: "
                                                                           "a quarter of fp32's memory, the image "
                                                                           "changed by the rounding (layerwise.py)")
    add("--device",                                default="auto",    help="cpu, cuda, cuda:N (auto: cuda if any)")
    add("--offload",                   action="store_true",           help="model offload: idle parts wait on the CPU")
    add("--compile",                   action="store_true",           help="torch.compile the UNet, VAE decoder and "
                                                                           "text encoders (minsdxl.compile; on CUDA "
                                                                           "with CUDA graphs): pays off over a batch")
    add("--pag-scale",                 type=float, default=None,      help="Perturbed-Attention Guidance's scale "
                                                                           "(off by default; 3 is diffusers' PAG "
                                                                           "default)")
    add("--pag-adaptive-scale",        type=float, default=None,      help="PAG's scale falls by this per "
                                                                           "timestep below 1000")
    add("--pag-layers", metavar="L1,L2", type=lambda t: t.split(","), default=None,
                                                                      help="the UNet layers PAG perturbs (default "
                                                                           "mid; e.g. mid,up_blocks.0.attentions.1)")
    add("--guider", metavar="NAME[:K=V,...]", type=_guider, default=None,
                                                                      help="another guidance rule than CFG "
                                                                           "(diffusers' guiders): apg, apg_mix, "
                                                                           "cfg_zero_star, tcfg, mambo, fdg, or cfg "
                                                                           "with start / stop; e.g. apg:momentum=-0.5,"
                                                                           "norm_threshold=15,eta=1; with layers="
                                                                           "BLOCKS.I[+...] perturbed: slg, pag, seg, "
                                                                           "auto. Its scale is --cfg")
    add("--variation-seed", metavar="N", type=int, default=None,
                                                                      help="A1111's variation seed: the starting "
                                                                           "noise turned toward this seed's by "
                                                                           "--variation-strength (counts up in a "
                                                                           "batch, as -s)")
    add("--variation-strength", metavar="F", type=float, default=None,
                                                                      help="how far toward --variation-seed's "
                                                                           "noise: 0 (none) .. 1 (all of it)")
    add("--seed-resize-from", metavar="WxH", type=_size, default=None,
                                                                      help="A1111's seed resize: this size's "
                                                                           "noise of the seed in the middle of "
                                                                           "the image's (keeps a composition "
                                                                           "found at WxH)")
    add("--tome", metavar="RATIO", type=float, default=None,
                                                                      help="Token Merging (tomesd; A1111's "
                                                                           "token merging): this share of the "
                                                                           "64x64-level tokens merged in "
                                                                           "self-attention (0.5: faster, less "
                                                                           "detail)")
    add("--deepcache", metavar="N[:BRANCH]", type=_deepcache, default=None,
                                                                      help="DeepCache: the whole UNet every N "
                                                                           "steps, its shallow branch BRANCH "
                                                                           "(0-8, default 0: the fastest) on "
                                                                           "cached deep features in between")
    add("--tiling",                    action="store_true",           help="a seamless, tileable image (A1111's "
                                                                           "Tiling: circular padding in the UNet "
                                                                           "and VAE)")
    add("--freeu", metavar="S1,S2,B1,B2", type=_freeu, default=None, help="FreeU on the base UNet: skip and "
                                                                           "backbone factors (SDXL: 0.9,0.2,1.3,1.4)")
    add("--vae-tiling",                action="store_true",           help="VAE in overlapping tiles above the VAE's "
                                                                           "sample size (1024 px): less memory, the "
                                                                           "image changes slightly (diffusers' "
                                                                           "enable_tiling)")
    add("--no-watermark",              action="store_true",           help="never add SDXL's invisible watermark")
    add("--no-metadata",               action="store_true",           help="write no parameters into the PNG")
    talk.add_argument("-v", "--verbose", action="store_true",         help="timings, dtypes, steps, peak memory")
    talk.add_argument("-q", "--quiet",   action="store_true",         help="no progress bars")

    i = sub.add_parser("info", help="describe a checkpoint without generating", formatter_class=_Help)
    i.add_argument("path",                                            help="SDXL folder, single file or component")
    i.add_argument("--config",                     default=None,      help="configs of a non-SDXL single file")
    i.add_argument("--json",           action="store_true",           help="print JSON")
    c = sub.add_parser("convert", help="write a checkpoint in the other layout", formatter_class=_Help)
    c.add_argument("source",                                          help="SDXL folder or single file")
    c.add_argument("dest",                                            help="a .safetensors file (Stability's single "
                                                                           "file) or a new folder (diffusers)")
    c.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="cast the weights (default: "
                                                                           "as stored)")
    c.add_argument("--storage-dtype", choices=STORAGE_DTYPES, default=None, help="the UNet's layers in float8 "
                                                                           "(the rest in --dtype, default fp16), "
                                                                           "as ComfyUI's fp8 checkpoints")
    c.add_argument("--config",                     default=None,      help="configs of a non-SDXL single file")
    # fmt: on
    return top, {"generate": g, "info": i, "convert": c}


# ------------------------------------------------------------------------------------------------
# Entry point


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top, commands = build_parser()
    if not argv or argv[0] in ("-h", "--help", "--version"):
        top.parse_args(argv)  # prints help / version, or the "command required" error; exits
    command = argv.pop(0) if argv[0] in commands else "generate"
    args = None
    try:
        args = commands[command].parse_args(argv)
        if command == "info":
            return info(args)
        if command == "convert":
            return convert(args)
        source = None
        if args.from_png:
            source = _read_source(args.from_png)
            # stored values fill the namespace first; argparse then sets only what the command line gives
            stored = {k: v for k, v in source["args"].items() if k not in RUN_ONLY}
            _check_stored(stored, commands["generate"], args.from_png)
            # appending flags: given now, they replace the stored list
            kept = {k: stored.pop(k, None) for k in ("lora", "embedding", "controlnet", "control_image")}
            args = commands["generate"].parse_args(argv, namespace=argparse.Namespace(**stored))
            for k, v in kept.items():
                setattr(args, k, _each(v) if getattr(args, k) is None and v else getattr(args, k))
            if source.get("a1111") and args.model == tiny.NAME:
                raise ValueError(
                    f"{args.from_png} was made by A1111 with the model {source['a1111']}: pass --model PATH (a "
                    "model is not found by its name)"
                )
            if source.get("a1111"):
                _warn(f"{args.from_png} is A1111's: its settings, not its pixels (A1111 draws its noise otherwise)")
            if args.hires_scale is not None and _find_upscaler(args) is None:
                _warn(
                    f"{args.from_png}'s hires upscaler {args.hires_upscaler} is not here (pass --upscaler-dir DIR "
                    "holding it): Lanczos instead"
                )
                args.hires_upscaler = "Lanczos"
            if source.get("a1111_refiner") and not args.refiner:
                _warn(f"{args.from_png} was refined with {source['a1111_refiner']}: pass --refiner PATH for that")
        lines = _read_prompts_file(args.prompts_file, commands["generate"]) if args.prompts_file else ()
        axes = None
        if args.xyz:
            lines, axes = _xyz_lines(args, commands["generate"])
        if args.init_image and Path(args.init_image).is_dir():
            lines = _folder_lines(args)
        return generate(args, source, lines, axes)
    except PromptsFileError as e:  # a usage error, as argparse's: status 2
        print(f"minsdxl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minsdxl: interrupted", file=sys.stderr)
        return 130
    except torch.cuda.OutOfMemoryError:
        print("minsdxl: error: out of GPU memory; try --dtype fp16, a smaller -W/-H, or -b 1", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError, FloatingPointError) as e:  # CheckpointError is a ValueError
        if args is not None and getattr(args, "verbose", False):
            traceback.print_exc()
        print(f"minsdxl: error: {e}", file=sys.stderr)
        return 1


class PromptsFileError(ValueError):
    """A --prompts-file that cannot be read, or a line of it that is not a valid job (the message names FILE:LINE)."""


def _read_prompts_file(path, parser) -> list:
    """--prompts-file: [(FILE:LINE, {flag: value})], a line's own flags, read by the command line's parser (its
    names, types and checks) and held to LINE_OPTIONS. A plain line is {"prompt": line}."""
    name = "<stdin>" if path == "-" else path
    try:
        text = (sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()).decode("utf-8-sig")
    except OSError as e:
        raise PromptsFileError(f"--prompts-file {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise PromptsFileError(f"--prompts-file {path}: not UTF-8 text ({e}); save it as UTF-8") from None
    parse, longest = _line_parser(parser)
    lines = []
    for n, line in enumerate(text.split("\n"), 1):
        line, where = line.strip(), f"{name}:{n}"
        if not line or line.startswith("#"):
            continue
        if not line.startswith("--"):  # = A1111: only a line starting with -- holds flags
            first = line.split()[0]
            if first in longest:  # "-s 3 -W 64" as a prompt: surely meant as flags
                raise PromptsFileError(
                    f"{where}: starts with the flag {first}, but only a line starting with -- holds flags (any "
                    f"other is a prompt): write {longest[first]} for {first} there"
                )
            lines.append((where, {"prompt": line}))
            continue
        try:
            words = [_ours(word) for word in shlex.split(line)]
        except ValueError as e:  # shlex's unclosed quote
            raise PromptsFileError(f"{where}: {e}") from None
        lines.append((where, parse(words, where)))
    if not lines:
        raise PromptsFileError(f"--prompts-file {path} holds no prompt, only blank lines and # comments")
    return lines


def _line_parser(parser):
    """(parse(words, where) -> {dest: value} of just the flags the words give, held to LINE_OPTIONS; {flag
    spelling: its longest spelling}) for prompts-file lines and X/Y/Z values, by the command line's parser."""
    parser = copy.copy(parser)  # raising where the command line's prints usage and exits

    def error(message):
        raise PromptsFileError(message)

    parser.error = error
    parser.print_help = lambda *_: error("-h/--help belongs on the command line")
    # argparse sets a flag's default only where the namespace has no value: one of None everywhere leaves
    # exactly the flags the words give set
    unset = dict.fromkeys(vars(parser.parse_args([])))
    actions = parser._actions  # argparse keeps no public list of its flags
    flags = {action.dest: "/".join(action.option_strings) for action in actions}
    longest = {s: action.option_strings[-1] for action in actions for s in action.option_strings}

    def parse(words, where):
        try:
            given = {
                k: v for k, v in vars(parser.parse_args(words, argparse.Namespace(**unset))).items() if v is not None
            }
        except PromptsFileError as e:  # argparse's unknown flag or bad value
            raise PromptsFileError(f"{where}: {e}") from None
        for dest in given:
            if dest == "hires_upscaler" and given[dest] in HIRES_UPSCALERS:  # a resize, no upscaler model to load
                continue
            if dest not in LINE_OPTIONS:
                raise PromptsFileError(
                    f"{where}: {flags[dest]} is not a per-image flag (it loads or changes a model, or sets where and "
                    "how the whole run runs): give it on the command line, where it applies to every image"
                )
        return given

    return parse, longest


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _folder_lines(args) -> list:
    """-i FOLDER (A1111's img2img batch): a job per image in it, by name; with --mask FOLDER, each image's mask is
    the file of the same name (any image suffix) there."""
    if args.prompts_file or args.xyz:
        raise PromptsFileError("an -i folder (a batch of images) goes without --prompts-file and --xyz")
    if args.output:
        raise PromptsFileError("an -i folder names its outputs after its images: give --outdir, not -o")
    images = sorted(p for p in Path(args.init_image).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise PromptsFileError(f"-i {args.init_image}: the folder holds no image ({', '.join(IMAGE_SUFFIXES)})")
    masks = {}
    if args.mask:
        if not Path(args.mask).is_dir():
            raise PromptsFileError(f"--mask {args.mask}: with an -i folder, a folder of masks named as the images")
        masks = {p.stem: p for p in Path(args.mask).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        missing = [p.name for p in images if p.stem not in masks]
        if missing:
            raise PromptsFileError(f"--mask {args.mask} has no mask for {', '.join(missing[:5])}")
    return [(str(p), {"init_image": str(p), **({"mask": str(masks[p.stem])} if masks else {})}) for p in images]


def _folder_outputs(args, jobs) -> list:
    """An -i folder's outputs: --outdir/NAME.png for each input NAME.* (NAME-K.png for a batch's K-th)."""
    paths = []
    for job in jobs:
        stem, n = Path(job.args.init_image).stem, job.args.batch
        paths += [Path(args.outdir) / (f"{stem}-{k}.png" if n > 1 else f"{stem}.png") for k in range(n)]
    if len(set(paths)) < len(paths):
        raise ValueError(f"-i {args.init_image} holds images of the same name and other suffixes: rename them")
    return _free(paths, args)


def _xyz_lines(args, parser) -> tuple[list, list]:
    """--xyz: A1111's X/Y/Z plot as jobs, X fastest: ([(where, {dest: value})], [(axis label, [value labels])]).
    An axis is FLAG=V1,V2,... (CSV: quote a value holding a comma), FLAG a per-image flag's long name, or
    prompt-sr (A1111's Prompt S/R: the first value is searched for in the prompts and replaced by each)."""
    if len(args.xyz) > 3:
        raise PromptsFileError(f"--xyz: at most three axes (X, Y, Z), got {len(args.xyz)}")
    if args.prompts_file:
        raise PromptsFileError("--xyz and --prompts-file: one or the other (an X/Y/Z plot of one prompt's settings)")
    parse, _ = _line_parser(parser)
    axes = []
    for axis in args.xyz:
        flag, eq, values = axis.partition("=")
        values = next(csv.reader([values], skipinitialspace=True), []) if eq else []
        if not flag or not values or "" in values:
            raise PromptsFileError(f"--xyz {axis}: write FLAG=V1,V2,... (e.g. cfg=4,6,8 or sampler=euler,dpmpp_2m)")
        if flag in [f for f, _, _ in axes]:
            raise PromptsFileError(f"--xyz {axis}: {flag} is on two axes; give each flag one axis")
        if len(flag) == 1:
            raise PromptsFileError(f"--xyz {axis}: name the flag by its long name (e.g. width=, height=, steps=)")
        if flag == "prompt-sr":  # = A1111's Prompt S/R: values[0] in the prompt and negative prompt, replaced
            texts = {k: getattr(args, k) for k in ("prompt", "negative_prompt") if getattr(args, k)}
            if values[0] not in texts.get("prompt", ""):
                raise PromptsFileError(f"--xyz {axis}: Prompt S/R looks for {values[0]!r}, which the prompt lacks")
            settings = [{k: t.replace(values[0], v) for k, t in texts.items()} for v in values]
        else:
            settings = [parse([f"--{flag}", v], f"--xyz {axis}") for v in values]
        axes.append((flag, values, settings))
    lines = []
    for combo in itertools.product(*(list(zip(v, s)) for _, v, s in reversed(axes))):
        combo = combo[::-1]  # X, Y, Z
        where = "--xyz " + ", ".join(f"{flag}={v}" for (flag, _, _), (v, _) in zip(axes, combo))
        lines.append((where, {k: x for _, given in combo for k, x in given.items()}))
    return lines, [(flag, values) for flag, values, _ in axes]


def _ours(word: str) -> str:
    """An A1111 prompts-file flag (--cfg_scale 7, --cfg_scale=7) in our spelling; any other word as it is."""
    flag, eq, value = word.partition("=")
    return A1111_LINE_FLAGS[flag] + eq + value if flag in A1111_LINE_FLAGS else word


@contextlib.contextmanager
def _at(where, error=PromptsFileError):
    """A prompts-file line's errors name it (FILE:LINE: ...); the command line's (where None) are left as they are."""
    try:
        yield
    except ValueError as e:
        if where is None:
            raise
        raise error(f"{where}: {e}") from None


def _log(args, message):
    if args.verbose:
        print(f"minsdxl: {message}", file=sys.stderr)


def _warn(message):  # also under -q, which only hides progress bars: these say the result is not what was asked
    print(f"minsdxl: warning: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# generate


def generate(args, source=None, lines=(), axes=None) -> int:
    """The command line's images, or with `lines` (a prompts file's, from _read_prompts_file, or an X/Y/Z plot's
    cells, with its `axes`) each line's in turn: every line checked before a model loads, the models loaded once."""
    jobs = _jobs(args, lines)
    grid = _grid_path(args) if axes else None  # (checked writable before anything loads)
    model_path = checkpoint.resolve(args.model)
    if source is not None and args.model == source["args"].get("model") and not model_path.exists():
        raise ValueError(
            f"{args.from_png} was made with the model {args.model}, which is not there any more; pass --model PATH "
            f"(its sha256 began {source.get('model', {}).get('hash')})"
        )
    seeds = [job.args.seed + k for job in jobs for k in range(job.args.batch)]
    folder = args.init_image and Path(args.init_image).is_dir()  # A1111's img2img batch: outputs named as inputs
    paths = iter(_folder_outputs(args, jobs) if folder else _output_paths(args, seeds))
    args.device = _device(args.device)
    auto = args.dtype == "auto"
    args.dtype = args.dtype if not auto else "fp16" if args.device.startswith("cuda") else "fp32"
    base, refiner = _load(args, auto)
    where = "cpu" if base.offload_device else args.device  # offload: the sampler moves them, as the UNet
    nets = {}  # the base call's ControlNet / T2I-Adapter
    for paths_, key, load in (
        (args.controlnet, "controlnet", functools.partial(minsdxl.load_controlnet, unet=base.unet)),  # Control-LoRA
        (args.t2i_adapter, "adapter", minsdxl.load_t2i_adapter),
    ):
        loaded = []
        for path in _each(paths_):
            t = time.perf_counter()
            loaded.append(load(path, dtype=base.unet.dtype, device=where))
            _log(args, f"loaded the {loaded[-1].kind} {path} in {time.perf_counter() - t:.1f} s")
        if loaded:  # several: diffusers' MultiControlNetModel, summed
            nets[key] = loaded if len(loaded) > 1 else loaded[0]
    for job in jobs:  # what needs the model, for every line before the first image is written
        job.args.device, job.args.dtype = args.device, args.dtype
        _absolute(job.args)  # a line's own files; the rest as _load made them
        with _at(job.where):
            job.mode = _model_mode(job.args, job.mode, base)
            job.sched = minsdxl.make_scheduler(job.args.sampler or base.scheduler, base.scheduler_config)
        # stored resolved, so --from-png does not depend on the model's default (where a name says it)
        job.args.sampler = _scheduler_name(job.sched, base.scheduler_config)

    done = 0
    for job in jobs:
        a = job.args
        with _at(job.where, ValueError):  # exit status 1: earlier lines' images are written
            active = None if job.loras is None else _activate_loras(a, base, job.loras)
            about = None if a.no_metadata else _describe_run(a, job.mode, base, refiner, job.sched, source, active)
            source = None  # its warnings once
            init, mask, width, height = _read_images(a, _mode(a))
            extra = {**_image_prompts(a, _mode(a)), **nets}
            for k in range(a.batch):
                seed, path, t = a.seed + k, next(paths), time.perf_counter()
                image, calls, steps = _generate_one(a, job.mode, base, refiner, init, mask, extra, width, height, seed)
                done += 1
                _log(a, f"image {done}/{len(seeds)}: {' + '.join(steps)} steps in {time.perf_counter() - t:.1f} s")
                text = {} if about is None else _metadata(a, about, image, calls, seed, k)
                path.parent.mkdir(parents=True, exist_ok=True)
                save_png(image, path, text, overwrite=a.overwrite)
                print(f"saved {path} (seed {seed})")
                if axes and k == 0:  # (only a grid needs images kept: a folder batch may be thousands)
                    job.first = (image, path)
    if axes:
        save_grid(grid, [job.first for job in jobs], axes)
        print(f"saved {grid} (the X/Y/Z grid)")
    _log(args, _peak_memory(args.device))
    return 0


def _grid_path(args) -> Path:
    """Where an X/Y/Z plot's grid goes: beside -o's images (NAME-grid.png), else --outdir's xyz_grid-NNNNN.png."""
    if args.output:
        p = Path(args.output.replace("{seed}", "").replace("{index}", ""))
        path = p.with_name(p.stem.rstrip("-_") + "-grid.png")
    else:
        path = Path(args.outdir) / f"xyz_grid-{_next_counter(Path(args.outdir)):05d}.png"
    return _free([path], args)[0]


def save_grid(path, cells: list, axes: list) -> None:
    """A1111's X/Y/Z grid: one picture per Z value side by side, each X columns by Y rows of the images (first
    of each cell's batch), X values above, Y values left, Z above each; its PNG text says where each image is."""
    from PIL import ImageDraw, ImageFont

    n = [len(values) for _, values in axes] + [1] * (3 - len(axes))
    labels = [[f"{flag}: {v}" for v in values] for flag, values in axes] + [[""]] * (3 - len(axes))
    cw, ch = max(im.width for im, _ in cells), max(im.height for im, _ in cells)
    font = ImageFont.load_default(size=max(12, ch // 16))
    size = lambda text: ImageDraw.Draw(PIL.Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)[2:]  # noqa: E731
    pad = max(4, ch // 32)
    left = max(size(t)[0] for t in labels[1]) + 2 * pad if len(axes) > 1 else 0
    line = size("Ag")[1] + 2 * pad
    top = line * (1 + (len(axes) > 2))  # Z's title over X's labels
    gw = left + n[0] * cw
    grid = PIL.Image.new("RGB", (n[2] * gw + (n[2] - 1) * 2 * pad, top + n[1] * ch), "white")
    draw, where = ImageDraw.Draw(grid), []
    for k, (image, image_path) in enumerate(cells):  # X fastest, then Y, then Z
        x, y, z = k % n[0], k // n[0] % n[1], k // (n[0] * n[1])
        ox = z * (gw + 2 * pad)
        px, py = ox + left + x * cw + (cw - image.width) // 2, top + y * ch + (ch - image.height) // 2
        grid.paste(image, (px, py))
        where.append({"x": px, "y": py, "width": image.width, "height": image.height, "image": str(image_path)})
        if y == 0:
            draw.text((ox + left + x * cw + cw // 2, top - line // 2), labels[0][x], "black", font, anchor="mm")
        if x == 0 and left:
            draw.text((ox + left - pad, top + y * ch + ch // 2), labels[1][y], "black", font, anchor="rm")
        if x == 0 and y == 0 and len(axes) > 2:
            draw.text((ox + left + n[0] * cw // 2, line // 2), labels[2][z], "black", font, anchor="mm")
    axes_text = [{"flag": flag, "values": values} for flag, values in axes]
    save_png(grid, path, {"minsdxl_grid": json.dumps({"axes": axes_text, "cells": where})}, overwrite=True)


@dataclasses.dataclass
class _Job:
    """The images of the command line, or of one prompts-file line: its own arguments (the command line's with
    the line's flags over them), where it was written (FILE:LINE, for messages), its mode and scheduler."""

    args: argparse.Namespace
    where: str | None = None
    mode: str = ""
    sched: object = None
    loras: list | None = None  # a prompts-file line's [(path, weight)]
    first: tuple | None = None  # an X/Y/Z cell's (first image, its path), for the grid


def _jobs(args, lines) -> list:
    """The run's jobs, each checked, its images read and its seed drawn before anything loads: the
    command line, or one per prompts-file line."""
    if getattr(args, "xyz", None) and (args.seed is None or args.seed < 0):
        args.seed = secrets.randbelow(2**32)  # = A1111's X/Y/Z plot (fix_seed): one seed for the grid, not per cell
    if not lines:
        jobs = [_Job(args)]
    else:
        jobs = [_Job(argparse.Namespace(**{**vars(args), **given}), where) for where, given in lines]
    for job in jobs:
        a = job.args
        with _at(job.where):
            if lines:  # its LoRAs (--lora and its prompt's tags), checked now, made active for its images
                job.loras = _loras(a)
            a.controlnet, a.control_image = _one_or_list(a.controlnet), _one_or_list(a.control_image)
            job.mode = _mode(a)
            _check(a, job.mode)
            _read_images(a, job.mode)  # readable, sizes agree; read again when its turn comes
            _image_prompts(a, job.mode, with_edges=False)
        if a.seed is None or a.seed < 0:  # per line: a line without a seed anywhere gets its own
            a.seed = secrets.randbelow(2**32)
    if lines:  # the embeddings any line names in --embedding-dir load once, for all (as A1111 loads its folder)
        found = {t.lower(): f"{p}:{t}" for job in jobs for p, t in _embeddings(job.args)}
        for a in (args, *(job.args for job in jobs)):
            a.embedding = list(found.values()) or a.embedding  # every line's metadata names them all: exact replay
    return jobs


def _mode(args) -> str:
    return "inpaint" if args.mask or args.outpaint else "img2img" if args.init_image else "text2img"


def _model_mode(args, mode, base) -> str:
    """The checks only the loaded model can make; an InstructPix2Pix model's mode."""
    if base.kind == "inpaint" and mode != "inpaint":
        raise ValueError(f"--model {args.model} is an SDXL inpainting model: pass -i IMAGE and --mask MASK")
    if base.kind == "instruct_pix2pix" or args.image_cfg is not None:
        _check_pix2pix(args, base, mode)
        mode = "instruct_pix2pix"  # the image it edits is the -i image, at the size img2img would give it
        if args.guider:
            raise ValueError("--guider: an InstructPix2Pix model guides by prompt and image (--cfg, --image-cfg) only")
    if base.kind == "refiner" and mode == "text2img":
        raise ValueError(
            f"--model {args.model} is an SDXL refiner, which only refines: pass -i IMAGE, or give it "
            "as --refiner after a base --model"
        )
    return mode


def _check(args, mode):
    """Every user error that needs no model, before anything heavy."""
    for flag, v in (("-W/--width", args.width), ("-H/--height", args.height)):
        if v is not None and (v <= 0 or v % 8):
            lo = max(v - v % 8, 8)
            raise ValueError(
                f"{flag} {v} is not a positive multiple of 8 (the VAE downsamples by 8); use {lo} or {lo + 8}"
            )
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.cfg is not None and not math.isfinite(args.cfg):  # (an --xyz cell too: before any image is made)
        raise ValueError(f"--cfg must be a finite number (1 or less: no CFG), got {args.cfg}")
    if args.strength is not None and not 0 < args.strength <= 1:
        raise ValueError(f"--strength must be in (0, 1] (the share of the schedule run), got {args.strength}")
    if args.seed is not None and not -(2**63) <= args.seed < 2**64:
        raise ValueError(f"-s/--seed must be in [0, 2**64), got {args.seed}")
    if args.batch < 1:
        raise ValueError(f"-b/--batch must be at least 1, got {args.batch}")
    if args.tome is not None and not 0 <= args.tome <= 0.75:
        raise ValueError(f"--tome {args.tome}: the share of tokens merged is in [0, 0.75] (2x2 cells keep one)")
    if args.variation_strength is not None and not 0 <= args.variation_strength <= 1:
        raise ValueError(f"--variation-strength must be in [0, 1], got {args.variation_strength}")
    if args.variation_strength and (args.variation_seed is None or args.variation_seed < 0):
        raise ValueError("--variation-strength turns the noise toward another seed's: give it as --variation-seed N")
    if (args.mask or args.outpaint) and not args.init_image:
        raise ValueError("--mask and --outpaint need the image to repaint: pass it with -i/--init-image")
    if args.outpaint and args.mask:
        raise ValueError("--outpaint makes its own mask (the added area): drop --mask")
    if (args.outpaint and not any(args.outpaint)) or args.outpaint_overlap < 0:
        raise ValueError(f"--outpaint {args.outpaint} adds nothing, or --outpaint-overlap is negative")
    if args.mask_padding is not None and args.mask_padding < 0:
        raise ValueError(f"--mask-padding must be 0 or more pixels, got {args.mask_padding}")
    if args.mask_blur is not None and (args.mask_blur < 0 or mode != "inpaint"):
        raise ValueError(f"--mask-blur {args.mask_blur}: a blur radius of 0 or more pixels, for --mask or --outpaint")
    if args.mask_padding is not None and mode != "inpaint":
        raise ValueError("--mask-padding crops around the mask: pass --mask or --outpaint (and -i) too")
    if args.mask_padding is not None and args.refiner and args.refiner_mode == "switch":
        raise ValueError(
            "--mask-padding pastes a finished image back, but --refiner-mode switch hands noisy latents to the "
            "refiner: use --refiner-mode img2img with it"
        )
    if args.hires_scale is not None:
        if mode != "text2img" or (args.refiner and args.refiner_mode == "switch"):
            raise ValueError(
                "--hires-scale reworks a text2img image: drop -i/--init-image, and with --refiner use "
                "--refiner-mode img2img (the refiner then reworks the hires image)"
            )
        found = _find_upscaler(args)
        if found is None:
            raise ValueError(
                f"--hires-upscaler {args.hires_upscaler}: not one of {', '.join(HIRES_UPSCALERS)}, no such file, and "
                "no NAME.pth / NAME.safetensors in --upscaler-dir"
            )
        args.hires_upscaler = found
        if (
            args.hires_scale < 1
            or not 0 < args.hires_strength <= 1
            or (args.hires_steps is not None and args.hires_steps < 1)
        ):
            raise ValueError(
                f"--hires-scale {args.hires_scale} (>= 1), --hires-strength {args.hires_strength} (in (0, 1]) and "
                f"--hires-steps {args.hires_steps} (>= 1) are out of range"
            )
    if args.strength is not None and mode == "text2img":
        raise ValueError("--strength applies to img2img and inpaint: pass an image with -i/--init-image")
    if args.refiner and not 0 < args.refiner_switch < 1:
        raise ValueError(f"--refiner-switch must be a fraction in (0, 1), got {args.refiner_switch}")
    if args.refiner and not 0 < args.refiner_strength <= 1:
        raise ValueError(f"--refiner-strength must be in (0, 1], got {args.refiner_strength}")
    if args.sampler is not None:
        minsdxl.make_scheduler(args.sampler)  # unknown names raise, listing the valid ones
    _loras(args)  # missing files and bad weights
    _embeddings(args)
    if args.ip_adapter_image and args.ip_adapter_embeds:
        raise ValueError("--ip-adapter-image and --ip-adapter-embeds: the image or its embeddings, not both")
    if bool(args.ip_adapter) != bool(args.ip_adapter_image or args.ip_adapter_embeds):
        raise ValueError(
            "--ip-adapter FILE and --ip-adapter-image IMAGE (or --ip-adapter-embeds) go together: pass both"
        )
    if (args.ip_adapter_scale is not None or args.image_encoder) and not args.ip_adapter:
        raise ValueError("--ip-adapter-scale and --image-encoder apply to an --ip-adapter: pass one")
    if bool(args.controlnet) != bool(args.control_image):
        raise ValueError("--controlnet PATH and --control-image IMAGE go together: pass both")
    knobs = (args.controlnet_scale, args.control_start, args.control_end, args.guess_mode, args.control_mode)
    if not args.controlnet and any(v is not None for v in knobs):
        raise ValueError(
            "--controlnet-scale, --control-start, --control-end, --guess-mode and --control-mode apply to a "
            "--controlnet"
        )
    if args.canny and not (args.controlnet or args.t2i_adapter):
        raise ValueError("--canny turns control images into edges: pass a --controlnet or --t2i-adapter with it")
    if bool(args.t2i_adapter) != bool(args.adapter_image):
        raise ValueError("--t2i-adapter PATH and --adapter-image IMAGE go together: pass both")
    if not args.t2i_adapter and (args.adapter_scale is not None or args.adapter_factor is not None):
        raise ValueError("--adapter-scale and --adapter-factor apply to a --t2i-adapter")
    if args.t2i_adapter and mode != "text2img":
        raise ValueError("--t2i-adapter works in text2img (as diffusers' adapter pipeline): drop -i/--init-image")
    if args.t2i_adapter and not Path(args.t2i_adapter).exists():
        raise ValueError(f"--t2i-adapter {args.t2i_adapter}: no such file or folder")
    for path in _each(args.controlnet):
        if not Path(path).exists():
            raise ValueError(f"--controlnet {path}: no such file or folder")
    if args.ip_adapter and not Path(args.ip_adapter).is_file():
        raise ValueError(f"--ip-adapter {args.ip_adapter}: no such file (e.g. sdxl_models/ip-adapter_sdxl.safetensors)")


def _check_pix2pix(args, base, mode):
    """An InstructPix2Pix model edits one -i image (no mask, strength or refiner); --image-cfg is its knob."""
    if base.kind != "instruct_pix2pix":
        raise ValueError(f"--image-cfg applies to InstructPix2Pix models; --model {args.model} is an SDXL {base.kind}")
    if mode != "img2img" or args.strength is not None or args.refiner:
        raise ValueError(
            f"--model {args.model} is an InstructPix2Pix model: it edits the image given with -i IMAGE as the "
            "prompt says (no --mask, --strength or --refiner)"
        )


def _read_images(args, mode):
    """(init image, mask, width, height): the images opened and checked; the size is -W/-H, else the init
    image's rounded down to a multiple of 8 (img2img resizes the image here, inpaint in the API)."""
    if mode == "text2img":
        return None, None, args.width, args.height
    init = _open(args.init_image, "init image")
    mask = _open(args.mask, "mask") if args.mask else None
    if args.outpaint:
        init, mask = outpaint_canvas(init, *args.outpaint, overlap=args.outpaint_overlap)
    if mask is not None and args.mask_blur:
        mask = blur_mask(mask.convert("L"), args.mask_blur)
    if mask is not None and mask.size != init.size:
        raise ValueError(
            f"the mask is {mask.width}x{mask.height} but the init image is {init.width}x{init.height}; "
            "they must be the same size"
        )
    width = args.width or init.width - init.width % 8
    height = args.height or init.height - init.height % 8
    if width < 8 or height < 8:
        raise ValueError(f"the init image {args.init_image} is {init.width}x{init.height}: smaller than 8x8")
    if mode == "img2img" and init.size != (width, height):  # = what the API's to_tensor does (Lanczos)
        init = init.resize((width, height), resample=PIL.Image.LANCZOS)
    return init, mask, width, height


def _image_prompts(args, mode, with_edges=True) -> dict:
    """The base call's other images: the IP-Adapter's image prompt, control images (their edges with --canny,
    unless with_edges=False: opened only, to check them), an --ip-adapter-embeds file's tensors and the T2I-Adapter's
    image, under the API's names."""
    extra = {}
    if args.ip_adapter_image:
        extra["ip_adapter_image"] = _open(args.ip_adapter_image, "IP-Adapter image")
    if args.ip_adapter_embeds:
        extra["ip_adapter_image_embeds"] = _read_embeds(args.ip_adapter_embeds)
    edges = (lambda im: canny(im, *args.canny)) if args.canny and with_edges else (lambda im: im)
    if args.control_image:  # = the ControlNet pipelines' names: text2img's image, the others' control_image
        key = "image" if mode == "text2img" and not args.t2i_adapter else "control_image"
        extra[key] = _one_or_list([edges(_open(path, "control image")) for path in _each(args.control_image)])
    if args.adapter_image:  # = the adapter pipeline's image=
        extra["image"] = edges(_open(args.adapter_image, "adapter image"))
    return extra


def _read_embeds(path) -> list:
    """--ip-adapter-embeds: diffusers' ip_adapter_image_embeds, one tensor per IP-Adapter, from a .safetensors
    file (its tensors in key order) or a .pt / .pth / .bin (a tensor or a list of them; tensors only)."""
    try:
        if Path(path).suffix == ".safetensors":
            found = list(checkpoint.read_safetensors(path).values())
        else:
            found = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, checkpoint.CheckpointError, RuntimeError, ValueError) as e:
        raise ValueError(f"--ip-adapter-embeds {path}: cannot read it ({e})") from None
    found = [found] if isinstance(found, torch.Tensor) else found
    if not isinstance(found, (list, tuple)) or not found or not all(isinstance(t, torch.Tensor) for t in found):
        raise ValueError(f"--ip-adapter-embeds {path}: expected a tensor or a list of tensors (one per IP-Adapter)")
    return [t.float() for t in found]


def _open(path, what):
    try:
        with PIL.Image.open(path) as im:
            im.load()
            return im
    except (OSError, ValueError) as e:  # missing, unreadable, not an image (UnidentifiedImageError)
        raise ValueError(f"cannot read the {what} {path}: {e}") from None


def _output_paths(args, seeds) -> list:
    if args.output:
        pattern = args.output
        if Path(pattern).suffix.lower() != ".png":
            raise ValueError(f"-o/--output {pattern}: minsdxl writes PNG (with its metadata); use a .png name")
        if len(seeds) > 1 and "{" not in pattern:
            p = Path(pattern)
            pattern = str(p.with_name(p.stem + "-{index}" + p.suffix))
        try:
            paths = [Path(pattern.format(seed=s, index=k)) for k, s in enumerate(seeds)]
        except (KeyError, IndexError, ValueError, AttributeError) as e:  # ({seed.x}: an attribute of an int)
            raise ValueError(f"-o/--output {args.output}: only {{seed}} and {{index}} may be used ({e})") from None
        if len(set(paths)) < len(paths):
            raise ValueError(f"-o/--output {args.output} names the same file for several images; add {{index}}")
    else:
        folder = Path(args.outdir)
        start = _next_counter(folder)
        paths = [folder / f"{start + k:05d}-{s}.png" for k, s in enumerate(seeds)]
    return _free(paths, args)


def _free(paths: list, args) -> list:
    """The output paths, each folder writable and no file there already (unless --overwrite)."""
    for p in paths:
        _check_writable(p.parent)
        if p.exists() and not args.overwrite:
            raise ValueError(f"{p} already exists; pass --overwrite to replace it, or choose another name")
    return paths


def _next_counter(folder: Path) -> int:
    """A1111's counter: one more than the largest leading number of a file in the folder."""
    if not folder.is_dir():
        return 0
    return 1 + max((int(m.group(1)) for f in folder.iterdir() if (m := re.match(r"(\d+)-", f.name))), default=-1)


def _check_writable(folder: Path):
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write to {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to {folder}: {existing} is not writable")
    try:  # (os.access says yes to root everywhere, also where a file cannot be made: /proc)
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise ValueError(f"cannot write to {folder}: no file can be made in {existing} ({e.strerror})") from None


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    return name


def _load(args, auto_dtype=False):
    dtype = DTYPES[args.dtype]
    watermark = False if args.no_watermark else None  # None: on when invisible-watermark is installed
    t = time.perf_counter()
    base = minsdxl.load(
        args.model,
        dtype=dtype,
        device=args.device,
        vae=args.vae,
        unet=args.unet,
        config=args.model_config,
        add_watermarker=watermark,
        offload=args.offload,
        compile=args.compile,
        storage_dtype=STORAGE_DTYPES.get(args.storage_dtype),
    )
    _log(args, f"loaded {args.model} (SDXL {base.kind}) in {time.perf_counter() - t:.1f} s")
    _log(args, f"device {args.device}; " + _dtype_note(base, auto_dtype))
    if args.vae_tiling:
        base.vae.enable_tiling()  # the refiner shares this VAE
    if args.freeu:
        base.unet.enable_freeu(*args.freeu)
    specs = _loras(args)
    if specs:
        t = time.perf_counter()
        names = []
        for path, _ in specs:  # named after the file, as A1111's <lora:name:w>
            names.append(minsdxl.load_lora_weights(base, path, adapter_name=_unique(Path(path).stem, names)))
        minsdxl.set_adapters(base, names, [w for _, w in specs])
        _log(args, f"merged {len(names)} LoRA(s) into the base in {time.perf_counter() - t:.1f} s")
    for path, token in _embeddings(args):  # before the refiner: it shares tokenizer_2 and text_encoder_2
        minsdxl.load_textual_inversion(base, path, token)
        _log(args, f"loaded the embedding {path} as {token!r}")
    if args.ip_adapter:
        t = time.perf_counter()
        encoder = str(Path(args.image_encoder).resolve()) if args.image_encoder else "image_encoder"
        encoder = None if args.ip_adapter_embeds else encoder  # embeddings given: no image to encode
        minsdxl.load_ip_adapter(base, args.ip_adapter, image_encoder_folder=encoder)
        if args.ip_adapter_scale is not None:
            minsdxl.set_ip_adapter_scale(base, args.ip_adapter_scale)
        _log(args, f"loaded the IP-Adapter {args.ip_adapter} and its image encoder in {time.perf_counter() - t:.1f} s")
    refiner = None
    if args.refiner:
        t = time.perf_counter()
        refiner = minsdxl.load(
            args.refiner,
            dtype=dtype,
            device=args.device,
            share=base,
            config=args.refiner_config,
            add_watermarker=watermark,
            offload=args.offload,
            compile=args.compile,
            storage_dtype=STORAGE_DTYPES.get(args.storage_dtype),
        )
        if refiner.kind != "refiner":
            raise ValueError(
                f"--refiner {args.refiner} is an SDXL {refiner.kind} checkpoint, not a refiner (it has a CLIP-L "
                "text encoder or a 9-channel UNet); pass the refiner, e.g. stable-diffusion-xl-refiner-1.0"
            )
        _log(args, f"loaded refiner {args.refiner} in {time.perf_counter() - t:.1f} s (text encoder 2 and VAE shared)")
    for model in [m for m in (base, refiner) if m is not None and args.tome]:  # no random cells: replayable
        minsdxl.tome.apply_patch(model, ratio=args.tome, max_downsample=2, use_rand=False)
    for model in [m for m in (base, refiner) if m is not None and args.deepcache]:
        minsdxl.deepcache.enable(model, *args.deepcache)
    for model in [m for m in (base, refiner) if m is not None and args.timestep_spacing]:  # for every call
        config = model.scheduler_config or SDXL_SCHEDULER_CONFIG  # ({}: a single file's, SDXL's)
        model.scheduler_config = {**config, "timestep_spacing": args.timestep_spacing}
    _absolute(args)
    return base, refiner


def _absolute(args):
    """Absolute paths in the metadata, so --from-png works from any folder ("tiny" stays a name); again on a
    prompts-file line's arguments, which may name their own images."""
    if args.embedding:
        args.embedding = [f"{Path(p).resolve()}:{t}" for p, t in map(_embedding_spec, args.embedding)]
    if args.lora:
        args.lora = [f"{Path(p).resolve()}:{w!r}" for p, w in map(_lora_spec, args.lora)]  # exact on replay
    files = (
        "model",
        "vae",
        "unet",
        "refiner",
        "model_config",
        "refiner_config",
        "init_image",
        "mask",
        "lora_dir",
        "embedding_dir",
    )
    extras = ("ip_adapter", "ip_adapter_image", "ip_adapter_embeds", "image_encoder", "controlnet", "control_image")
    extras += ("t2i_adapter",)
    for name in (*files, *extras, "adapter_image"):
        if getattr(args, name) and not (name == "model" and args.model == tiny.NAME):
            resolved = [str(Path(p).resolve()) for p in _each(getattr(args, name))]
            setattr(args, name, _one_or_list(resolved))


def _activate_loras(args, base, specs) -> list:
    """A prompts-file line's LoRAs: each (path, weight) given an adapter of that file (loaded the first time a
    line needs it), these alone active at these weights (set_adapters recomputes W0 + their deltas exactly, so
    the line's image is the one a run of that line alone makes). Returns [(path, weight, adapter name)]."""
    t, loaded = time.perf_counter(), list(base.lora.adapters.values()) if base.lora else []
    free = {}
    for a in loaded:
        free.setdefault(str(Path(a.source).resolve()), []).append(a.name)
    taken, out = {}, []
    for path, w in specs:
        key = str(Path(path).resolve())
        k = taken[key] = taken.get(key, -1) + 1
        names = free.setdefault(key, [])
        if k == len(names):  # (a file named twice in a line: two adapters, as in a run of it alone)
            names.append(
                minsdxl.load_lora_weights(
                    base, path, adapter_name=_unique(Path(path).stem, [*base.lora.adapters] if base.lora else [])
                )
            )
        out.append((path, w, names[k]))
    minsdxl.set_adapters(base, [n for _, _, n in out], [w for _, w, _ in out])
    _log(
        args,
        f"LoRAs for this line: {', '.join(f'{n}:{w}' for _, w, n in out) or 'none'} ({time.perf_counter() - t:.1f} s)",
    )
    return out


def _unique(name: str, taken: list) -> str:
    out, k = name, 1
    while out in taken:
        k += 1
        out = f"{name}_{k}"
    return out


def _dtype_note(base, auto: bool) -> str:
    name = lambda m: str(m.dtype).removeprefix("torch.")  # noqa: E731
    note = f"UNet and text encoders {name(base.unet)}" + (" (--dtype auto: fp16 on CUDA, else fp32)" if auto else "")
    if base.vae.dtype != base.unet.dtype:
        note += f"; VAE {name(base.vae)} (its config says force_upcast: an fp16 SDXL VAE overflows)"
    return note


def _scheduler_name(sched, config) -> str | None:
    """The sampler name that makes `sched` again from the model's scheduler config, or None where no name
    does (e.g. a config's DPM-Solver of solver_order 1): --from-png then takes the model's default."""
    name = getattr(sched, "name", "")
    try:
        return name if minsdxl.make_scheduler(name, config).config == sched.config else None
    except ValueError:
        return None


def _api_kwargs(args, fn, skip=()) -> dict:
    params = inspect.signature(fn).parameters
    kw = {
        kw: getattr(args, dest)
        for dest, kw in API_KWARGS.items()
        if getattr(args, dest) is not None and kw in params and dest not in skip
    }
    for k in ("prompt", "prompt_2"):  # the tags name LoRAs, not words: A1111 takes them out of the text
        if k in kw:
            kw[k] = _LORA_TAG.sub("", kw[k])
    if "guider" in kw:
        kw["guider"] = make_guider(kw["guider"])
    return kw


def _generate_one(args, mode, base, refiner, init, mask, extra, width, height, seed):
    """One image: the base call (+ the refiner call). Returns (PIL image, [(function, kwargs)], steps run)."""
    common = dict(seed=seed, scheduler=args.sampler, progress=not args.quiet)
    if args.variation_seed is not None:  # = A1111: a batch's variation seeds count up with its seeds
        common["variation_seed"] = args.variation_seed + seed - args.seed
    if args.seed_resize_from is not None:  # (height, width)
        common["seed_resize_from_h"], common["seed_resize_from_w"] = args.seed_resize_from
    steps = []  # per call, counted by the step callback (-v only)

    def count(model, i, t, tensors):
        steps[-1] += 1

    hooks = {"callback_on_step_end": count} if args.verbose else {}
    fn = MODES[mode]
    kw = {**_api_kwargs(args, fn), **common}
    if mode != "text2img":
        kw["image"] = init
    if mode in ("inpaint", "instruct_pix2pix") or (mode == "img2img" and "controlnet" in extra):
        kw.update(width=width, height=height)  # inpaint's and the control image's size; pix2pix's default is 1024
    if mode == "inpaint":
        kw["mask_image"] = mask
    kw.update(extra)  # the base's image prompt and ControlNet; the refiner has neither
    switch = refiner is not None and args.refiner_mode == "switch"
    if switch:  # = diffusers' ensemble of expert denoisers: the base stops at the switch, noisy latents out
        kw.update(denoising_end=args.refiner_switch, output_type="latent")
    latent = args.hires_upscaler.startswith("Latent")
    if args.hires_scale is not None:  # the first pass's size written out: A1111's "Size" and the upscale's base
        sample = base.unet.config.sample_size * 8
        kw.update(output_type="latent" if latent else "pil", width=width or sample, height=height or sample)
    calls = [(fn, kw, None)]
    steps.append(0)
    out = fn(base, **kw, **hooks)
    if args.hires_scale is not None:  # = A1111's hires fix: upscale, then img2img at the hires strength
        hkw = {**_api_kwargs(args, minsdxl.img2img, skip=("strength", "width", "height", "steps")), **common}
        n = args.hires_steps or kw.get("num_inference_steps") or _api_default_value("num_inference_steps")
        total = _hires_total(n, args.hires_strength)
        hkw.update(image=_hires_upscale(out if latent else out[0], args, kw, base), strength=args.hires_strength)
        hkw["num_inference_steps"] = total
        if args.prompt_weighting:  # A1111's prompt editing counts the hires pass's steps after the first pass's
            first = kw.get("num_inference_steps") or _api_default_value("num_inference_steps")
            for k in ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2"):
                if isinstance(hkw.get(k), str):
                    hkw[k] = hires_prompt(hkw[k], first, n)
        for k in ("ip_adapter_image", "ip_adapter_image_embeds"):  # the image prompt again
            if k in extra:
                hkw[k] = extra[k]
        if "controlnet" in extra:  # = A1111's ControlNet extension (its default Hr Option "Both"): the hires pass
            # is guided too, the control image resized to the hires size (the ControlNet img2img pipeline's resize)
            hkw.update(controlnet=extra["controlnet"], control_image=extra.get("control_image", extra.get("image")))
            up = hkw["image"]
            width_, height_ = (up.shape[-1] * 8, up.shape[-2] * 8) if latent else up.size
            hkw.update(width=width_, height=height_)
        what = "latents" if latent else "image"
        calls.append((minsdxl.img2img, hkw, f"the base call's {what}, x{args.hires_scale} ({args.hires_upscaler})"))
        steps.append(0)
        out = minsdxl.img2img(base, **hkw, **hooks)
    if refiner is not None:
        rfn = minsdxl.inpaint if switch and mode == "inpaint" else minsdxl.img2img
        rkw = {**_api_kwargs(args, rfn, skip=("strength", "width", "height")), **common}
        if switch:
            rkw.update(image=out, denoising_start=args.refiner_switch)
            if mode == "inpaint":
                rkw.update(mask_image=mask, width=width, height=height)
        else:
            rkw.update(image=out[0], strength=args.refiner_strength)
        calls.append((rfn, rkw, "the previous call's " + ("latents" if switch else "image")))
        steps.append(0)
        out = rfn(refiner, **rkw, **hooks)
    return out[0], calls, [f"{n} {f.__name__}" for n, (f, _, _) in zip(steps, calls)]


def _hires_total(n: int, strength: float) -> int:
    """The schedule length whose strength cut runs n steps: A1111's hires pass runs its steps whatever the
    strength (diffusers' img2img runs int(total * strength) of `total`)."""
    total = int(n / strength)
    while int(total * strength) < n:  # the smallest such schedule
        total += 1
    return total


def _hires_upscale(out, args, kw, base):
    """The first pass at --hires-scale times its size (multiples of 8): latents interpolated, the image resized,
    or the image through an upscaler model (then resized to the multiple of 8, as A1111 does)."""
    w, h = (int(kw[k] * args.hires_scale) // 8 * 8 for k in ("width", "height"))
    how = HIRES_UPSCALERS.get(args.hires_upscaler)
    if isinstance(how, tuple):  # = A1111's latent upscale: F.interpolate to the target's latent size
        return torch.nn.functional.interpolate(out, size=(h // 8, w // 8), mode=how[0], antialias=how[1])
    if how is None:
        out = upscale(_upscaler(args.hires_upscaler, base.unet.dtype, args.device), out, scale=args.hires_scale)
    return out if out.size == (w, h) else out.resize((w, h), resample=how or PIL.Image.LANCZOS)


@functools.cache
def _upscaler(path, dtype, device):  # once per run, not per image
    return load_upscaler(path, dtype=dtype, device=device)


def _find_upscaler(args) -> str | None:
    """--hires-upscaler as it is used: one of HIRES_UPSCALERS, an upscaler file (absolute), or NAME.pth /
    NAME.safetensors in --upscaler-dir (A1111 names its upscalers by file: "4x-UltraSharp"); None: not found."""
    name = args.hires_upscaler
    if name in HIRES_UPSCALERS:
        return name
    folder = Path(args.upscaler_dir) if args.upscaler_dir else None
    for p in [Path(name)] + ([folder / f"{name}{ext}" for ext in (".pth", ".safetensors")] if folder else []):
        if p.is_file():
            return str(p.resolve())
    return None


def _api_default_value(keyword: str):
    return inspect.signature(minsdxl.text2img).parameters[keyword].default


# ------------------------------------------------------------------------------------------------
# Metadata


def _describe_run(args, mode, base, refiner, sched, source, loras=None) -> dict:
    """What every image of this run (or prompts-file line) shares: files and their hashes, dtypes, scheduler;
    loras: a line's [(path, weight, adapter name)] (else the command line's, as _load named them)."""
    t = time.perf_counter()
    model = _file_info(checkpoint.resolve(args.model), base, args.dtype)
    if loras is None:  # the command line's, as _load named them
        loras = [(p, w, n) for (p, w), n in zip(_loras(args), base.lora.adapters if base.lora else ())]
    about = {
        "mode": mode,
        "model": model,
        "vae": _file_info(args.vae, hashed=_vae_file(args.vae, args.dtype)) if args.vae else None,
        "unet": _file_info(args.unet) if args.unet else None,
        "loras": [{**_file_info(path), "name": name, "scale": w} for path, w, name in loras],
        "embeddings": [{**_file_info(path), "token": token} for path, token in _embeddings(args)],
        "refiner": _file_info(args.refiner, refiner, args.dtype) if refiner else None,
        "init_image": _file_info(args.init_image) if args.init_image else None,
        "mask": _file_info(args.mask) if args.mask else None,
        "ip_adapter": _file_info(args.ip_adapter) if args.ip_adapter else None,
        "ip_adapter_image": _file_info(args.ip_adapter_image) if args.ip_adapter_image else None,
        "ip_adapter_embeds": _file_info(args.ip_adapter_embeds) if args.ip_adapter_embeds else None,
        "controlnet": _one_or_list([_file_info(_weights(p, args.dtype)) for p in _each(args.controlnet)]),
        "control_image": _one_or_list([_file_info(p) for p in _each(args.control_image)]),
        "t2i_adapter": _file_info(_weights(args.t2i_adapter, args.dtype)) if args.t2i_adapter else None,
        "adapter_image": _file_info(args.adapter_image) if args.adapter_image else None,
        "upscaler": _file_info(args.hires_upscaler) if Path(args.hires_upscaler).is_file() else None,
        # a scheduler no name makes again is described by its own name (e.g. "dpmpp_1m") and config
        "scheduler": {"name": args.sampler, "a1111": _a1111_name(args.sampler or sched.name), "config": sched.config},
        "dtypes": {
            c: str(getattr(base, c).dtype).removeprefix("torch.")
            for c in ("unet", "vae", "text_encoder", "text_encoder_2")
            if getattr(base, c) is not None
        },
        "watermarker": bool(base.add_watermarker or (base.add_watermarker is None and watermark_available())),
    }
    _log(args, f"hashed the model files in {time.perf_counter() - t:.1f} s (sha256 {model['sha256'][:10]})")
    if source is not None:  # --from-png: say when the result cannot be the same image
        kinds = (
            "model",
            "refiner",
            "vae",
            "unet",
            "init_image",
            "mask",
            "ip_adapter",
            "ip_adapter_image",
            "ip_adapter_embeds",
            "controlnet",
        )
        for what in (*kinds, "control_image", "t2i_adapter", "adapter_image", "upscaler"):
            for was, now in zip(_each(source.get(what)), _each(about[what])):
                old, new = was.get("sha256"), now.get("sha256")
                if old and new and old != new:
                    _warn(
                        f"the {what.replace('_', ' ')} differs from the one that made {args.from_png} "
                        f"(sha256 {new[:10]}, was {old[:10]}): the image will differ",
                    )
        for kind, name in (("loras", "LoRA"), ("embeddings", "embedding")):
            old = {x["path"]: x["sha256"] for x in source.get(kind) or ()}
            for x in about[kind]:
                if x["path"] in old and old[x["path"]] != x["sha256"]:
                    _warn(
                        f"the {name} {x['path']} differs from the one that made {args.from_png}: the image will differ"
                    )
        if "version" in source and source["version"] != minsdxl.__version__:
            _warn(f"{args.from_png} was made by minsdxl {source.get('version')}, this is {minsdxl.__version__}")
    return about


def _file_info(path, model=None, dtype=None, hashed=None) -> dict:
    """Path, SHA-256 and A1111's short hash of a file; for a diffusers folder, of its UNet weights file (or of
    `hashed`, the file in it that counts)."""
    p = Path(path)
    hashed = hashed or (_unet_file(p, dtype) if p.is_dir() else p)
    digest = sha256(hashed)
    info = {"path": str(p), "sha256": digest, "hash": short_hash(digest)}
    if hashed != p:
        info["sha256_of"] = str(hashed.relative_to(p))
    if model is not None:
        info.update(kind=model.kind, layout="diffusers" if p.is_dir() else "single file")
    return info


def _weights(path, dtype) -> Path:
    """The weights file load_controlnet / load_t2i_adapter reads for this dtype."""
    return checkpoint.component_file(path, dtype=DTYPES.get(dtype))[0]


def _vae_file(path, dtype) -> Path:
    """The weights file --vae names: the file, a VAE / TAESD folder's weights, or A1111's VAE-taesd decoder."""
    p = Path(path)
    if not p.is_dir():
        return p
    return checkpoint._taesd_in_folder(p) or _weights(p, dtype)


def _unet_file(folder: Path, dtype) -> Path:
    """The UNet weights file minsdxl.load reads for this dtype (fp16 variant first for fp16)."""
    try:
        return checkpoint.weights_file(folder, "unet", dtype=DTYPES.get(dtype))
    except checkpoint.CheckpointError:
        raise ValueError(f"{folder} has no unet/diffusion_pytorch_model weights to hash") from None


def _a1111_name(name: str) -> str:
    return next((a for a, n in A1111_NAMES.items() if n == name), name)


def _record(fn, kw, images: dict) -> dict:
    """The full keyword set of one API call (its defaults filled in), JSON-ready; `images` names the
    image arguments (a path, or which earlier output they are)."""
    out = {k: p.default for k, p in inspect.signature(fn).parameters.items() if k != "model" and k not in UNRECORDED}
    out.update({k: v for k, v in kw.items() if k not in UNRECORDED})
    for k in minsdxl.sampler.CONTROLNET_DEFAULTS.get(fn.__name__, {}):  # the value the call used
        out[k] = minsdxl.sampler.default(fn.__name__, k, out[k], kw.get("controlnet"))
    out.update({k: v for k, v in images.items() if k in kw})
    return out


def _metadata(args, about, image, calls, seed, index) -> dict:
    """The two PNG text chunks of one image: A1111's `parameters` and the `minsdxl` JSON."""
    stored = {k: v for k, v in vars(args).items() if k not in RUN_ONLY}
    stored["seed"] = seed  # this image's own seed: --from-png makes this one image
    if args.variation_seed is not None:  # and its own variation seed
        stored["variation_seed"] = args.variation_seed + seed - args.seed
    prompts = {"ip_adapter_image": args.ip_adapter_image, "ip_adapter_image_embeds": args.ip_adapter_embeds}
    base_images = {"image": args.init_image, "mask_image": args.mask, **prompts}
    base_images |= {"controlnet": args.controlnet, "control_image": args.control_image, "adapter": args.t2i_adapter}
    if about["mode"] == "text2img" and (args.controlnet or args.t2i_adapter):
        # text2img's image= is the adapter's image, else the control image
        base_images["image"] = args.adapter_image or args.control_image
    records = [
        _record(fn, kw, base_images if image is None else {"image": image, "mask_image": args.mask, **prompts})
        for fn, kw, image in calls
    ]
    refiner_settings = None
    if about["refiner"] is not None:
        refiner_settings = {"mode": args.refiner_mode, "switch": args.refiner_switch, "strength": args.refiner_strength}
    ours = {
        "schema": SCHEMA,
        "version": minsdxl.__version__,
        "torch": torch.__version__,
        "args": stored,
        **about,
        "seed": seed,
        "batch": {"first_seed": args.seed, "index": index, "size": args.batch},
        "rng": "cpu",  # the API's seed= is a CPU torch.Generator: the same noise on every device
        "device": args.device,
        "dtype": args.dtype,
        "size": [image.width, image.height],
        "refiner_settings": refiner_settings,
        "calls": [{"function": fn.__name__, "kwargs": rec} for (fn, _, _), rec in zip(calls, records)],
    }
    refiner = about["refiner"]
    hires = records[1] if args.hires_scale is not None else None
    params = {
        "Steps": records[0]["num_inference_steps"],
        "Sampler": about["scheduler"]["a1111"],
        "CFG scale": records[0]["guidance_scale"],
        "Seed": seed,
        # A1111 writes the first pass's size beside the hires fix's factor
        "Size": f"{image.width}x{image.height}" if hires is None else "{width}x{height}".format(**records[0]),
        "Model hash": about["model"]["hash"],
        "Model": Path(args.model).stem,
        "VAE hash": about["vae"]["hash"] if about["vae"] else None,
        "VAE": Path(args.vae).stem if args.vae else None,
        "Denoising strength": records[0].get("strength") if hires is None else hires["strength"],
        "Hires upscale": args.hires_scale,
        "Hires steps": args.hires_steps,
        "Hires upscaler": Path(args.hires_upscaler).stem if hires is not None else None,  # A1111 names it by file
        "Eta": args.eta or None,  # = A1111: written when not the default
        # = A1111's extra_generation_params["Lora hashes"] (its <lora:name:w> lives in the prompt text)
        "Lora hashes": ", ".join(f"{x['name']}: {x['hash']}" for x in about["loras"]) or None,
        "TI hashes": ", ".join(f"{x['token']}: {x['hash']}" for x in about["embeddings"]) or None,  # = A1111's
        "Inpaint area": "Only masked" if args.mask_padding is not None else None,
        "Masked area padding": args.mask_padding,
        "Mask blur": args.mask_blur,
        "Tiling": True if args.tiling else None,  # = A1111: written when on
        "Variation seed": args.variation_seed + seed - args.seed if args.variation_strength else None,
        "Variation seed strength": args.variation_strength or None,
        "Seed resize from": "x".join(map(str, args.seed_resize_from[::-1])) if args.seed_resize_from else None,
        # A1111's "Clip skip" counts the layer read from the end (1 = last, 2 = penultimate); diffusers'
        # SDXL clip_skip k reads hidden_states[-(k + 2)]
        "Clip skip": args.clip_skip + 2 if args.clip_skip is not None else None,
        "Refiner": f"{Path(args.refiner).stem} [{refiner['hash']}]" if refiner else None,
        "Refiner switch at": args.refiner_switch if refiner and args.refiner_mode == "switch" else None,
        "Refiner strength": args.refiner_strength if refiner and args.refiner_mode == "img2img" else None,
        "RNG": "CPU",
        "Dtype": args.dtype,
        "Version": f"minsdxl {minsdxl.__version__}",
    }
    return {
        "parameters": infotext(args.prompt, args.negative_prompt, params),
        "minsdxl": json.dumps(ours, default=str),
    }


# A1111 infotext entries --from-png takes over as they are: (flag, type)
A1111_PARAMS = {
    "Steps": ("steps", int),
    "CFG scale": ("cfg", float),
    "Seed": ("seed", int),
    "Denoising strength": ("strength", float),
    "Mask blur": ("mask_blur", int),
    "Masked area padding": ("mask_padding", int),
    "Eta": ("eta", float),
    "Refiner switch at": ("refiner_switch", float),
    "Hires upscale": ("hires_scale", float),
    "Hires steps": ("hires_steps", int),
    "Variation seed": ("variation_seed", int),
    "Variation seed strength": ("variation_strength", float),
}
# what A1111 writes that changes the picture and minsdxl does not do
A1111_NOT_DONE = ("ADetailer model", "Face restoration", "Schedule rho")
# A1111's schedule types read as a timestep spacing of SDXL's σ table, and how they differ from it (A1111's
# sd_schedulers.py: k-diffusion interpolates σ between table entries in log σ, diffusers in σ)
A1111_SPACINGS = {
    "SGM Uniform": ("trailing", "linspace(999, 0, n + 1)[:-1] in continuous t: its timesteps rounded"),
    "Uniform": ("linspace", "linspace(999, 0, n): σ interpolated in σ, not log σ"),
    "Normal": ("linspace", "linspace(999, 0, n): σ interpolated in σ, not log σ"),
    "Simple": ("trailing", "every 1000 / n-th table σ from the top: rounded, not truncated"),
    "DDIM": ("leading", "every 1000 // n-th table σ from t = 1: n steps, where A1111 may run one more"),
}


def _from_a1111(path, text: str) -> dict:
    """--from-png for a PNG from AUTOMATIC1111 / Forge (or a site writing its `parameters` text): its settings
    as this CLI's flags, prompt syntax read as A1111 reads it. Not its pixels: A1111 draws its noise otherwise."""
    p = parse_infotext(text)
    args = {"prompt": p["Prompt"], "negative_prompt": p["Negative prompt"]}
    try:
        for key, (flag, kind) in A1111_PARAMS.items():
            if key in p:
                args[flag] = kind(p[key])
        if "Size" in p:
            args["width"], args["height"] = map(int, p["Size"].split("x"))
        if "Seed resize from" in p:  # WxH, as Size; A1111 writes it where both sides are > 0
            args["seed_resize_from"] = tuple(map(int, p["Seed resize from"].split("x")))[::-1]
        if p.get("Tiling") == "True":
            args["tiling"] = True
        if int(p.get("Clip skip", 2)) > 2:  # our writer's convention; A1111's SDXL reads penultimate either way
            args["clip_skip"] = int(p["Clip skip"]) - 2
    except ValueError as e:
        raise ValueError(f"{path}: cannot read its A1111 parameters ({e})") from None
    not_done = [k for k in A1111_NOT_DONE if k in p]
    if "Sampler" in p:  # A1111 >= 1.9 writes the schedule apart: "DPM++ 2M" + "Karras" = "DPM++ 2M Karras"
        schedule = p.get("Schedule type", "Automatic")
        if schedule in A1111_SPACINGS:
            spacing, how = A1111_SPACINGS[schedule]
            args["timestep_spacing"] = spacing
            _warn(f"{path}: A1111's {schedule} schedule is read as --timestep-spacing {spacing} ({how})")
            schedule = "Automatic"
        elif schedule == "Polyexponential" and "Schedule rho" not in p:  # at its default ρ = 1: the exponential one
            schedule = "Exponential"
        elif schedule not in ("Automatic", "Karras", "Exponential", "Beta"):  # KL Optimal, Align Your Steps
            not_done.append(f"Schedule type: {schedule} (the sampler's own schedule used)")
            schedule = "Automatic"
        args["sampler"] = p["Sampler"] + ("" if schedule == "Automatic" else f" {schedule}")
    emphasis = p.get("Emphasis", "Original")  # A1111's default; "No norm": the weights without the rescaling
    if emphasis in ("Original", "No norm"):
        args["prompt_weighting"] = "a1111" if emphasis == "Original" else "a1111_no_norm"
    elif emphasis != "None":  # "None": the text as it is, as here without weighting; "Ignore" is not done
        not_done.append(f"Emphasis: {emphasis}")
    if "Hires upscale" in p:  # the hires fix's: its strength, its upscaler (an upscaler model: Lanczos here)
        args["hires_strength"] = args.pop("strength", 0.7)
        args["hires_upscaler"] = p.get("Hires upscaler", "Latent")  # an upscaler model: found in --upscaler-dir
    args = {k: v for k, v in args.items() if v != ""}
    if not_done:
        _warn(f"{path} asks for what minsdxl does not do, left out: {', '.join(not_done)}")
    model = p.get("Model", "?") + (f" [{p['Model hash']}]" if "Model hash" in p else "")
    return {"args": args, "a1111": model, "a1111_refiner": p.get("Refiner")}


def _read_source(path) -> dict:
    """The minsdxl JSON of a PNG made by this CLI, or the A1111 parameters of one made by AUTOMATIC1111 (or a
    tool writing them), for --from-png."""
    found = read_png_metadata(path)
    meta = found["minsdxl"]
    if meta is None and found["parameters"]:
        return _from_a1111(path, found["parameters"])
    with PIL.Image.open(path) as im:
        grid = getattr(im, "text", {}).get("minsdxl_grid")
    if meta is None and grid:
        cells = [c["image"] for c in json.loads(grid)["cells"]]
        raise ValueError(
            f"{path} is an X/Y/Z grid: --from-png one of its cells' images ({', '.join(cells[:4])}"
            + (", ..." if len(cells) > 4 else "")
            + ")"
        )
    if meta is None:
        raise ValueError(
            f"{path} has no minsdxl metadata and no A1111 parameters (made by another tool, or with "
            "--no-metadata); --from-png needs an image this CLI or AUTOMATIC1111 wrote"
        )
    if meta.get("schema", 0) > SCHEMA:
        raise ValueError(f"{path} has metadata schema {meta['schema']}; this minsdxl reads up to {SCHEMA}: upgrade it")
    if not isinstance(meta.get("args"), dict):
        raise ValueError(f"{path}: its minsdxl metadata has no settings (args); it was not written by this CLI")
    meta["args"] = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["args"].items()}
    return meta


def _check_stored(stored: dict, parser, path) -> None:
    """A PNG's stored settings of the kinds its flags take (a number, a choice, on / off): an edited or foreign
    PNG is named here, not deep inside a run."""
    for action in parser._actions:
        v = stored.get(action.dest)
        if v is None:
            continue
        kind = (
            bool
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            else action.type
            if action.type in (int, float)
            else None
        )
        ok = kind is None or (isinstance(v, kind) if kind is not float else isinstance(v, (int, float)))
        ok = ok and not (kind in (int, float) and isinstance(v, bool))
        if not ok or (action.choices is not None and not isinstance(v, (list, tuple)) and v not in action.choices):
            flag = (action.option_strings or [action.dest])[0]
            raise ValueError(f"{path}: its stored {action.dest} is {v!r}, which {flag} does not take")


def _peak_memory(device: str) -> str:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    text = f"peak memory: {rss:.0f} MiB RSS"
    if device.startswith("cuda"):
        text += f", {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB CUDA"
    return text


# ------------------------------------------------------------------------------------------------
# info


def info(args) -> int:
    """Print what a checkpoint (or a LoRA) is; exit 1 when a component would not load (the LoRA fits no SDXL)."""
    path = checkpoint.resolve(args.path)
    if _is_lora(path):
        report = describe_lora(path)
        print(json.dumps(report, indent=2) if args.json else _format_lora(report))
        return 0 if any(f["fits"] for f in report["models"].values()) else 1
    report = describe_control(path)
    if report is not None:
        print(json.dumps(report, indent=2) if args.json else _format_control(report))
        return 1 if "problem" in report else 0
    report = describe_taesd(path)
    if report is not None:
        print(json.dumps(report, indent=2) if args.json else _format_control(report))
        return 1 if "problem" in report else 0
    report = describe_upscaler(path)
    if report is not None:
        print(json.dumps(report, indent=2) if args.json else _format_upscaler(report))
        return 1 if "problem" in report else 0
    report = describe_checkpoint(path, args.config)
    print(json.dumps(report, indent=2) if args.json else _format_info(report))
    return 1 if any(c.get("problem") for c in report["components"].values()) else 0


# a ControlNet / T2I-Adapter's keys in the layouts load_controlnet and load_t2i_adapter read
_CONTROL_KEYS = {
    "controlnet_cond_embedding.": "ControlNet",
    "control_model.input_hint_block.": "ControlNet",
    "input_hint_block.": "ControlNet",
    "adapter.body.": "T2I-Adapter",
}


def describe_control(path) -> dict | None:
    """A ControlNet (Union, Control-LoRA) or T2I-Adapter file or folder: what it is, its parameters and stored
    dtypes, and whether it loads for the SDXL base (built on the meta device as load_controlnet /
    load_t2i_adapter would); None for anything else."""
    try:
        file, _ = checkpoint.component_file(path)
        keys = checkpoint.read_safetensors(file) if file.suffix == ".safetensors" else {}
    except checkpoint.CheckpointError:
        return None
    what = next((w for k in keys for prefix, w in _CONTROL_KEYS.items() if k.startswith(prefix)), None)
    if what is None:
        return None
    from minsdxl.controlnet import CONTROL_LORA_MARK

    control_lora = CONTROL_LORA_MARK in keys
    report = {"path": str(path), "kind": "Control-LoRA" if control_lora else what, "tensors": len(keys)}
    try:
        if what == "T2I-Adapter":
            module = minsdxl.load_t2i_adapter(path, dtype=None, device="meta")
        else:  # a Control-LoRA is made against the SDXL base UNet
            unet = meta_sdxl("base").unet if control_lora else None
            module = minsdxl.load_controlnet(path, dtype=None, device="meta", unet=unet)
            report["kind"] = report["kind"] if control_lora else module.kind
        report |= _module_info(module)
    except checkpoint.CheckpointError as e:
        report["problem"] = str(e)
    return report


def describe_taesd(path) -> dict | None:
    """A TAESD (a diffusers AutoencoderTiny folder or file, madebyollin's taesdxl_encoder / _decoder files, A1111's
    VAE-taesd folder): which halves it has and its sizes, or why it does not load; None for anything else."""
    p = Path(path)
    try:
        if p.is_dir():
            config = p / "config.json"
            kind = checkpoint._json(config).get("_class_name") if config.is_file() else None
            if kind != "AutoencoderTiny" and not checkpoint._taesd_in_folder(p):
                return None
        elif p.suffix not in (".safetensors", ".pth", ".pt"):
            return None
        else:
            keys = checkpoint.read_state_dict(p)
            if not checkpoint._taesd_half(keys) and "decoder.layers.0.weight" not in keys:
                return None
    except (checkpoint.CheckpointError, OSError):
        return None
    report = {"path": str(path), "kind": "TAESD"}
    try:
        module = checkpoint.load_component(p, dtype=None, device="meta")
        report["tensors"] = len(module.state_dict())
        halves = [h for h in ("encoder", "decoder") if getattr(module, h) is not None]
        report |= {"kind": f"TAESD ({' and '.join(halves)})"} | _module_info(module)
    except (checkpoint.CheckpointError, ValueError) as e:
        report["problem"] = str(e)
    return report


# the first key of an ESRGAN-family upscaler in each layout minsdxl.upscaler reads (a .safetensors is told by them)
_UPSCALER_KEYS = ("model.0.weight", "conv_first.weight", "params_ema.conv_first.weight", "params.conv_first.weight")


def describe_upscaler(path) -> dict | None:
    """An upscaler file (a .pth / .pt, or a .safetensors with an ESRGAN key): its architecture, scale and sizes,
    or the reason it does not load; None for anything else."""
    from minsdxl.upscaler import load_upscaler

    if not path.is_file() or path.suffix not in (".pth", ".pt", ".safetensors"):
        return None
    if path.suffix == ".safetensors" and not any(k in checkpoint.read_safetensors(path) for k in _UPSCALER_KEYS):
        return None
    report = {"path": str(path), "kind": "upscaler"}
    try:
        model = load_upscaler(path, dtype=None, device="meta")
    except checkpoint.CheckpointError as e:
        return report | {"problem": str(e)}
    c = model.config
    return report | {"architecture": "ESRGAN (RRDBNet)", "scale": c.scale, "nf": c.nf, "nb": c.nb, "gc": c.gc,
                     **_module_info(model)}  # fmt: skip


def _format_upscaler(r: dict) -> str:
    if "problem" in r:
        return f"{r['path']}: does not load as an upscaler: {r['problem']}"
    return (
        f"{r['path']}: {r['architecture']} upscaler, x{r['scale']}, {r['nb']} blocks of {r['nf']} channels (growth "
        f"{r['gc']}), {r['parameters'] / 1e6:.1f} M parameters ({', '.join(r['dtypes'])})"
    )


def _format_control(r: dict) -> str:
    if "problem" in r:
        return f"{r['path']}: {r['kind']}, {r['tensors']} tensors; does not load: {r['problem']}"
    return f"{r['path']}: {r['kind']} for SDXL, {r['parameters'] / 1e6:.1f} M parameters ({', '.join(r['dtypes'])})"


def convert(args) -> int:
    """Folder -> single file or single file -> folder (either to either), weights as stored unless --dtype."""
    dest = Path(args.dest)
    if dest.exists():
        raise ValueError(f"{dest} exists; convert writes a new file or folder (remove it first)")
    if not dest.parent.is_dir():
        raise ValueError(f"{dest}: its folder {dest.parent} does not exist (create it first)")
    t = time.perf_counter()
    storage = STORAGE_DTYPES.get(args.storage_dtype)
    dtype = DTYPES[args.dtype] if args.dtype else torch.float16 if storage else None
    # memory-mapped as stored; float8 storage is rounded as load(storage_dtype=) rounds it, through `dtype`
    model = minsdxl.load(
        checkpoint.resolve(args.source), dtype=dtype if storage else None, config=args.config, storage_dtype=storage
    )
    if dest.suffix == ".safetensors":
        checkpoint.save_single_file(model, dest, dtype)
    else:
        checkpoint.save(model, dest, dtype)  # plain file names: diffusers reads them without variant="fp16"
    print(f"wrote the SDXL {model.kind} {dest} in {time.perf_counter() - t:.1f} s")
    return 0


def _is_lora(path: Path) -> bool:
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    keys = checkpoint.read_safetensors(path)
    return bool(keys) and all(re.search(r"(lora|\.alpha$|dora_scale|hada_|lokr_)", k) for k in keys)


def meta_sdxl(kind: str):
    """The real SDXL base or refiner (UNet, text encoders; no VAE) built on the meta device: every name and
    shape, no weights."""
    from minsdxl.config import TEXT_PRESETS, UNET_PRESETS
    from minsdxl.text_encoder import CLIPTextModel, CLIPTextModelWithProjection
    from minsdxl.unet import UNet2DConditionModel

    with torch.device("meta"):
        return checkpoint.SDXL(
            unet=UNet2DConditionModel(UNET_PRESETS[kind]),
            text_encoder=CLIPTextModel(TEXT_PRESETS["clip_l"]) if kind == "base" else None,
            text_encoder_2=CLIPTextModelWithProjection(TEXT_PRESETS["bigg"]),
            kind=kind,
        )


def describe_lora(path) -> dict:
    """A LoRA file: key format, layers and ranks per component, alphas, and whether it fits an SDXL base and
    an SDXL refiner (checked as load_lora_weights would, against models built on the meta device)."""
    import warnings

    from minsdxl import lora

    keys = list(checkpoint.read_safetensors(path))
    kohya = [k for k in keys if k.startswith(("lora_unet_", "lora_te"))]
    sgm = any(re.match(r"lora_unet_(input|middle|output)_block", k) for k in kohya)
    layout = "kohya (sgm UNet names)" if sgm else "kohya (diffusers UNet names)" if kohya else "diffusers"
    report = {"path": str(path), "layout": layout, "tensors": len(keys), "metadata": bool(lora._metadata(path))}
    report["models"] = {}
    for kind in ("base", "refiner"):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pairs = lora.read_lora(meta_sdxl(kind), path)
        except checkpoint.CheckpointError as e:
            report["models"][kind] = {"fits": False, "problem": str(e).removeprefix(f"{path}: ")}
            continue
        layers = {}
        for (comp, _), pair in pairs.items():
            c = layers.setdefault(comp, {"layers": 0, "kinds": set(), "ranks": set(), "alphas": set()})
            c["layers"] += 1
            c["kinds"].add(pair.what)
            if pair.rank is not None:  # LoKr with whole factors and LyCORIS full diffs have none (scale 1)
                c["ranks"].add(pair.rank)
                c["alphas"].add(pair.alpha)
        report["models"][kind] = {
            "fits": True,
            "components": {
                c: {k: sorted(v) if isinstance(v, set) else v for k, v in d.items()} for c, d in layers.items()
            },
            "notes": [str(w.message).removeprefix(f"{path} ") for w in caught],
        }
    return report


def _format_lora(r: dict) -> str:
    lines = [
        f"{r['path']}: LoRA, {r['layout']} keys, {r['tensors']} tensors"
        + (", with diffusers metadata" if r["metadata"] else "")
    ]
    for kind, m in r["models"].items():
        if not m["fits"]:
            lines.append(f"  SDXL {kind}: does not fit: {m['problem']}")
            continue
        lines.append(f"  SDXL {kind}: fits")
        for comp, c in m["components"].items():
            ranks = ", ".join(map(str, c["ranks"])) or "-"
            alphas = ", ".join(f"{a:g}" for a in c["alphas"]) or "-"
            kinds = "" if c["kinds"] == ["LoRA"] else f" ({', '.join(c['kinds'])})"
            lines.append(f"    {comp:<16}{c['layers']:>5} layers, rank {ranks}, alpha {alphas}{kinds}")
        lines += [f"    note: {n}" for n in m["notes"]]
    return "\n".join(lines)


def _meta_builders():
    # build on the meta device: checks every name and shape, reads no weights
    return {
        "unet": lambda sd, cfg: checkpoint.build_unet(sd, None, "meta", cfg),
        "vae": lambda sd, cfg: checkpoint.build_vae(sd, None, "meta", cfg),
        "text_encoder": lambda sd, cfg: checkpoint.build_text_encoder(sd, False, None, "meta", cfg),
        "text_encoder_2": lambda sd, cfg: checkpoint.build_text_encoder(sd, True, None, "meta", cfg),
    }


def describe_checkpoint(path, config=None) -> dict:
    """Layout, kind, and per component: parameters, stored dtypes, tensors, and what does not fit SDXL."""
    path = Path(path)
    try:
        comps, configs = checkpoint.read_checkpoint(path, config)
    except checkpoint.CheckpointError as whole:
        try:  # a standalone VAE / UNet / text encoder
            module = minsdxl.load_component(path, dtype=None, device="meta", config=config)
        except (checkpoint.CheckpointError, OSError):
            raise whole from None
        return {
            "path": str(path),
            "layout": "component " + ("folder" if path.is_dir() else "file"),
            "kind": type(module).__name__,
            "components": {"component": _module_info(module)},
        }
    report = {
        "path": str(path),
        "layout": "diffusers folder" if path.is_dir() else "single file (sgm keys)",
        "kind": None,
        "components": {},
        "scheduler": _scheduler_info(configs.get("scheduler", {})),
    }
    for name, build in _meta_builders().items():
        if name not in comps:
            if name != "text_encoder":  # refiners have no CLIP-L
                report["components"][name] = {"problem": f"no {name} in the checkpoint"}
            continue
        entry = {}
        try:
            sd = checkpoint.read_component(comps[name])  # a folder's file is read here
            entry["tensors"] = len(sd)
            entry.update(_module_info(build(sd, configs.get(name))))
        except (checkpoint.CheckpointError, OSError) as e:
            entry["problem"] = str(e)
        if path.is_dir():
            entry["files"] = sorted(f.name for f in (path / name).iterdir() if f.suffix in (".safetensors", ".bin"))
        report["components"][name] = entry
    unet = report["components"].get("unet", {})
    if "in_channels" in unet:
        kind = "refiner" if "text_encoder" not in comps else "base"
        report["kind"] = checkpoint._KINDS.get(unet["in_channels"], kind)
    if not path.is_dir():  # keys the loader ignores (EMA copies, training state); read_checkpoint's markers count
        keys = checkpoint.read_state_dict(path)
        read = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.")
        report["ignored_keys"] = sorted(k for k in keys if not k.startswith(read) and k not in _MARKERS)
    return report


_MARKERS = ("edm_mean", "edm_std", "v_pred", "ztsnr")  # Playground's statistics, A1111's v-prediction marks


def _scheduler_info(cfg: dict) -> str:
    """The scheduler class a checkpoint's config names, and what else it says about sampling."""
    name = cfg.get("_class_name", "EulerDiscreteScheduler (SDXL's default)")
    notes = [cfg["prediction_type"]] if cfg.get("prediction_type", "epsilon") != "epsilon" else []
    notes += ["zero terminal SNR"] * bool(cfg.get("rescale_betas_zero_snr"))
    return name + (f" ({', '.join(notes)})" if notes else "")


def _module_info(module) -> dict:
    """Built on meta with dtype=None, the parameters keep the dtypes stored in the file."""
    params = list(module.parameters())
    out = {"parameters": sum(p.numel() for p in params)}
    out["dtypes"] = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    if hasattr(module, "config") and hasattr(module.config, "in_channels"):
        out["in_channels"] = module.config.in_channels
    if hasattr(module, "up_blocks"):  # a UNet: distilled ones (SSD-1B, Vega, ...) differ here
        out["topology"] = unet_topology(module.config)
    return out


def unet_topology(cfg) -> str:
    """A UNet's levels: widths, resnets, and the transformer blocks of encoder | middle | decoder (a level's
    depths per resnet where they differ)."""
    levels = range(len(cfg.block_out_channels))
    depth = lambda d: str(d[0]) if len(set(d)) == 1 else ",".join(map(str, d))  # noqa: E731
    mid = cfg.mid_transformer_layers
    mid = "none" if mid is None else "one resnet" if mid == 0 else str(mid)
    return (
        f"widths {'/'.join(map(str, cfg.block_out_channels))}, resnets per level {cfg.layers_per_block}; transformer "
        f"blocks: encoder {' | '.join(depth(cfg.down_depths(i)) for i in levels)}, middle {mid}, decoder "
        f"{' | '.join(depth(cfg.up_depths(i)) for i in levels)}"
    )


def _format_info(r: dict) -> str:
    kind = f"SDXL {r['kind']}" if r.get("kind") in checkpoint._PIPELINES else r.get("kind")
    lines = [f"{r['path']}: {r['layout']}" + (f", {kind}" if kind else "")]
    lines.append(f"  {'component':<16}{'parameters':>15}  {'tensors':>7}  dtype")
    total = 0
    for name, c in r["components"].items():
        total += c.get("parameters", 0)
        n = f"{c['parameters']:,}" if "parameters" in c else "-"
        lines.append(f"  {name:<16}{n:>15}  {c.get('tensors', '-'):>7}  {', '.join(c.get('dtypes', []))}")
    lines.append(f"  {'total':<16}{total:>15,}")
    if r.get("scheduler"):
        lines.append(f"  scheduler: {r['scheduler']}")
    for name, c in r["components"].items():
        if c.get("topology"):
            lines.append(f"  {name}: {c['topology']}")
    for name, c in r["components"].items():
        if c.get("files"):
            lines.append(f"  {name} files: {', '.join(c['files'])}")
    problems = [f"  {name}: {c['problem']}" for name, c in r["components"].items() if c.get("problem")]
    lines += problems or ["  keys: every component matches the SDXL layout its shapes describe"]
    if r.get("ignored_keys"):
        k = r["ignored_keys"]
        lines.append(f"  {len(k)} keys outside the model, ignored: {', '.join(k[:5])}" + (" ..." if len(k) > 5 else ""))
    return "\n".join(lines)
