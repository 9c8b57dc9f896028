"""text2img, img2img and inpaint: diffusers' three SDXL pipelines as plain functions over one loop.

Keyword names, defaults and numerics are those of StableDiffusionXLPipeline,
StableDiffusionXLImg2ImgPipeline and StableDiffusionXLInpaintPipeline.__call__, so one kwargs dict
drives both and the same generator gives the same image. The three differ only in how the
timesteps are cut, how the first latents are made, and what the loop adds per step; that is data
(`_Run`) handed to one loop (`_denoise`).
"""

import functools
import math
import numbers
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace

import PIL.Image
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import guidance, ip_adapter, lora
from .checkpoint import require_model
from .controlnet import ControlNetModel, ControlNetUnionModel
from .guidance import rescale_noise_cfg
from .image import (
    apply_watermark,
    mask_crop_region,
    paste_inpainted,
    postprocess,
    resize_like_latents,
    to_tensor,
    watermark_available,
)
from .prompt import encode_prompt
from .prompt import schedules as prompt_schedules
from .rng import randn, slerp
from .schedulers import DDIM, DPMSolverSDE, Scheduler, make_scheduler
from .t2i_adapter import T2IAdapter
from .unet import Perturbation, guidance_scale_embedding

_OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# what a step callback may read and replace (the loop's state; "mask", "masked_image_latents": 9-channel inpaint)
_CALLBACK_INPUTS = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids", "mask", "masked_image_latents")
# diffusers' ControlNet pipelines default these otherwise than the plain ones: (without, with a ControlNet)
CONTROLNET_DEFAULTS = {"img2img": {"strength": (0.3, 0.8)}, "inpaint": {"guidance_scale": (7.5, 5.0)}}


def default(function: str, key: str, value, controlnet):
    """`value`, or when None the diffusers default of `key` in `function` with or without a ControlNet."""
    pair = CONTROLNET_DEFAULTS.get(function, {}).get(key)
    return value if value is not None or pair is None else pair[controlnet is not None]


@dataclass
class _Control:
    """One ControlNet of a call: its control images, ready (on the device, batched, CFG-doubled unless in
    guess mode), and per image its scale and the fraction of the steps it acts in [start, end]. A
    ControlNet-Union also has its images' kinds (`modes`, and one-hot `kinds` per row) and whether it is
    one of several (`from_multi`: diffusers' MultiControlNetUnionModel, one image each)."""

    net: ControlNetModel
    images: list
    scales: list
    starts: list
    ends: list
    modes: list | None = None
    kinds: torch.Tensor | None = None
    from_multi: bool = False


@dataclass
class _Run:
    """Everything the loop needs, made before it starts."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    scheduler: Scheduler
    prompt_embeds: torch.Tensor  # CFG order [negative, positive]
    text_embeds: torch.Tensor
    time_ids: torch.Tensor
    guidance_scale: float
    guidance_rescale: float
    generator: object
    mask: torch.Tensor | None = None  # 9-channel UNet extra input (CFG-doubled)
    masked_image_latents: torch.Tensor | None = None
    blend: tuple | None = None  # 4-channel inpaint: (image_latents, noise, mask)
    eta: float = 0.0  # for a scheduler whose step takes it (TCD)
    image_embeds: list | None = None  # IP-Adapter image prompt, one tensor per adapter (CFG-doubled)
    image_masks: list | None = None  # their regions (cross_attention_kwargs["ip_adapter_masks"])
    controls: list | None = None  # ControlNets (_Control), their outputs summed into the UNet
    guess_mode: bool = False
    control_steps: int = 0  # the schedule length the guidance windows are fractions of
    adapter_features: list | None = None  # T2I-Adapters' summed, scaled feature maps (CFG-doubled)
    adapter_steps: int = 0  # the first steps that add them (adapter_conditioning_factor)
    pag_scale: float = 0.0  # Perturbed-Attention Guidance: the batch gains a chunk with identity self-attention
    pag_adaptive_scale: float = 0.0
    # the positive rows again, perturbed (PAG, a layer-perturbing guider), and the layers' perturbations
    extra_chunk: bool = False
    perturbations: list | None = None  # [(layer, minsdxl.unet.Perturbation)], set on the layers for the call
    # InstructPix2Pix: the image's latents beside the noisy ones ([none, image, image] with CFG) and its guidance
    image_latents: torch.Tensor | None = None
    image_guidance_scale: float | None = None
    # a guidance-distilled UNet's guidance_scale_embedding [B, time_cond_proj_dim] (it is given the scale, no CFG)
    guidance_embedding: torch.Tensor | None = None
    guider: guidance.ClassifierFreeGuidance | None = None  # guider=: another rule than CFG (minsdxl.guidance)
    # A1111's prompt editing: [(last step, prompt_embeds, add_text_embeds)] (CFG-stacked), from step 0 on
    prompt_schedule: list | None = None

    @property
    def cfg(self) -> bool:
        # = the pipelines' do_classifier_free_guidance: not for a guidance-distilled UNet (time_cond_proj_dim);
        # pix2pix's: also image_guidance_scale >= 1
        if self.guidance_embedding is not None:
            return False
        if self.guider is not None:
            return self.guider.active
        return self.guidance_scale > 1.0 and (self.image_guidance_scale is None or self.image_guidance_scale >= 1.0)

    @property
    def copies(self) -> int:
        """How many times the latents are in the UNet's batch: [negative,] positive[, perturbed]; pix2pix
        with CFG: [no prompt and no image, image only, prompt and image]."""
        return 1 + self.cfg * (1 + (self.image_guidance_scale is not None)) + self.extra_chunk


def _control_residuals(run: _Run, i, x_in, t, state, cache: dict) -> dict:
    """= the ControlNet pipelines' per-step block: each ControlNet inside its guidance window, its
    outputs summed (= MultiControlNetModel), in guess mode (with CFG) on the positive half only and
    zero for the negative half. A ControlNet whose scale is 0 at this step is not run: its residuals
    would be exact zeros (diffusers runs it and adds them)."""
    embeds, text, ids = state["prompt_embeds"], state["add_text_embeds"], state["add_time_ids"]
    half = run.guess_mode and run.cfg
    if half:  # x_in's halves are the same latents, scaled elementwise: = scale_model_input(latents)
        x_in, embeds, text, ids = x_in.chunk(2)[1], embeds.chunk(2)[1], text.chunk(2)[1], ids.chunk(2)[1]
    n, down, mid = run.control_steps, None, None
    for j, c in enumerate(run.controls):
        keeps = [1.0 - float(i / n < s or (i + 1) / n > e) for s, e in zip(c.starts, c.ends)]  # = controlnet_keep
        scales = [s * k for s, k in zip(c.scales, keeps)]
        # one scale on the outputs (a ControlNet, a Union with one image or of several): 0 gives exact zeros
        if scales[0] == 0 and (c.modes is None or c.from_multi or len(c.modes) == 1):
            continue
        src = state["prompt_embeds"]  # the prompt's k, v projected once per call (again if a callback changed it)
        if j not in cache or cache[j][0] is not src or cache[j][1] != src._version:
            cache[j] = (src, src._version, c.net.project_context(embeds))
        # scales as CPU scalar tensors: a compiled ControlNet would recompile for every new float (dynamo
        # specialises on Python floats); kernels read a CPU scalar in fp32 as they read a float, so eager
        # results are bit-equal to passing the float
        scales = [torch.tensor(s, dtype=torch.float32) for s in scales]
        args = (x_in, t, cache[j][2])
        if c.modes is None:
            d, m = c.net(*args, c.images[0], text, ids, conditioning_scale=scales[0], guess_mode=run.guess_mode)
        else:
            d, m = c.net(*args, c.images, text, ids, c.kinds, c.modes, scales, run.guess_mode, c.from_multi)
        down = d if down is None else [a + b for a, b in zip(down, d)]
        mid = m if mid is None else mid + m
    if down is None:
        return {}
    if half:
        down, mid = [torch.cat([torch.zeros_like(d), d]) for d in down], torch.cat([torch.zeros_like(mid), mid])
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


class _Pipeline:
    """The `pipeline` argument of a step callback: the model's attributes, and what diffusers' pipelines offer
    their callbacks: num_timesteps, guidance_scale and do_classifier_free_guidance, `_guidance_scale` to set
    (from the next step on; at <= 1 guidance ends and the batch keeps its positive rows only: diffusers'
    SDXLCFGCutoffCallback), `_interrupt = True` (the remaining steps are skipped, the latents so far are the
    result: diffusers' interrupt), set_ip_adapter_scale (diffusers' IPAdapterScaleCutoffCallback)."""

    def __init__(self, model, run: "_Run"):
        vars(self).update(_model=model, _run=run, _interrupt=False, _reproject=False)

    def __getattr__(self, name):  # what the view does not have is the model's
        if name == "_model":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self._model, name)

    def __setattr__(self, name, value):
        if name == "_guidance_scale":
            self._run.guidance_scale = float(value)
            if self._run.guider is not None:  # the guider's own rule says whether it still guides
                self._run.guider = replace(self._run.guider, guidance_scale=float(value))
        elif name in ("_interrupt", "_reproject"):
            vars(self)[name] = value
        else:
            setattr(self._model, name, value)

    _guidance_scale = guidance_scale = property(lambda self: self._run.guidance_scale)
    guidance_rescale = property(lambda self: self._run.guidance_rescale)
    do_classifier_free_guidance = property(lambda self: self._run.cfg)
    num_timesteps = property(lambda self: len(self._run.timesteps))
    interrupt = property(lambda self: self._interrupt)
    scheduler = property(lambda self: self._run.scheduler)

    def set_ip_adapter_scale(self, scale):
        ip_adapter.set_ip_adapter_scale(self._model, scale)
        self._reproject = True  # the projected image k, v carry the scale


def _drop_rows(run: _Run, state: dict, before: int, b: int, last: bool = False):
    """A callback ended guidance (its `_guidance_scale` <= 1), or (last) no later step uses the extra
    chunk: every batched input keeps run.copies chunks of b rows, the last ones (the negative ones lead) or
    the first, unless the callback already cut it (diffusers' cutoff callbacks cut the prompt's three; the
    rest diffusers leaves, and fails on)."""
    after = run.copies
    rows = slice(0, after * b) if last else slice((before - after) * b, None)

    def cut(name, t):
        if not isinstance(t, torch.Tensor) or t.shape[0] == after * b:
            return t
        if t.shape[0] != before * b:
            raise ValueError(
                f"after a step callback ended guidance, {name} has {t.shape[0]} rows; {after * b} (without the "
                f"negative ones) or {before * b} (all, cut here) fit this batch of {b}"
            )
        return t[rows]

    state.update({k: cut(k, v) for k, v in state.items()})
    if run.prompt_schedule:
        run.prompt_schedule = [
            (e, cut("prompt_embeds", p), cut("add_text_embeds", q)) for e, p, q in run.prompt_schedule
        ]
    run.image_embeds = run.image_embeds and [cut("an IP-Adapter's image_embeds", t) for t in run.image_embeds]
    run.adapter_features = run.adapter_features and [cut("a T2I-Adapter's features", t) for t in run.adapter_features]
    run.image_latents = cut("the InstructPix2Pix image latents", run.image_latents)
    for c in run.controls or ():
        c.images = [cut("a control image", t) for t in c.images]
        c.kinds = cut("a ControlNet-Union's kinds", c.kinds)
    for m, p in run.perturbations or ():  # the rows perturbed are still their chunk, of fewer, if kept
        p.chunks = after
        if (p.chunk == -1) == last:  # the extra chunk (last) or the negative rows (AutoGuidance's) are gone
            m.perturb = None


def _denoise(model, run: _Run, callback=None, callback_inputs=("latents",), progress=True) -> torch.Tensor:
    """The one denoising loop: CFG batch [negative, positive], scale, (+ ControlNets), (+ mask inputs),
    UNet, guidance, scheduler step (+ 4-channel inpaint blend), callback."""
    x, s = run.latents, run.scheduler
    state = {
        "prompt_embeds": run.prompt_embeds,
        "add_text_embeds": run.text_embeds,
        "add_time_ids": run.time_ids,
        "mask": run.mask,
        "masked_image_latents": run.masked_image_latents,
    }
    n = len(run.timesteps)
    t_unet = run.timesteps.to(x.device)  # once, not a host-to-device copy per step
    projected = None  # (embeds, their version, project_context(embeds)): the prompt's (and image's) k, v
    control_cache = {}
    guider_state = {}  # a guider's memory for this call (APG's momentum)
    view = _Pipeline(model, run)
    edit = None  # the prompt schedule's entry in use
    for i, t in enumerate(tqdm(run.timesteps, disable=not progress, desc="denoising", leave=False)):
        if view.interrupt:  # = diffusers: `continue` through the remaining steps
            continue
        if run.prompt_schedule and edit is not (now := next(e for e in run.prompt_schedule if i <= e[0])):
            edit = now  # = A1111's reconstruct_cond_batch: the first entry whose last step is >= i
            state["prompt_embeds"], state["add_text_embeds"] = now[1], now[2]
        if getattr(model, "cuda_graphs", False):  # last step's UNet output buffers may be reused now
            torch.compiler.cudagraph_mark_step_begin()
        x_in = s.scale_model_input(torch.cat([x] * run.copies) if run.copies > 1 else x, t)
        residuals = _control_residuals(run, i, x_in, t_unet[i], state, control_cache) if run.controls else {}
        if run.adapter_features is not None and i < run.adapter_steps:
            residuals["down_intrablock_additional_residuals"] = run.adapter_features
        if state["mask"] is not None:
            x_in = torch.cat([x_in, state["mask"], state["masked_image_latents"]], dim=1)
        elif run.image_latents is not None:
            x_in = torch.cat([x_in, run.image_latents], dim=1)
        embeds = state["prompt_embeds"]  # projected again only when a callback replaced or modified them
        if projected is None or projected[0] is not embeds or projected[1] != embeds._version:
            context = model.unet.project_context(embeds, run.image_embeds, run.image_masks)
            projected = (embeds, embeds._version, context)
        if run.guidance_embedding is not None:
            residuals["timestep_cond"] = run.guidance_embedding.repeat(run.copies, 1)
        if model.unet.deepcache is not None:  # a full UNet this step, or its cached deep features
            model.unet.deepcache.start(i)
        if run.perturbations and run.guider is not None:  # a guider perturbs only the steps it uses
            on = i in run.guider.perturbed_steps(n)
            for _, p in run.perturbations:
                p.on = on
        eps = model.unet(x_in, t_unet[i], projected[2], state["add_text_embeds"], state["add_time_ids"], **residuals)
        if getattr(model, "cuda_graphs", False) and model.unet.deepcache is not None:
            model.unet.deepcache.keep()  # a CUDA graph's output buffer is overwritten by its next replay
        if run.pag_scale:  # = PAGMixin._apply_perturbed_attention_guidance, its scale in torch as there
            *uncond, text, perturbed = eps.chunk(run.copies)
            pag = run.pag_scale - run.pag_adaptive_scale * (1000 - t)
            pag = 0 if pag < 0 else pag
            if run.cfg:
                eps = uncond[0] + run.guidance_scale * (text - uncond[0]) + pag * (text - perturbed)
            else:
                eps = text + pag * (text - perturbed)
        elif run.cfg and run.image_guidance_scale is not None:  # = the InstructPix2Pix pipeline's guidance
            uncond, image, text = eps.chunk(3)
            eps = uncond + run.guidance_scale * (text - image) + run.image_guidance_scale * (image - uncond)
        elif run.guider is not None and run.copies > 1:  # = the Modular pipelines' guider(guider_state)
            chunks = eps.chunk(run.copies)
            uncond, text = (chunks[0], chunks[1]) if run.cfg else (None, chunks[0])
            eps = run.guider(text, uncond, i, n, guider_state, chunks[-1] if run.extra_chunk else None)
        elif run.cfg:
            uncond, text = eps.chunk(2)
            eps = uncond + run.guidance_scale * (text - uncond)
        if run.cfg and run.guidance_rescale > 0.0 and run.guider is None:
            eps = rescale_noise_cfg(eps, text, run.guidance_rescale)
        x = s.step(eps, t, x, generator=run.generator, **({"eta": run.eta} if s.takes_eta else {}))
        if run.blend is not None:  # = inpaint __call__: keep the unmasked part on the image's noisy path
            image_latents, noise, mask = run.blend
            known = s.add_noise(image_latents, noise, run.timesteps[i + 1]) if i < n - 1 else image_latents
            x = (1 - mask) * known + mask * x
        if callback is not None:
            copies = run.copies
            out = callback(view, i, t, {k: (x if k == "latents" else state[k]) for k in callback_inputs})
            if out is not None and not isinstance(out, dict):
                raise TypeError(
                    f"callback_on_step_end returned {type(out).__name__}; it returns a dict of the tensors it "
                    "changes, e.g. {'latents': latents} (or {} / None)"
                )
            out = dict(out or {})
            new = out.pop("latents", x)
            if not (isinstance(new, torch.Tensor) and new.shape == x.shape):
                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise ValueError(f"callback_on_step_end returned latents of {got}; they must keep {tuple(x.shape)}")
            x = new
            state.update({k: v for k, v in out.items() if k in state})
            if run.copies > copies:
                raise ValueError(
                    f"a step callback set guidance_scale {run.guidance_scale} at step {i}, turning classifier-free "
                    "guidance on: the negative prompt was never encoded; start with guidance on and end it instead"
                )
            if run.copies < copies:
                _drop_rows(run, state, copies, x.shape[0])
            if view._reproject or run.copies < copies:
                projected, view._reproject = None, False
        if run.extra_chunk and run.guider is not None and i + 1 >= run.guider.perturbed_steps(n).stop:
            run.extra_chunk = False  # no later step uses the perturbed rows: the batch drops them
            _drop_rows(run, state, run.copies + 1, x.shape[0], last=True)
            projected = None
    if model.unet.deepcache is not None:
        model.unet.deepcache.features = None  # not kept between calls
    return x


# ------------------------------------------------------------------------------------------------
# Checks (all raised before any heavy work)


def _check_size(name, value):
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive whole number of pixels, got {value!r}")
    if value % 8:
        lo, hi = value - value % 8, value - value % 8 + 8
        raise ValueError(
            f"{name}={value} is not a multiple of 8 (the VAE downsamples by 8); use {lo or 8} or {hi} instead"
        )


def _check_common(model, a, mode):
    require_model(model, mode)
    if model.unet is None or model.vae is None:
        raise ValueError("the model has no UNet or VAE; load it with minsdxl.load(path)")
    if a["output_type"] not in _OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {_OUTPUT_TYPES}, got {a['output_type']!r}")
    _check_size("height", a.get("height"))
    _check_size("width", a.get("width"))
    g = a["guidance_scale"]
    if not isinstance(g, (int, float)) or isinstance(g, bool):
        raise TypeError(f"guidance_scale must be a number, got {g!r}")
    if not math.isfinite(g):
        raise ValueError(f"guidance_scale must be a finite number (1 or less: no CFG), got {g}")
    _number("guidance_rescale", a["guidance_rescale"])
    if not 0.0 <= a["guidance_rescale"] <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {a['guidance_rescale']!r}")
    if a.get("guider") is not None:
        a["guider"] = _check_guider(model, a)
        a["guidance_scale"] = a["guider"].guidance_scale  # what a step callback's pipeline.guidance_scale reads
    v = a["variation_strength"]
    if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(
            f"variation_strength must be in [0, 1] (0: the seed's noise, 1: the variation seed's), got {v!r}"
        )
    if v and not isinstance(a["variation_seed"], int):
        raise ValueError(f"variation_strength {v} turns the noise toward variation_seed: give it (a whole number)")
    if v and a.get("latents") is not None:
        raise ValueError("variation_strength varies the noise drawn from the seed; with latents= nothing is drawn")
    for k in ("seed_resize_from_h", "seed_resize_from_w"):
        if isinstance(a[k], bool) or not isinstance(a[k], int):
            raise ValueError(f"{k} must be a whole number of pixels (0 or less: off), got {a[k]!r}")
    if (a["seed_resize_from_h"] > 0) != (a["seed_resize_from_w"] > 0):
        raise ValueError("seed_resize_from_h and seed_resize_from_w go together: give both (or neither)")
    if a["seed_resize_from_h"] > 0 and a.get("latents") is not None:
        raise ValueError("seed_resize_from_h / _w resize the noise drawn from the seed; with latents= none is drawn")
    n = a["num_images_per_prompt"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_images_per_prompt must be a whole number >= 1, got {n!r}")
    if a["generator"] is not None and a["seed"] is not None:
        raise ValueError("pass either generator= or seed=, not both")
    _check_randomness(a)
    for k in ("original_size", "target_size", "crops_coords_top_left"):  # micro-conditioning pairs
        for key in (k, "negative_" + k):
            v = a.get(key)
            if v is None:
                continue
            low = 0 if k.startswith("crops") else 1  # a size of 0 conditions on nothing real
            if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(_is_number(x) and x >= low for x in v):
                form = "(top, left) pixels" if k.startswith("crops") else "(height, width) pixels"
                raise ValueError(
                    f"{key} must be a pair {form}, numbers >= {low}, e.g. (1024, 1024) or (0, 0); got {v!r}"
                )
    in_ch = model.unet.config.in_channels
    if mode != "inpaint" and in_ch == 9:
        raise ValueError(
            "this is a 9-channel inpainting UNet: call minsdxl.inpaint(model, prompt, image=, mask_image=)"
        )
    if (mode == "instruct_pix2pix") != (in_ch == 8):
        raise ValueError(
            "this is an 8-channel InstructPix2Pix UNet: call minsdxl.instruct_pix2pix(model, prompt, image=)"
            if in_ch == 8
            else f"instruct_pix2pix needs an InstructPix2Pix model (an 8-channel UNet); this UNet takes {in_ch}"
        )
    if mode == "text2img" and model.requires_aesthetics_score:
        raise ValueError(
            "this model (a refiner) is conditioned on an aesthetic score and only refines: call "
            "minsdxl.img2img(refiner, prompt, image=...) (e.g. with a base model's latents and denoising_start)"
        )
    if mode != "text2img" and a.get("image") is None:
        raise ValueError(f"{mode} needs image= (a PIL image, array, tensor, or 4-channel latents)")
    for key in ("denoising_start", "denoising_end"):
        v = a.get(key)
        if v is not None and (not isinstance(v, float) or not 0.0 < v < 1.0):
            raise ValueError(f"{key} must be a float in (0, 1) (a fraction of the schedule), got {v!r}")
    start, end = a.get("denoising_start"), a.get("denoising_end")
    if start is not None and end is not None and start >= end:
        raise ValueError(f"denoising_start={start} must be below denoising_end={end}")
    if hasattr(a["callback_on_step_end"], "tensor_inputs"):  # = diffusers: a PipelineCallback names its own
        a["callback_on_step_end_tensor_inputs"] = a["callback_on_step_end"].tensor_inputs
    if isinstance(a["callback_on_step_end_tensor_inputs"], str):  # one name
        a["callback_on_step_end_tensor_inputs"] = [a["callback_on_step_end_tensor_inputs"]]
    if not isinstance(a["callback_on_step_end_tensor_inputs"], (list, tuple)):
        raise ValueError(
            f"callback_on_step_end_tensor_inputs: a list of names such as ['latents'], got "
            f"{a['callback_on_step_end_tensor_inputs']!r}"
        )
    bad = [k for k in a["callback_on_step_end_tensor_inputs"] if k not in _CALLBACK_INPUTS]
    if bad:
        raise ValueError(
            f"callback_on_step_end_tensor_inputs: {bad} cannot be given to the callback; choose from "
            f"{_CALLBACK_INPUTS} (CFG-ordered: prompt_embeds, add_text_embeds and add_time_ids hold the negative "
            "half first)"
        )
    # found once: _finish perturbs these; [(layer, minsdxl.unet.Perturbation's arguments)]
    a["perturbations"] = _pag_layers(model, a) or (a["guider"].perturbations(model.unet) if a.get("guider") else [])
    if len({id(m) for m, _ in a["perturbations"]}) < len(a["perturbations"]):
        raise ValueError("the guider's configs perturb one layer twice: give each block once")
    ip_adapter.check_inputs(model, a["ip_adapter_image"], a["ip_adapter_image_embeds"])
    masks = (a["cross_attention_kwargs"] or {}).get("ip_adapter_masks")
    a["ip_adapter_masks"] = ip_adapter.check_masks(model, masks, a["ip_adapter_image"], a["ip_adapter_image_embeds"])


def _check_randomness(a):
    """seed=, generator= and latents= of the kinds they must be."""
    seed, gens, latents = a["seed"], a["generator"], a.get("latents")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64):
        raise ValueError(f"seed must be a whole number in [0, 2**64) (torch.manual_seed's range), got {seed!r}")
    for g in gens if isinstance(gens, (list, tuple)) else [] if gens is None else [gens]:
        if not isinstance(g, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator (or a list, one per image), got {type(g).__name__}; or pass "
                "seed=N"
            )
    if latents is not None and not (isinstance(latents, torch.Tensor) and latents.is_floating_point()):
        kind = f"a {latents.dtype} tensor" if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise TypeError(f"latents must be a floating-point torch.Tensor [batch, 4, H/8, W/8], got {kind}")


def _check_guider(model, a):
    """guider=: one of minsdxl.guidance's, with the call's guidance_scale / guidance_rescale where it has none."""
    g = a["guider"]
    if not isinstance(g, guidance.ClassifierFreeGuidance):
        names = ", ".join(c.__name__ for c in guidance.GUIDERS)
        raise TypeError(f"guider must be one of minsdxl.guidance's ({names}), got {type(g).__name__}")
    if a["pag_scale"]:
        raise ValueError("guider= and pag_scale: PAG is its own guidance rule here; use one of them")
    if model.unet.config.time_cond_proj_dim is not None:
        raise ValueError("guider=: this guidance-distilled UNet is given the guidance scale and runs no CFG")
    for start, stop in g.windows():
        if not (0.0 <= start <= stop <= 1.0):
            raise ValueError(f"guider start / stop must satisfy 0 <= start <= stop <= 1, got {start} / {stop}")
    if g.extra_chunk and a.get("controlnet") is not None and a["guess_mode"]:
        raise ValueError(f"guider={type(g).__name__} with a ControlNet in guess_mode is not supported; use one")
    return g.with_scale(a["guidance_scale"], a["guidance_rescale"])


def _pag_layers(model, a) -> list:
    """The self-attention layers Perturbed-Attention Guidance perturbs (none when pag_scale is 0): those
    whose diffusers name matches one of pag_applied_layers as a regex (= PAGMixin._set_pag_attn_processor:
    "mid", "down_blocks.2", "up_blocks.0.attentions.1", ...)."""
    scale, adaptive, layers = a["pag_scale"], a["pag_adaptive_scale"], a["pag_applied_layers"]
    _number("pag_scale", scale)
    _number("pag_adaptive_scale", adaptive)
    if scale < 0 or adaptive < 0:
        raise ValueError(f"pag_scale and pag_adaptive_scale must be >= 0, got {scale} and {adaptive}")
    if not scale:
        return []
    if a.get("controlnet") is not None and a["guess_mode"]:  # (diffusers' ControlNet PAG pipelines have none)
        raise ValueError("pag_scale with a ControlNet in guess_mode is not supported; use one of them")
    found = []
    if not isinstance(layers, (str, list, tuple)) or not layers:
        raise ValueError(f"pag_applied_layers: a layer name or a list of them (regexes, e.g. 'mid'), got {layers!r}")
    for layer_id in [layers] if isinstance(layers, str) else list(layers):
        if not isinstance(layer_id, str):
            raise ValueError(f"pag_applied_layers: layer names are strings (regexes), got {layer_id!r}")
        try:
            re.compile(layer_id)
        except re.error as e:
            raise ValueError(f"pag_applied_layers: {layer_id!r} is not a regular expression ({e})") from None
        last = layer_id.split(".")[-1]
        hits = [
            m
            for name, m in model.unet.named_modules()
            if name.endswith("attn1")
            and re.search(layer_id, name)
            and not (last.isnumeric() and name.split(".")[-1].isnumeric() and last == name.split(".")[-1])
        ]
        if not hits:
            raise ValueError(
                f"pag_applied_layers: no self-attention layer of the UNet matches {layer_id!r}; e.g. 'mid', "
                "'down_blocks.2', 'up_blocks.0.attentions.1'"
            )
        found += [m for m in hits if m not in found]
    return [(m, dict(kind="identity")) for m in found]


@contextmanager
def _perturbed(model, run, found):
    """The layers PAG or a guider perturbs, for this call (= the PAG processors set per call, the guiders'
    hooks per batch): the extra chunk's rows, or AutoGuidance's negative ones."""
    g = run.guider
    if g is not None and g.extra_chunk and not run.extra_chunk:
        found = []  # no step uses the perturbed prediction: _setup left the chunk out
    chunk = 0 if g is not None and not g.extra_chunk else -1
    size = tuple(run.latents.shape[-2:])
    run.perturbations = [(m, Perturbation(chunks=run.copies, chunk=chunk, size=size, **kw)) for m, kw in found]
    for m, p in run.perturbations:
        m.perturb = p
    try:
        yield
    finally:
        for m in model.unet.modules():
            if getattr(m, "perturb", None) is not None:
                m.perturb = None


def _generator(a):
    return torch.Generator("cpu").manual_seed(int(a["seed"])) if a["seed"] is not None else a["generator"]


def _scheduler(model, a) -> Scheduler:
    name = a["scheduler"]
    if not isinstance(name, Scheduler):
        name = make_scheduler(name if name is not None else getattr(model, "scheduler", None), model.scheduler_config)
    if a["seed"] is not None and isinstance(name, DPMSolverSDE) and name.config["noise_sampler_seed"] is None:
        # seed= fixes the Brownian motion too (diffusers seeds it from torch's global RNG: the seed its step
        # draws after torch.manual_seed(seed)), so a seed, and the CLI's, always gives the same image
        g = torch.Generator().manual_seed(int(a["seed"]))
        name = type(name)({**name.config, "noise_sampler_seed": torch.randint(0, 2**63 - 1, [], generator=g).item()})
    if a["eta"] and type(name) is DDIM:  # the other schedulers' steps take no eta: ignored, as in diffusers
        raise ValueError("eta > 0 (stochastic DDIM) is not supported; use eta=0.0 or the 'euler_a' scheduler")
    # = retrieve_timesteps: custom timesteps or sigmas replace num_inference_steps (their count is the steps)
    custom = a["timesteps"] is not None or a["sigmas"] is not None
    if a["timesteps"] is not None and a["sigmas"] is not None:
        raise ValueError("pass either timesteps= or sigmas=, not both")
    name.set_timesteps(None if custom else a["num_inference_steps"], timesteps=a["timesteps"], sigmas=a["sigmas"])
    return name


def _noise(shape, generator, device, dtype, a) -> torch.Tensor:
    """The starting noise (= randn_tensor), or with variation_strength > 0 A1111's variation of it: each image's
    noise turned toward the same-shaped draw of variation_seed (rng.slerp), the seed's generator consumed as
    without it, so the rest of the run draws the same. With seed_resize_from_h / _w (pixels; A1111's "Seed
    resize from"), the noise (and its variation) the same seed gives at that size is pasted in the middle of
    this size's own draw from the same generator state, cropped where it is larger (= A1111's ImageRNG.first):
    the composition of that size's image kept at this one."""
    small = tuple(shape[:2]) + (a["seed_resize_from_h"] // 8, a["seed_resize_from_w"] // 8)
    resize = a["seed_resize_from_h"] > 0 and a["seed_resize_from_w"] > 0 and small != tuple(shape)
    gens = [g for g in (generator if isinstance(generator, (list, tuple)) else [generator]) if g is not None]
    states = [g.get_state() for g in gens] if resize else []  # (no generator: torch's global RNG, not rewound)
    noise = randn(small if resize else shape, generator, device, dtype)
    if a["variation_strength"]:
        other = randn(noise.shape, torch.Generator().manual_seed(a["variation_seed"]), device, dtype)
        noise = torch.stack([slerp(a["variation_strength"], n, o) for n, o in zip(noise, other)])
    if not resize:
        return noise
    for g, state in zip(gens, states):
        g.set_state(state)
    full = randn(shape, generator, device, dtype)
    (h, w), (sh, sw) = shape[-2:], small[-2:]
    dy, dx = (h - sh) // 2, (w - sw) // 2  # the small noise's offset in the full one: < 0 where it is larger
    ph, pw = sh + 2 * min(dy, 0), sw + 2 * min(dx, 0)  # (as A1111: an odd surplus leaves a row of the full draw)
    full[..., max(dy, 0) : max(dy, 0) + ph, max(dx, 0) : max(dx, 0) + pw] = noise[
        ..., max(-dy, 0) : max(-dy, 0) + ph, max(-dx, 0) : max(-dx, 0) + pw
    ]
    return full


def _device(model):
    """Where the work runs: the offload target when components wait on the CPU, else the UNet's device."""
    return getattr(model, "offload_device", None) or model.unet.device


@contextmanager
def _on_device(model, *names):
    """Model offload (load(..., offload=True)): move just these components (names of the model's, or
    modules such as ControlNets) to the device for the block. Inference never changes the weights, so
    nothing is copied back: the CPU tensors are kept and put back afterwards and the device copies
    dropped (half the traffic of diffusers' move there and back)."""
    target = getattr(model, "offload_device", None)
    mods = [getattr(model, n) if isinstance(n, str) else n for n in names] if target else []
    mods = [m for m in mods if m is not None]
    kept = [
        (sub, kind, name, t, t.data)
        for m in mods
        for sub in m.modules()
        for kind in ("_parameters", "_buffers")
        for name, t in getattr(sub, kind).items()
        if t is not None
    ]
    for m in mods:
        m.to(target)
    try:
        yield
    finally:
        # whichever way Module.to converted (in place, new Parameter objects, swapped), restore both
        for sub, kind, name, t, data in kept:
            getattr(sub, kind)[name] = t
            t.data = data


def _prompts(model, a, cfg):
    with _on_device(model, "text_encoder", "text_encoder_2"):
        return _encode(model, a, cfg)


def _encode(model, a, cfg):
    return encode_prompt(
        model,
        a["prompt"],
        a["prompt_2"],
        a["negative_prompt"],
        a["negative_prompt_2"],
        num_images_per_prompt=a["num_images_per_prompt"],
        do_classifier_free_guidance=cfg,
        clip_skip=a["clip_skip"],
        prompt_embeds=a["prompt_embeds"],
        negative_prompt_embeds=a["negative_prompt_embeds"],
        pooled_prompt_embeds=a["pooled_prompt_embeds"],
        negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"],
        device=_device(model),
        prompt_weighting=a["prompt_weighting"],
    )


@dataclass
class _Setup:
    """What all three functions make first: the cut schedule, the generator, the prompt embeddings."""

    scheduler: Scheduler
    timesteps: torch.Tensor
    generator: object
    embeds: tuple  # (prompt, negative, pooled, negative pooled) as encode_prompt returns them
    cfg: bool
    image_embeds: list | None  # the IP-Adapter image prompt (ip_adapter.image_prompt)
    image_masks: list | None
    control_steps: int  # the steps before denoising_end's cut: what ControlNet guidance windows divide
    extra: bool = False  # the positive rows twice (PAG's, a layer-perturbing guider's perturbed chunk)
    guidance_dim: int | None = None  # a guidance-distilled UNet's time_cond_proj_dim
    schedule: list | None = None  # A1111's prompt editing: [(last step, embeds as `embeds`)], embeds the first's

    def stack(self, negative, positive):
        """The UNet batch's rows: [negative,] positive[, positive again for the perturbed chunk]."""
        rows = [negative] * self.cfg + [positive] * (1 + self.extra)
        return torch.cat(rows) if len(rows) > 1 else positive

    @property
    def batch(self):
        return self.embeds[0].shape[0]

    @property
    def dtype(self):
        return self.embeds[0].dtype

    @property
    def pooled_dim(self):
        return self.embeds[2].shape[-1]

    def guidance_embedding(self, a, latents):
        """= the pipelines' step 9 for a guidance-distilled UNet: guidance_scale - 1 embedded once per image (fp32,
        then the latents' dtype); None for any other UNet."""
        if self.guidance_dim is None:
            return None
        w = torch.full((len(latents),), a["guidance_scale"] - 1)
        return guidance_scale_embedding(w, self.guidance_dim).to(latents.device, latents.dtype)

    def run(self, a, latents, time_ids) -> _Run:
        pe, npe, ppe, nppe = self.embeds
        return _Run(
            latents,
            self.timesteps,
            self.scheduler,
            self.stack(npe, pe),
            self.stack(nppe, ppe),
            time_ids,
            a["guidance_scale"],
            a["guidance_rescale"],
            self.generator,
            eta=a["eta"],
            image_embeds=self.image_embeds,
            image_masks=self.image_masks,
            pag_scale=a["pag_scale"],
            pag_adaptive_scale=a["pag_adaptive_scale"],
            extra_chunk=self.extra,
            guidance_embedding=self.guidance_embedding(a, latents),
            guider=a.get("guider"),
            prompt_schedule=self.schedule
            and [(end, self.stack(e[1], e[0]), self.stack(e[3], e[2])) for end, e in self.schedule],
        )


def _setup(model, a, strength=1.0, denoising_start=None, cfg=None) -> _Setup:
    guidance_dim = model.unet.config.time_cond_proj_dim
    if cfg is None:
        cfg = a["guidance_scale"] > 1.0 if a.get("guider") is None else a["guider"].active
        cfg = cfg and guidance_dim is None
    sched = _scheduler(model, a)
    # = the ControlNet pipelines: controlnet_keep is made before the denoising_end cut
    control_steps = len(sched.select_timesteps(strength, denoising_start, None))
    timesteps = sched.select_timesteps(strength, denoising_start, a["denoising_end"])
    schedule = _prompt_schedule(model, a, cfg, control_steps)
    embeds = schedule[0][1] if schedule else _prompts(model, a, cfg)
    with _on_device(model, "image_encoder"):
        images, masks = ip_adapter.image_prompt(
            model,
            a["ip_adapter_image"],
            a["ip_adapter_image_embeds"],
            a["ip_adapter_masks"],
            a["num_images_per_prompt"],
            cfg,
            embeds[0].shape[0],
            _device(model),
        )
    g = a.get("guider")  # a guider's perturbed chunk, if a step uses it
    extra = bool(a["pag_scale"]) or (g is not None and g.extra_chunk and len(g.perturbed_steps(len(timesteps))) > 0)
    if extra and images is not None:  # = the PAG pipelines: each image prompt's [negative,] positive, positive
        images = [torch.cat([*e.chunk(2), e.chunk(2)[1]]) if cfg else torch.cat([e, e]) for e in images]
    return _Setup(
        sched, timesteps, _generator(a), embeds, cfg, images, masks, control_steps, extra, guidance_dim, schedule
    )


def _prompt_schedule(model, a, cfg, steps):
    """A1111's prompt editing ([from:to:when], [a|b]; with prompt_weighting, whose syntax it is): each
    stretch of steps' encode_prompt, [(last step, embeds)], over the steps run before a denoising_end cut
    (A1111's: its sampling steps); None for prompts without it."""
    if not a["prompt_weighting"] or a["prompt_embeds"] is not None:
        return None
    names = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2")
    texts = prompt_schedules({k: a[k] for k in names}, steps)
    if texts is None:
        return None
    encoded, out = {}, []  # an alternation comes back to the same texts: encoded once
    with _on_device(model, "text_encoder", "text_encoder_2"):
        for end, t in texts:
            key = repr(sorted(t.items()))
            if key not in encoded:
                encoded[key] = _encode(model, {**a, **t}, cfg)
            out.append((end, encoded[key]))
    return out


def _time_ids(model, ids, neg_ids, pooled_dim, dtype):
    cfg = model.unet.config
    expected = cfg.projection_class_embeddings_input_dim
    got = cfg.addition_time_embed_dim * len(ids) + pooled_dim
    if got != expected:
        kind = "a refiner-style (aesthetic score)" if len(ids) == 5 else "a base-style (target size)"
        raise ValueError(
            f"{kind} micro-conditioning gives {got} add-embedding inputs ({len(ids)} time ids and pooled prompt "
            f"embeddings {pooled_dim} wide) but the UNet expects {expected}: pooled_prompt_embeds of another width, "
            "or the model's requires_aesthetics_score flag does not fit its UNet (base: False, refiner: True)"
        )
    return torch.tensor([list(ids)], dtype=dtype), torch.tensor([list(neg_ids)], dtype=dtype)


def _pairs(a, keys):
    return {k: tuple(a[k]) if a[k] is not None else None for k in keys}


def _finish(model, run, a):
    with _on_device(model, "unet", *(c.net for c in run.controls or ())), _perturbed(model, run, a["perturbations"]):
        x = _denoise(model, run, a["callback_on_step_end"], a["callback_on_step_end_tensor_inputs"], a["progress"])
    if a["output_type"] == "latent":
        return x
    with _on_device(model, "vae"):
        image = decode(model, x)
    watermark = getattr(model, "add_watermarker", None)
    if watermark or (watermark is None and watermark_available()):  # = diffusers' add_watermarker default
        image = apply_watermark(image)
    return postprocess(image, a["output_type"])


def decode(model, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> image in [-1, 1], in the VAE's dtype (fp32 when force_upcast; see load).
    Non-finite output from a half-precision VAE is retried once in fp32 with a warning; never returns
    NaN (a silently black image)."""
    vae = model.vae
    image = vae.decode(vae.unscale_latents(latents.to(vae.dtype)))
    if not torch.isfinite(image).all():
        if vae.dtype in (torch.float16, torch.bfloat16):
            warnings.warn(
                f"the {vae.dtype} VAE produced NaN/Inf; decoding again in float32. Fix: load with a float32 VAE "
                "or use the fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix) via vae=...",
                stacklevel=3,
            )
            dtype = vae.dtype
            image = vae.float().decode(vae.unscale_latents(latents.float()))
            vae.to(dtype)
        if not torch.isfinite(image).all():
            raise FloatingPointError(
                "the VAE decoded NaN/Inf even in float32: the latents are not finite (check the UNet's dtype "
                "and the inputs; an fp16 UNet can overflow: try dtype=torch.bfloat16 or float32)"
            )
    return image


def encode_image(model, image: torch.Tensor, generator, dtype, argmax=False) -> torch.Tensor:
    """[-1, 1] image -> scaled latents, VAE posterior sample drawn from `generator` (one draw per
    image when it is a list), in fp32 when force_upcast (= img2img prepare_latents / _encode_vae_image).
    argmax: the posterior's mean, unscaled (= the InstructPix2Pix pipeline's prepare_image_latents)."""
    with _on_device(model, "vae"):
        return _encode_image(model, image, generator, dtype, argmax)


def _encode_image(model, image, generator, dtype, argmax=False):
    vae = model.vae
    # diffusers first casts the image to the prompt dtype, then to fp32 for an upcast VAE
    image = image.to(device=vae.device, dtype=dtype).to(torch.float32 if vae.force_upcast else vae.dtype)
    if argmax:
        z = vae.encode(image).mode()
    elif isinstance(generator, (list, tuple)):
        z = torch.cat([vae.encode(image[i : i + 1]).sample(generator[i]) for i in range(image.shape[0])])
    else:
        z = vae.encode(image).sample(generator)
    z = z.to(dtype)
    if not torch.isfinite(z).all():
        raise FloatingPointError("the VAE encoder produced NaN/Inf; load the VAE in float32 (or the fp16-fix VAE)")
    return z if argmax else vae.scale_latents(z)


def _spread(x, batch, what):
    """= prepare_latents: repeat a batch of images to the number of images asked for."""
    if batch % x.shape[0]:
        raise ValueError(f"cannot spread {x.shape[0]} {what} over {batch} images; pass 1 or {batch}")
    return torch.cat([x] * (batch // x.shape[0])) if x.shape[0] < batch else x


# ------------------------------------------------------------------------------------------------
# ControlNet inputs (= the three ControlNet pipelines' check_inputs and prepare_(control_)image)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _number(name, v):
    if not _is_number(v):
        raise TypeError(f"{name} must be a number, got {v!r}")


def _per(name, value, n, what):
    """A number for each of n (a single number repeated), checked."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values for {n} {what}; give one for each")
    for v in values:
        _number(name, v)
    return values


def _check_controls(model, a, key):
    """The ControlNet arguments, checked before any heavy work: None without a controlnet, else one
    _Control per ControlNet holding the user's images (control_pixels makes them tensors). `key`: the
    control image's argument ("image" in text2img, "control_image" in img2img and inpaint, as in
    diffusers' ControlNet pipelines; text2img also takes control_image, the Union pipeline's name).

    ControlNet: one image. Several ControlNets: a list of images, one each, and lists of scales / windows
    (a number: the same for all). A ControlNet-Union: control_image a list of images, control_mode their
    kinds (indices), scales / windows one per image; several Unions: one image and one kind each."""
    nets = a["controlnet"]
    images = a[key]
    if key == "image" and a["control_image"] is not None:
        if images is not None:
            raise ValueError("pass the control image as image= or as control_image=, not both")
        images = a["control_image"]
    if nets is None:
        if images is not None or a["control_mode"] is not None:
            what = f"{key}= is a ControlNet's control image" if images is not None else "control_mode= is a Union's"
            hint = ": pass controlnet= (minsdxl.load_controlnet) too"
            raise ValueError(what + hint + (", or call img2img to start from an image" if key == "image" else ""))
        return None
    multi = isinstance(nets, (list, tuple))
    nets = list(nets) if multi else [nets]
    if not nets:
        raise ValueError("controlnet=[] holds no ControlNet; pass one, a list of them, or None")
    for net in nets:
        if not isinstance(net, ControlNetModel):
            raise TypeError(
                f"controlnet must be a minsdxl ControlNetModel (minsdxl.load_controlnet(path)) or a list of them, "
                f"got {type(net).__name__}"
            )
        _check_fits(model.unet, net)
    unions = {isinstance(net, ControlNetUnionModel) for net in nets}
    if len(unions) > 1:
        raise ValueError("controlnet= mixes ControlNets and ControlNet-Unions; pass ControlNets or Unions, not both")
    union = unions.pop()
    if images is None:
        raise ValueError(f"a ControlNet needs its control image: pass {key}=")
    modes = a["control_mode"]
    if union and modes is None:
        raise ValueError(
            "a ControlNet-Union needs control_mode=: the kind of each control image (an index its model card "
            "lists, e.g. xinsir's 0 openpose, 1 depth, 2 hed/scribble, 3 canny/lineart, 4 normal, 5 segment)"
        )
    if not union and modes is not None:
        raise ValueError("control_mode= is for a ControlNet-Union (ControlNetUnionModel); this is a ControlNet")
    if multi:  # one image (and kind) per net
        if not isinstance(images, (list, tuple)) or len(images) != len(nets):
            got = len(images) if isinstance(images, (list, tuple)) else 1
            raise ValueError(
                f"{len(nets)} ControlNets need a list of {len(nets)} control images ({key}=[...], one per "
                f"ControlNet, in the same order); got {got}"
            )
        groups = [[image] for image in images]
        modes = [[m] for m in _per("control_mode", modes, len(nets), "ControlNets")] if union else [None] * len(nets)
        count, what = len(nets), "ControlNets"
    elif union:  # = the Union pipeline: control_image and control_mode lists, one entry per image
        groups = [list(images) if isinstance(images, (list, tuple)) else [images]]
        modes = [list(modes) if isinstance(modes, (list, tuple)) else [modes]]
        if len(modes[0]) != len(groups[0]):
            raise ValueError(f"control_mode has {len(modes[0])} kinds for {len(groups[0])} control images")
        count, what = len(groups[0]), "control images"
    else:
        if isinstance(a["controlnet_conditioning_scale"], (list, tuple)):
            raise ValueError("controlnet_conditioning_scale: one ControlNet takes one number, not a list")
        groups, modes, count, what = [[images]], [None], 1, "ControlNets"
    for net, m in zip(nets, modes):
        if m is not None and not all(isinstance(k, int) and 0 <= k < net.config.num_control_type for k in m):
            raise ValueError(f"control_mode {m}: each must be a whole number below {net.config.num_control_type}")
    scales = _per("controlnet_conditioning_scale", a["controlnet_conditioning_scale"], count, what)
    start, end = a["control_guidance_start"], a["control_guidance_end"]
    if isinstance(start, (list, tuple)) != isinstance(end, (list, tuple)):  # = __call__: the number repeated
        n = len(start) if isinstance(start, (list, tuple)) else len(end)
        start, end = (v if isinstance(v, (list, tuple)) else [v] * n for v in (start, end))
    starts = _per("control_guidance_start", start, count, what)
    ends = _per("control_guidance_end", end, count, what)
    for st, en in zip(starts, ends):
        if not 0.0 <= st < en <= 1.0:
            raise ValueError(
                f"control_guidance_start={st} and control_guidance_end={en}: need 0 <= start < end <= 1 (the "
                "fraction of the steps a ControlNet acts in)"
            )
    if multi:
        return [
            _Control(net, g, [sc], [st], [en], m, from_multi=union)
            for net, g, m, sc, st, en in zip(nets, groups, modes, scales, starts, ends)
        ]
    return [_Control(nets[0], groups[0], scales, starts, ends, modes[0])]


def _check_fits(unet, net):
    keys = ("block_out_channels", "layers_per_block", "cross_attention_dim", "projection_class_embeddings_input_dim")
    u, c = unet.config, net.config
    bad = [f"{k}: ControlNet {getattr(c, k)}, UNet {getattr(u, k)}" for k in keys if getattr(c, k) != getattr(u, k)]
    if c.in_channels != 4:
        bad.append(f"in_channels: {c.in_channels} (the latents have 4)")
    if bad:
        raise ValueError(
            "this ControlNet does not fit the model's UNet (" + "; ".join(bad) + "): an SDXL ControlNet works with "
            "SDXL base-shaped UNets (base, inpaint, fine-tunes), not with the refiner"
        )


def _control_pixels(controls, height, width, crop=None):
    """Each control image in [0, 1] at height x width (None: the first one's own size, a multiple of 8),
    in place, and that size. diffusers sizes each at its own size unless given one; a control image of
    another size then fails in its UNet: here it is resized to the first's."""
    for c in controls:
        for k, image in enumerate(c.images):
            x = to_tensor(image, height, width, crop=crop, normalize=False)
            height, width = x.shape[-2:]
            if x.shape[1] != c.net.config.conditioning_channels:
                raise ValueError(
                    f"a control image has {x.shape[1]} channels; this ControlNet reads "
                    f"{c.net.config.conditioning_channels}"
                )
            c.images[k] = x
    return int(height), int(width)


def _attach_controls(run: _Run, controls, st: _Setup, a):
    """= prepare_image: each control image repeated to the batch, on the device in its ControlNet's dtype,
    doubled for CFG unless in guess mode (a Union's kinds alike); the run then calls the ControlNets."""
    per_prompt = a["num_images_per_prompt"]
    prompts = st.batch // per_prompt
    first = controls[0].images[0]
    if tuple(first.shape[-2:]) != tuple(8 * d for d in run.latents.shape[-2:]):
        h, w = (8 * d for d in run.latents.shape[-2:])
        raise ValueError(
            f"the control image is {first.shape[-1]}x{first.shape[-2]} but the image to make is {w}x{h}: "
            "pass height= and width= (both are then resized) or a control image of that size"
        )
    # = __call__ (the ControlNet PAG pipelines: never guess mode)
    guess = (a["guess_mode"] or controls[0].net.config.global_pool_conditions) and not st.extra
    for c in controls:
        for k, x in enumerate(c.images):
            if x.shape[0] not in (1, prompts):
                raise ValueError(f"got {x.shape[0]} control images for {prompts} prompts; pass 1 or {prompts}")
            x = x.repeat_interleave(st.batch if x.shape[0] == 1 else per_prompt, dim=0)
            x = x.to(run.latents.device, c.net.dtype)
            c.images[k] = x if guess else st.stack(x, x)  # = the ControlNet (PAG) pipelines: every chunk
        if c.modes is not None:  # = __call__'s control_type: the kinds in use, one-hot, a row per batch row
            kinds = torch.zeros(c.net.config.num_control_type).scatter_(0, torch.tensor(c.modes), 1)
            c.kinds = kinds.to(run.latents.device, st.dtype).repeat(len(c.images[0]), 1)
    run.controls, run.guess_mode, run.control_steps = controls, guess, st.control_steps
    return run


def _own_size(image, multiple: int = 8):
    """An image's (height, width) in pixels (latents: times 8), rounded down to a multiple of 8
    (get_default_height_width) or of `multiple`."""
    if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == 4:
        return 8 * image.shape[-2], 8 * image.shape[-1]
    h, w = _hw(image)
    return h - h % multiple, w - w % multiple


def _check_adapters(model, a):
    """text2img's T2I-Adapter arguments, checked before any heavy work: None, or (adapters, images,
    scales), one each per adapter (= StableDiffusionXLAdapterPipeline: image=, adapter_conditioning_scale)."""
    adapters = a["adapter"]
    if adapters is None:
        for k in ("adapter_conditioning_scale", "adapter_conditioning_factor"):
            if a[k] != 1.0:
                raise ValueError(f"{k} is for a T2I-Adapter: pass adapter= (minsdxl.load_t2i_adapter) too")
        return None
    if model.unet.deepcache is not None:  # (the package adds the features to its cached tensors in place)
        raise ValueError("a T2I-Adapter with DeepCache is not supported: minsdxl.deepcache.disable(model) first")
    multi = isinstance(adapters, (list, tuple))
    adapters = list(adapters) if multi else [adapters]
    ch = model.unet.config.block_out_channels
    for ad in adapters:
        if not isinstance(ad, T2IAdapter):
            raise TypeError(
                f"adapter must be a minsdxl T2IAdapter (minsdxl.load_t2i_adapter(path)) or a list of them, got "
                f"{type(ad).__name__}"
            )
        if ad.config.downscale_factor != 16:  # its first features at 1/16: the UNet's first level, downsampled
            raise ValueError(
                f"this T2I-Adapter downscales by {ad.config.downscale_factor}; an SDXL UNet needs 16 (SD 1.x adapters "
                "use 8)"
            )
        if tuple(ad.config.channels) != (*ch, ch[-1]):
            raise ValueError(
                f"this T2I-Adapter's features have {list(ad.config.channels)} channels; the model's UNet needs "
                f"{[*ch, ch[-1]]} (one per level and its middle block): an SDXL T2I-Adapter fits SDXL base UNets"
            )
    images = a["image"]
    if images is None:
        raise ValueError("a T2I-Adapter needs its control image: pass image=")
    if multi and (not isinstance(images, (list, tuple)) or len(images) != len(adapters)):
        raise ValueError(f"{len(adapters)} T2I-Adapters need a list of {len(adapters)} images (image=[...]), one each")
    scales = _per("adapter_conditioning_scale", a["adapter_conditioning_scale"], len(adapters), "T2I-Adapters")
    factor = a["adapter_conditioning_factor"]
    _number("adapter_conditioning_factor", factor)
    if not 0.0 <= factor <= 1.0:
        raise ValueError(f"adapter_conditioning_factor must be in [0, 1] (the fraction of steps), got {factor}")
    return adapters, list(images) if multi else [images], scales


def _adapter_pixels(adp, height, width):
    """The adapters' images in [0, 1] at height x width (None: the first one's own size rounded down to a
    multiple of the adapter's 16, = _default_height_width), in place, and that size."""
    adapters, images, _ = adp
    f = adapters[0].config.downscale_factor
    for k, (ad, image) in enumerate(zip(adapters, images)):
        if height is None or width is None:
            h, w = _own_size(image, f)
            height, width = height or h, width or w
        if height % f or width % f or min(height, width) < f:
            raise ValueError(f"a T2I-Adapter needs height and width multiples of {f} (>= {f}); got {height}x{width}")
        x = to_tensor(image, height, width, normalize=False)
        if ad.config.in_channels == 1 and x.shape[1] == 3:  # a grey image read as RGB: its one channel
            if not (torch.equal(x[:, :1], x[:, 1:2]) and torch.equal(x[:, :1], x[:, 2:])):
                raise ValueError("this T2I-Adapter (sketch) reads a grey image: pass image.convert('L')")
            x = x[:, :1]
        if x.shape[1] != ad.config.in_channels:
            raise ValueError(
                f"an adapter image has {x.shape[1]} channels; this T2I-Adapter reads {ad.config.in_channels}"
            )
        images[k] = x
    return height, width


def _attach_adapters(model, run: _Run, adp, st: _Setup, a):
    """= the adapter pipeline: each adapter's features once per call, times its scale (several: summed, as
    MultiAdapter), repeated to the batch, doubled for CFG; added for the first adapter_conditioning_factor
    of the steps."""
    adapters, images, scales = adp
    per_prompt, prompts = a["num_images_per_prompt"], st.batch // a["num_images_per_prompt"]
    features = None
    with _on_device(model, *adapters), torch.no_grad():
        for ad, x, scale in zip(adapters, images, scales):
            if x.shape[0] not in (1, prompts):
                raise ValueError(f"got {x.shape[0]} adapter images for {prompts} prompts; pass 1 or {prompts}")
            out = [f * scale for f in ad(x.to(run.latents.device, ad.dtype))]
            features = out if features is None else [acc + f for acc, f in zip(features, out)]
    features = [f.repeat_interleave(st.batch if len(f) == 1 else per_prompt, dim=0) for f in features]
    run.adapter_features = [st.stack(f, f) for f in features]
    run.adapter_steps = int(len(run.timesteps) * a["adapter_conditioning_factor"])
    return run


# ------------------------------------------------------------------------------------------------
# The three public functions


def _per_call(fn):
    """What a call sets on the model for its duration only. cross_attention_kwargs={"scale": s}: the loaded
    LoRA adapters count s times in the text encoders and the UNet (= diffusers' lora_scale; the only key its
    default attention reads); {"ip_adapter_masks": [...]}: the IP-Adapter image prompts' regions (read by
    _check_common). tiling=True: circular padding (`circular`)."""

    @functools.wraps(fn)
    def call(model, *args, cross_attention_kwargs=None, tiling=False, **kw):
        extra = sorted(set(cross_attention_kwargs or {}) - {"scale", "ip_adapter_masks"})
        if extra:
            raise ValueError(
                f"cross_attention_kwargs {extra} are not supported: SDXL's attention takes 'scale' (the LoRA "
                "scale) and 'ip_adapter_masks'; custom attention processors are not part of minsdxl"
            )
        with lora.scaled(model, (cross_attention_kwargs or {}).get("scale")), circular(model, tiling):
            return fn(model, *args, cross_attention_kwargs=cross_attention_kwargs, tiling=tiling, **kw)

    return call


@contextmanager
def circular(model, on: bool = True):
    """A1111's "Tiling" (its apply_circular): every padded conv of the UNet and the VAE pads circularly, so
    the image wraps around: a seamless texture, tileable side by side. As in A1111, the VAE encoder's
    asymmetric downsampling pad stays zeros (img2img of a tileable image still sees its edges there)."""
    if not on:
        yield
        return
    if model.vae.use_tiling:
        raise ValueError(
            "tiling=True (a seamless image) and the VAE's tiled decoding do not mix: each VAE tile would wrap "
            "around on its own; call model.vae.disable_tiling() first"
        )
    convs = [
        m for part in (model.unet, model.vae) for m in part.modules() if isinstance(m, nn.Conv2d) and any(m.padding)
    ]
    before = [m.padding_mode for m in convs]
    for m in convs:
        m.padding_mode = "circular"  # (nn.Conv2d pads by F.pad then, with the padding it was built with)
    try:
        yield
    finally:
        for m, mode in zip(convs, before):
            m.padding_mode = mode


@_per_call
def text2img(
    model,
    prompt=None,
    prompt_2=None,
    height=None,
    width=None,
    num_inference_steps=50,
    timesteps=None,
    sigmas=None,
    denoising_end=None,
    guidance_scale=5.0,
    negative_prompt=None,
    negative_prompt_2=None,
    num_images_per_prompt=1,
    eta=0.0,
    generator=None,
    latents=None,
    prompt_embeds=None,
    negative_prompt_embeds=None,
    pooled_prompt_embeds=None,
    negative_pooled_prompt_embeds=None,
    ip_adapter_image=None,
    ip_adapter_image_embeds=None,
    output_type="pil",
    guidance_rescale=0.0,
    original_size=None,
    crops_coords_top_left=(0, 0),
    target_size=None,
    negative_original_size=None,
    negative_crops_coords_top_left=(0, 0),
    negative_target_size=None,
    clip_skip=None,
    callback_on_step_end=None,
    callback_on_step_end_tensor_inputs=("latents",),
    image=None,
    control_image=None,
    controlnet=None,
    controlnet_conditioning_scale=1.0,
    guess_mode=False,
    control_guidance_start=0.0,
    control_guidance_end=1.0,
    control_mode=None,
    adapter=None,
    adapter_conditioning_scale=1.0,
    adapter_conditioning_factor=1.0,
    pag_scale=0.0,
    pag_adaptive_scale=0.0,
    pag_applied_layers="mid",
    seed=None,
    variation_seed=None,
    variation_strength=0.0,
    seed_resize_from_h=0,
    seed_resize_from_w=0,
    scheduler=None,
    cross_attention_kwargs=None,
    progress=True,
    prompt_weighting=None,
    tiling=False,
    guider=None,
):
    """= StableDiffusionXLPipeline.__call__(...).images. Extra: seed=int (a CPU generator), scheduler=
    (a name such as "euler", "DPM++ 2M Karras", or a minsdxl scheduler), progress=False hides the bar,
    prompt_weighting="a1111" (A1111's "(word:1.3)" syntax and prompts of any length; encode_prompt's),
    tiling=True (A1111's "Tiling": circular padding, a seamless image to tile side by side; every function),
    variation_seed= and variation_strength= (every function: A1111's variation seeds, the starting noise turned
    toward variation_seed's by that fraction; rng.slerp), seed_resize_from_h= / _w= (every function: A1111's
    "Seed resize from": that size's noise of the same seed in the middle of this one's), guider= (text2img,
    img2img, inpaint): a
    minsdxl.guidance rule instead of CFG (APG, CFG-Zero*, TCFG, ...:
    = diffusers' guiders in its Modular pipelines)
    With controlnet= (minsdxl.load_controlnet; a list for several) = StableDiffusionXLControlNetPipeline:
    image= is the control image (a list, one per ControlNet), whose size is the default height x width; a
    ControlNet-Union (= StableDiffusionXLControlNetUnionPipeline) takes control_image= (a list) and
    control_mode= (each image's kind). With adapter= (minsdxl.load_t2i_adapter; a list for several) =
    StableDiffusionXLAdapterPipeline: image= is the adapter's image (a ControlNet beside it then takes
    control_image=), adapter_conditioning_scale, adapter_conditioning_factor (the first steps only)."""
    a = dict(locals())
    _check_common(model, a, "text2img")
    adp = _check_adapters(model, a)
    ctl = _check_controls(model, a, "image" if adp is None else "control_image")
    if adp is not None:
        height, width = _adapter_pixels(adp, height, width)
    if ctl is not None:
        height, width = _control_pixels(ctl, height, width)
    sample = model.unet.config.sample_size * 8
    height, width = height or sample, width or sample
    st = _setup(model, a)
    batch, device, dtype = st.batch, _device(model), st.dtype
    shape = (batch, 4, height // 8, width // 8)
    if latents is None:
        latents = _noise(shape, st.generator, device, dtype, a)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents have shape {tuple(latents.shape)}; this call needs {shape} (batch, 4, H/8, W/8)")
    latents = latents.to(device, dtype) * st.scheduler.init_noise_sigma

    original_size, target_size = original_size or (height, width), target_size or (height, width)
    ids = tuple(original_size) + tuple(crops_coords_top_left) + tuple(target_size)
    neg = ids
    if negative_original_size is not None and negative_target_size is not None:  # = __call__: both or nothing
        neg = tuple(negative_original_size) + tuple(negative_crops_coords_top_left) + tuple(negative_target_size)
    ids, neg = _time_ids(model, ids, neg, st.pooled_dim, dtype)
    # = __call__: cat([neg, pos]) THEN repeat per image, so the rows alternate neg/pos (a diffusers quirk)
    time_ids = st.stack(neg, ids).to(device).repeat(batch, 1)
    run = st.run(a, latents, time_ids)
    if ctl is not None:
        _attach_controls(run, ctl, st, a)
    if adp is not None:
        _attach_adapters(model, run, adp, st, a)
    return _finish(model, run, a)


def _refine_ids(model, a, height, width, pooled_dim, dtype, batch, st):
    """img2img / inpaint _get_add_time_ids: aesthetic score for refiners, target size otherwise."""
    original = tuple(a["original_size"] or (height, width))
    target = tuple(a["target_size"] or (height, width))
    neg_original = tuple(a["negative_original_size"] or original)
    neg_target = tuple(a["negative_target_size"] or target)
    crops, neg_crops = tuple(a["crops_coords_top_left"]), tuple(a["negative_crops_coords_top_left"])
    if model.requires_aesthetics_score:
        ids = original + crops + (a["aesthetic_score"],)
        neg = neg_original + neg_crops + (a["negative_aesthetic_score"],)
    else:
        # = img2img _get_add_time_ids: the negative uses the POSITIVE crop coordinates here (a diffusers quirk)
        ids, neg = original + crops + target, neg_original + crops + neg_target
    ids, neg = _time_ids(model, ids, neg, pooled_dim, dtype)
    return st.stack(neg.repeat(batch, 1), ids.repeat(batch, 1)).to(_device(model))


@_per_call
def img2img(
    model,
    prompt=None,
    prompt_2=None,
    image=None,
    strength=None,
    num_inference_steps=50,
    timesteps=None,
    sigmas=None,
    denoising_start=None,
    denoising_end=None,
    guidance_scale=5.0,
    negative_prompt=None,
    negative_prompt_2=None,
    num_images_per_prompt=1,
    eta=0.0,
    generator=None,
    latents=None,
    prompt_embeds=None,
    negative_prompt_embeds=None,
    pooled_prompt_embeds=None,
    negative_pooled_prompt_embeds=None,
    ip_adapter_image=None,
    ip_adapter_image_embeds=None,
    output_type="pil",
    guidance_rescale=0.0,
    original_size=None,
    crops_coords_top_left=(0, 0),
    target_size=None,
    negative_original_size=None,
    negative_crops_coords_top_left=(0, 0),
    negative_target_size=None,
    aesthetic_score=6.0,
    negative_aesthetic_score=2.5,
    clip_skip=None,
    callback_on_step_end=None,
    callback_on_step_end_tensor_inputs=("latents",),
    control_image=None,
    height=None,
    width=None,
    controlnet=None,
    controlnet_conditioning_scale=0.8,
    guess_mode=False,
    control_guidance_start=0.0,
    control_guidance_end=1.0,
    control_mode=None,
    pag_scale=0.0,
    pag_adaptive_scale=0.0,
    pag_applied_layers="mid",
    seed=None,
    variation_seed=None,
    variation_strength=0.0,
    seed_resize_from_h=0,
    seed_resize_from_w=0,
    scheduler=None,
    cross_attention_kwargs=None,
    progress=True,
    prompt_weighting=None,
    tiling=False,
    guider=None,
):
    """= StableDiffusionXLImg2ImgPipeline.__call__(...).images. `image` may be 4-channel latents (e.g. a
    base model's output_type="latent" for the refiner with denoising_start). Extras as text2img;
    height, width: resize the image. strength=None: 0.3 (0.8 with a ControlNet, as in diffusers).
    With controlnet= = StableDiffusionXLControlNetImg2ImgPipeline: control_image= (a list, one per
    ControlNet; a Union's with control_mode=) sets the default size, and the image is resized to it."""
    strength = default("img2img", "strength", strength, controlnet)
    a = dict(locals())
    _check_common(model, a, "img2img")
    ctl = _check_controls(model, a, "control_image")
    x = to_tensor(image)  # checks the image type before any heavy work
    if ctl is not None:
        if x.shape[1] == 4:  # latents: the control image goes to their size
            height, width = height or 8 * x.shape[-2], width or 8 * x.shape[-1]
        height, width = _control_pixels(ctl, height, width)
    if x.shape[1] != 4 and (height or width):
        x = to_tensor(image, height, width)
    st = _setup(model, a, strength, denoising_start)
    batch, device, dtype, generator = st.batch, _device(model), st.dtype, st.generator
    if latents is None:  # = prepare_latents (skipped by diffusers when latents are given)
        init = x.to(device, dtype) if x.shape[1] == 4 else encode_image(model, x, generator, dtype)
        init = _spread(init, batch, "images")
        if denoising_start is None:  # a refiner handoff continues the base's noisy latents as they are
            latents = st.scheduler.add_noise(init, _noise(init.shape, generator, device, dtype, a), st.timesteps[:1])
        else:
            latents = init
    else:  # (diffusers starts from them as given; the image then only sets their size)
        want = (batch, 4, *(x.shape[-2:] if x.shape[1] == 4 else (x.shape[-2] // 8, x.shape[-1] // 8)))
        if tuple(latents.shape) != want:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; this image needs {want} (batch, 4, H/8, W/8)")
        latents = latents.to(device, dtype)
    height, width = (s * 8 for s in latents.shape[-2:])
    time_ids = _refine_ids(model, a, height, width, st.pooled_dim, dtype, batch, st)
    run = st.run(a, latents, time_ids)
    if ctl is not None:
        _attach_controls(run, ctl, st, a)
    return _finish(model, run, a)


@_per_call
def inpaint(
    model,
    prompt=None,
    prompt_2=None,
    image=None,
    mask_image=None,
    masked_image_latents=None,
    height=None,
    width=None,
    padding_mask_crop=None,
    strength=0.9999,
    num_inference_steps=50,
    timesteps=None,
    sigmas=None,
    denoising_start=None,
    denoising_end=None,
    guidance_scale=None,
    negative_prompt=None,
    negative_prompt_2=None,
    num_images_per_prompt=1,
    eta=0.0,
    generator=None,
    latents=None,
    prompt_embeds=None,
    negative_prompt_embeds=None,
    pooled_prompt_embeds=None,
    negative_pooled_prompt_embeds=None,
    ip_adapter_image=None,
    ip_adapter_image_embeds=None,
    output_type="pil",
    guidance_rescale=0.0,
    original_size=None,
    crops_coords_top_left=(0, 0),
    target_size=None,
    negative_original_size=None,
    negative_crops_coords_top_left=(0, 0),
    negative_target_size=None,
    aesthetic_score=6.0,
    negative_aesthetic_score=2.5,
    clip_skip=None,
    callback_on_step_end=None,
    callback_on_step_end_tensor_inputs=("latents",),
    control_image=None,
    controlnet=None,
    controlnet_conditioning_scale=1.0,
    guess_mode=False,
    control_guidance_start=0.0,
    control_guidance_end=1.0,
    control_mode=None,
    pag_scale=0.0,
    pag_adaptive_scale=0.0,
    pag_applied_layers="mid",
    seed=None,
    variation_seed=None,
    variation_strength=0.0,
    seed_resize_from_h=0,
    seed_resize_from_w=0,
    scheduler=None,
    cross_attention_kwargs=None,
    progress=True,
    prompt_weighting=None,
    tiling=False,
    guider=None,
):
    """= StableDiffusionXLInpaintPipeline.__call__(...).images. White (>= 0.5) mask pixels are repainted.
    Works with the 9-channel inpainting UNet (mask and masked-image latents as extra UNet inputs) and
    with 4-channel base/refiner UNets (the known region is re-imposed after every step).
    padding_mask_crop=N: inpaint only the box around the mask (N pixels wider, grown to height:width) at
    height x width, and paste the result back into the full image where the mask is white.
    guidance_scale=None: 7.5 (5.0 with a ControlNet, as in diffusers). With controlnet= =
    StableDiffusionXLControlNetInpaintPipeline: control_image= (a list, one per ControlNet; a Union's with
    control_mode=), resized
    (and cropped) as the image; the default size is then the image's own, not the model's."""
    guidance_scale = default("inpaint", "guidance_scale", guidance_scale, controlnet)
    a = dict(locals())
    _check_common(model, a, "inpaint")
    ctl = _check_controls(model, a, "control_image")
    if mask_image is None:
        raise ValueError("inpaint needs mask_image= (white = repaint, black = keep), the size of the image")
    _check_mask_matches(image, mask_image)
    sample = model.unet.config.sample_size * 8  # = inpaint __call__: the image is resized to height x width
    if ctl is not None:  # = the ControlNet inpaint pipeline: the image's own size
        own = _own_size(image)
        height, width = height or own[0], width or own[1]
    height, width = height or sample, width or sample
    crop = _crop_box(a, height, width)
    init_image = to_tensor(image, height, width, crop=crop).float()
    mask_px = to_tensor(mask_image, height, width, mask=True, crop=crop)
    if mask_px.shape[0] not in (1, init_image.shape[0]):
        raise ValueError(f"{mask_px.shape[0]} masks for {init_image.shape[0]} images: pass one mask, or one per image")
    if masked_image_latents is not None and not (
        isinstance(masked_image_latents, torch.Tensor)
        and masked_image_latents.ndim == 4
        and tuple(masked_image_latents.shape[1:]) == (4, height // 8, width // 8)
    ):
        got = tuple(masked_image_latents.shape) if isinstance(masked_image_latents, torch.Tensor) else "not a tensor"
        raise ValueError(f"masked_image_latents must be [batch, 4, {height // 8}, {width // 8}] latents, got {got}")
    if ctl is not None:
        _control_pixels(ctl, height, width, crop)
    if not (mask_px > 0.5).any():
        warnings.warn("mask_image has no white pixels: nothing will be repainted", stacklevel=3)  # (over call())
    nine = model.unet.config.in_channels == 9
    if nine and init_image.shape[1] == 4 and masked_image_latents is None:
        raise ValueError("the 9-channel inpainting UNet needs a pixel image (or masked_image_latents=), not latents")
    st = _setup(model, a, strength, denoising_start)
    batch, device, dtype, generator, sched = st.batch, _device(model), st.dtype, st.generator, st.scheduler
    shape = (batch, 4, height // 8, width // 8)
    strength_max = strength == 1.0
    for what, x in (("images", init_image), ("masks", mask_px), ("masked_image_latents", masked_image_latents)):
        if x is not None and (batch % x.shape[0] or x.shape[0] > batch):
            raise ValueError(f"cannot spread {x.shape[0]} {what} over {batch} images; pass 1 or {batch}")

    # = prepare_latents: the image latents (a VAE draw) come before the noise draw
    image_latents = None
    if init_image.shape[1] == 4:
        image_latents = init_image.to(device, dtype)
    elif not nine or (latents is None and not strength_max):
        image_latents = encode_image(model, init_image, generator, dtype)
    if image_latents is not None:
        image_latents = image_latents.repeat(batch // image_latents.shape[0], 1, 1, 1)
    if latents is not None and tuple(latents.shape) != shape:
        raise ValueError(f"latents have shape {tuple(latents.shape)}; this call needs {shape}")
    if latents is None and denoising_start is None:
        noise = _noise(shape, generator, device, dtype, a)
        latents = (
            noise * sched.init_noise_sigma if strength_max else sched.add_noise(image_latents, noise, st.timesteps[:1])
        )
    elif denoising_start is None:
        noise = latents.to(device, dtype)
        latents = noise * sched.init_noise_sigma
    else:
        noise = _noise(shape, generator, device, dtype, a)
        latents = image_latents.to(device)

    # = prepare_mask_latents: mask to the latent grid; masked image encoded (another VAE draw)
    mask = resize_like_latents(mask_px, shape[-2:]).to(device, dtype)
    mask = mask.repeat(batch // mask.shape[0], 1, 1, 1) if mask.shape[0] < batch else mask
    if masked_image_latents is None and init_image.shape[1] == 3:
        masked_image_latents = encode_image(model, init_image * (mask_px < 0.5), generator, dtype)
    if masked_image_latents is not None:
        masked_image_latents = masked_image_latents.to(device, dtype)
        masked_image_latents = masked_image_latents.repeat(batch // masked_image_latents.shape[0], 1, 1, 1)

    height, width = (s * 8 for s in latents.shape[-2:])
    time_ids = _refine_ids(model, a, height, width, st.pooled_dim, dtype, batch, st)
    run = st.run(a, latents, time_ids)
    if ctl is not None:
        _attach_controls(run, ctl, st, a)
    if nine:
        run.mask = st.stack(mask, mask)
        run.masked_image_latents = st.stack(masked_image_latents, masked_image_latents)
    else:
        run.blend = (image_latents, noise, mask)
    images = _finish(model, run, a)
    return images if crop is None else [paste_inpainted(mask_image, image, i, crop) for i in images]


def _old_callback(callback, steps, n, order):
    """diffusers' older callback(step_idx, t, latents) every `steps` steps as a callback_on_step_end (= the pix2pix
    pipeline's loop: at the last of the n UNet calls and where a step of the scheduler's order completes)."""

    def call(model, i, t, tensors):
        if (i == n - 1 or (i + 1) % order == 0) and i % steps == 0:
            callback(i // order, t, tensors["latents"])
        return {}

    return call


# what instruct_pix2pix does not take (the diffusers pipeline neither): their neutral values for the shared checks
_PIX2PIX_ABSENT = dict(
    timesteps=None,
    sigmas=None,
    clip_skip=None,
    ip_adapter_image=None,
    ip_adapter_image_embeds=None,
    pag_scale=0.0,
    pag_adaptive_scale=0.0,
    pag_applied_layers="mid",
)


@_per_call
def instruct_pix2pix(
    model,
    prompt=None,
    prompt_2=None,
    image=None,
    height=None,
    width=None,
    num_inference_steps=100,
    denoising_end=None,
    guidance_scale=5.0,
    image_guidance_scale=1.5,
    negative_prompt=None,
    negative_prompt_2=None,
    num_images_per_prompt=1,
    eta=0.0,
    generator=None,
    latents=None,
    prompt_embeds=None,
    negative_prompt_embeds=None,
    pooled_prompt_embeds=None,
    negative_pooled_prompt_embeds=None,
    output_type="pil",
    guidance_rescale=0.0,
    original_size=None,
    crops_coords_top_left=(0, 0),
    target_size=None,
    callback=None,
    callback_steps=1,
    callback_on_step_end=None,
    callback_on_step_end_tensor_inputs=("latents",),
    seed=None,
    variation_seed=None,
    variation_strength=0.0,
    seed_resize_from_h=0,
    seed_resize_from_w=0,
    scheduler=None,
    cross_attention_kwargs=None,
    progress=True,
    prompt_weighting=None,
    tiling=False,
):
    """Edit `image` as the prompt instructs (an 8-channel InstructPix2Pix UNet, e.g.
    diffusers/sdxl-instructpix2pix-768, CosXL Edit with model.is_cosxl_edit = True) = StableDiffusionXL-
    InstructPix2PixPipeline.__call__(...).images: the image resized to height x width (default the model's
    1024), encoded to the posterior's mean and given to the UNet beside the noisy latents; CFG over [no prompt
    and no image, image only, prompt and image]: uncond + guidance_scale * (text - image) +
    image_guidance_scale * (image - uncond), on when guidance_scale > 1 and image_guidance_scale >= 1.
    Its pipeline's callback(step, t, latents) every callback_steps steps; extras as text2img (seed=,
    scheduler=, progress=, callback_on_step_end)."""
    a = {**_PIX2PIX_ABSENT, **locals()}
    _check_common(model, a, "instruct_pix2pix")
    if callback is not None:
        if callback_on_step_end is not None:
            raise ValueError("pass callback= or callback_on_step_end=, not both")
        if not isinstance(callback_steps, int) or isinstance(callback_steps, bool) or callback_steps < 1:
            raise ValueError(f"callback_steps has to be a positive integer, got {callback_steps!r}")
    _number("image_guidance_scale", image_guidance_scale)
    x = to_tensor(image)  # checks the image type before any heavy work
    sample = model.unet.config.sample_size * 8
    height, width = height or sample, width or sample  # = __call__: not the image's size
    cfg = guidance_scale > 1.0 and image_guidance_scale >= 1.0
    st = _setup(model, a, cfg=cfg)
    if callback is not None:
        a["callback_on_step_end"] = _old_callback(callback, callback_steps, len(st.timesteps), st.scheduler.order)
    batch, device, dtype = st.batch, _device(model), st.dtype
    # = prepare_image_latents: the mean (no draw), unscaled but for CosXL Edit; latents as they are
    if x.shape[1] == 4:
        image_latents = x.to(device, dtype)
    else:
        image_latents = encode_image(model, to_tensor(image, height, width), None, dtype, argmax=True)
        image_latents = image_latents * model.vae.scaling_factor if model.is_cosxl_edit else image_latents
    # (diffusers casts them to the VAE's dtype, the prompt's there: minsdxl keeps an upcast VAE in fp32)
    image_latents = _spread(image_latents.to(dtype), batch, "images")
    shape = (batch, 4, *image_latents.shape[-2:])
    if latents is None:
        latents = _noise(shape, st.generator, device, dtype, a)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents have shape {tuple(latents.shape)}; this call needs {shape} (batch, 4, H/8, W/8)")
    latents = latents.to(device, dtype) * st.scheduler.init_noise_sigma

    ids = tuple(original_size or (height, width)) + tuple(crops_coords_top_left) + tuple(target_size or (height, width))
    ids, _ = _time_ids(model, ids, ids, st.pooled_dim, dtype)
    run = st.run(a, latents, ids.to(device).repeat(batch * (3 if cfg else 1), 1))
    run.image_guidance_scale = image_guidance_scale
    if cfg:  # [no prompt, no image], [no prompt, image], [prompt, image]
        rows = lambda e: (torch.cat([e[1], e[1], e[0]]), torch.cat([e[3], e[3], e[2]]))  # noqa: E731
        run.prompt_embeds, run.text_embeds = rows(st.embeds)
        if st.schedule:  # (A1111's prompt editing: each stretch's embeddings in these rows too)
            run.prompt_schedule = [(end, *rows(e)) for end, e in st.schedule]
        image_latents = torch.cat([torch.zeros_like(image_latents), image_latents, image_latents])
    run.image_latents = image_latents.to(device)
    return _finish(model, run, a)


def _crop_box(a, height, width):
    """padding_mask_crop's box in the image (= check_inputs' rules, then mask_processor.get_crop_region)."""
    pad = a["padding_mask_crop"]
    if pad is None:
        return None
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
        raise ValueError(f"padding_mask_crop must be a whole number of pixels >= 0, got {pad!r}")
    for name in ("image", "mask_image"):
        if not isinstance(a[name], PIL.Image.Image):
            raise ValueError(
                f"padding_mask_crop needs {name} as one PIL image (the result is pasted back into it), got "
                f"{type(a[name]).__name__}"
            )
    if a["output_type"] != "pil":
        raise ValueError(
            f"padding_mask_crop pastes into the PIL image: use output_type='pil', not {a['output_type']!r}"
        )
    return mask_crop_region(a["mask_image"], width, height, pad)


def _hw(x):
    """(height, width) of a PIL image, numpy array or tensor (of the first of a list); None if unknown."""
    x = x[0] if isinstance(x, (list, tuple)) and x else x
    if isinstance(x, PIL.Image.Image):
        return tuple(x.size[::-1])  # (W, H) -> (H, W)
    if hasattr(x, "shape"):
        if isinstance(x, torch.Tensor):
            return tuple(x.shape[-2:])
        return tuple(x.shape[:2]) if x.ndim in (2, 3) else tuple(x.shape[1:3])
    return None


def _check_mask_matches(image, mask_image):
    a, b = _hw(image), _hw(mask_image)
    is_latents = isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == 4
    if a and b and a != b and not is_latents:
        raise ValueError(f"image is {a[1]}x{a[0]} but mask_image is {b[1]}x{b[0]}; they must be the same size")
