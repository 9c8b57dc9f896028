"""Guidance rules other than plain CFG: diffusers' guiders (diffusers/guiders/*.py, used by its Modular
pipelines), with diffusers' class names, arguments and defaults, for `guider=` on text2img, img2img and
inpaint. Each combines the conditional and unconditional noise predictions of one step.

One difference: `guidance_scale=None` (the default here; diffusers' is 7.5) takes the call's guidance_scale,
so one kwargs dict still sets it. The call's guidance_rescale goes to the guider's `guidance_rescale` instead.

Some guiders also need a worse prediction: the positive rows again with some transformer blocks perturbed
(SkipLayerGuidance, PerturbedAttentionGuidance, SmoothedEnergyGuidance: the batch gains a chunk), or the
negative rows perturbed (AutoGuidance). Their layers are named as diffusers' LayerSkipConfig /
SmoothedEnergyGuidanceConfig name them: a ModuleList of transformer blocks (`fqn`, e.g.
"mid_block.attentions.0.transformer_blocks": a UNet has no "auto") and indices in it. diffusers runs the
perturbed batch as its own UNet call with hooks; the sampler sets `perturb` on those layers instead
(minsdxl.unet.Perturbation), for the perturbed rows of one batch.
"""

import math
import numbers
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _project(v0, v1, dims, upcast: bool = True):
    """= diffusers' project() (APG, FDG): v0's parts along and across v1 over `dims`, computed in fp64 (upcast),
    returned in v0's dtype as (parallel, orthogonal)."""
    a, b = (v0.double(), v1.double()) if upcast else (v0, v1)
    b = F.normalize(b, dim=dims)
    parallel = (a * b).sum(dim=dims, keepdim=True) * b
    return parallel.to(v0.dtype), (a - parallel).to(v0.dtype)


def _steps(start: float, stop: float, steps: int) -> range:
    """A guidance window's steps, [int(start·n), int(stop·n)) (= diffusers' guiders' is_within_range)."""
    return range(int(start * steps), int(stop * steps))


def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale: float):
    """= diffusers rescale_noise_cfg (arXiv:2305.08891 sec. 3.4): match the text branch's std."""
    dims = list(range(1, noise_cfg.ndim))
    rescaled = noise_cfg * (noise_pred_text.std(dim=dims, keepdim=True) / noise_cfg.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


@dataclass(frozen=True)
class ClassifierFreeGuidance:
    """= diffusers.guiders.ClassifierFreeGuidance: uncond + s (cond - uncond); use_original_formulation: the
    paper's cond + s (cond - uncond). Guidance runs in steps [start·n, stop·n), plain cond elsewhere."""

    guidance_scale: float | None = None
    guidance_rescale: float = 0.0
    use_original_formulation: bool = False
    start: float = 0.0
    stop: float = 1.0

    def __post_init__(self):
        """Each setting of the kind its default is (a finite number, a flag; FDG's per-level ones a list of
        numbers too), so a bad one is named here, not deep inside a step."""
        what = type(self).__name__
        for f in fields(self):
            v, default = getattr(self, f.name), f.default
            if isinstance(default, bool) and not isinstance(v, bool):
                raise ValueError(f"{what}: {f.name} is True or False, got {v!r}")
            is_number = isinstance(default, (int, float)) and not isinstance(default, bool)
            if (is_number or f.name == "guidance_scale") and not (v is None and default is None):
                values = v if isinstance(v, (list, tuple)) and isinstance(self, FrequencyDecoupledGuidance) else [v]
                if not values or not all(_real(x) for x in values):
                    raise ValueError(f"{what}: {f.name} must be a finite number, got {v!r}")
        rescale = self.guidance_rescale if isinstance(self.guidance_rescale, (list, tuple)) else [self.guidance_rescale]
        if not all(0.0 <= r <= 1.0 for r in rescale):
            raise ValueError(f"{what}: guidance_rescale must be in [0, 1], got {self.guidance_rescale!r}")

    _config = ""  # the field of the layers' configs, for the guiders that perturb layers

    def with_scale(self, guidance_scale: float, guidance_rescale: float):
        """This guider with the call's values where it leaves them open."""
        if guidance_rescale and self.guidance_rescale and guidance_rescale != self.guidance_rescale:
            raise ValueError("guidance_rescale was given to the call and, otherwise, to the guider: give it once")
        scale = guidance_scale if self.guidance_scale is None else self.guidance_scale
        return replace(self, guidance_scale=scale, guidance_rescale=self.guidance_rescale or guidance_rescale)

    @property
    def active(self) -> bool:
        """Whether it guides at all (diffusers' is_close test): the unconditional prediction is needed."""
        return not math.isclose(self.guidance_scale, 0.0 if self.use_original_formulation else 1.0)

    def in_window(self, step: int, steps: int) -> bool:
        return step in _steps(self.start, self.stop, steps)

    def windows(self) -> list:
        """[(start, stop)] fractions of the steps (one pair per frequency level for FDG)."""
        return [(self.start, self.stop)]

    extra_chunk = False  # whether the batch gains the positive rows again, perturbed (see the module's text)

    def perturbed_steps(self, steps: int) -> range:
        """The steps whose prediction uses the perturbed rows (none for a guider that perturbs no layers)."""
        return range(0)

    def perturbations(self, unet) -> list:
        """[(layer, minsdxl.unet.Perturbation's arguments)] for the layers this guider perturbs."""
        return []

    def __call__(self, cond, uncond, step: int, steps: int, state: dict, perturbed=None) -> torch.Tensor:
        """The step's prediction; `state` lives for one call (a momentum buffer). uncond is None without
        CFG; perturbed is the extra chunk's prediction, for the guiders that have one."""
        if not self.in_window(step, steps):
            pred = cond
        else:
            pred = self.combine(cond, uncond, step, state)
        return rescale_noise_cfg(pred, cond, self.guidance_rescale) if self.guidance_rescale > 0 else pred

    def _base(self, cond, uncond):
        return cond if self.use_original_formulation else uncond

    def combine(self, cond, uncond, step, state):
        return self._base(cond, uncond) + self.guidance_scale * (cond - uncond)


@dataclass(frozen=True)
class AdaptiveProjectedGuidance(ClassifierFreeGuidance):
    """= diffusers.guiders.AdaptiveProjectedGuidance (APG, arXiv:2410.02416): the guidance direction (with
    momentum, its norm capped at `adaptive_projected_guidance_rescale`) split along and across the conditional
    prediction, the parallel part times eta (fp64 projection, as diffusers)."""

    adaptive_projected_guidance_momentum: float | None = None
    adaptive_projected_guidance_rescale: float = 15.0
    adaptive_projected_guidance_norm_dim: int | tuple | None = None
    eta: float = 1.0

    def combine(self, cond, uncond, step, state):
        return self._apg(cond, uncond, state, self.guidance_scale)

    def _momentum(self, diff, state):
        if self.adaptive_projected_guidance_momentum is None:
            return diff
        # = MomentumBuffer.update (reset each call)
        state["average"] = diff + self.adaptive_projected_guidance_momentum * state.get("average", 0)
        return state["average"]

    def _apg(self, cond, uncond, state, scale):
        diff = cond - uncond
        nd = self.adaptive_projected_guidance_norm_dim
        dim = [-i for i in range(1, diff.ndim)] if nd is None else [nd] if isinstance(nd, int) else list(nd)
        if not all(isinstance(d, int) and -diff.ndim <= d < diff.ndim for d in dim):
            raise ValueError(f"adaptive_projected_guidance_norm_dim {nd!r}: dims of the {diff.ndim}-D predictions")
        diff = self._momentum(diff, state)
        if self.adaptive_projected_guidance_rescale > 0:
            norm = diff.norm(p=2, dim=dim, keepdim=True)
            diff = diff * torch.minimum(torch.ones_like(diff), self.adaptive_projected_guidance_rescale / norm)
        parallel, orthogonal = _project(diff, cond, dim)
        return self._base(cond, uncond) + scale * (orthogonal + self.eta * parallel)


@dataclass(frozen=True)
class AdaptiveProjectedMixGuidance(AdaptiveProjectedGuidance):
    """= diffusers.guiders.AdaptiveProjectedMixGuidance (HunyuanImage 2.1's): CFG up to step
    adaptive_projected_guidance_start_step (its momentum kept up), APG at adaptive_projected_guidance_scale after
    it; diffusers' defaults (momentum -0.5, norm threshold 10, eta 0)."""

    adaptive_projected_guidance_momentum: float | None = -0.5
    adaptive_projected_guidance_rescale: float = 10.0
    eta: float = 0.0
    adaptive_projected_guidance_scale: float = 10.0
    adaptive_projected_guidance_start_step: int = 5

    def combine(self, cond, uncond, step, state):
        scale = self.adaptive_projected_guidance_scale
        if step > self.adaptive_projected_guidance_start_step and not math.isclose(
            scale, 0.0 if self.use_original_formulation else 1.0
        ):
            return self._apg(cond, uncond, state, scale)
        self._momentum(cond - uncond, state)  # = update_momentum_buffer
        return self._base(cond, uncond) + self.guidance_scale * (cond - uncond)


@dataclass(frozen=True)
class ClassifierFreeZeroStarGuidance(ClassifierFreeGuidance):
    """= diffusers.guiders.ClassifierFreeZeroStarGuidance (CFG-Zero*, arXiv:2503.18886): the unconditional
    prediction scaled by its optimal projection onto the conditional one; the first `zero_init_steps` steps
    predict zero (before the window test, as in diffusers). Not as diffusers: those zeros are not rescaled
    (diffusers rescales them with guidance_rescale > 0: 0/0, a NaN image)."""

    zero_init_steps: int = 1

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.zero_init_steps, int) or self.zero_init_steps < 0:
            raise ValueError(f"zero_init_steps must be a whole number >= 0, got {self.zero_init_steps!r}")

    def __call__(self, cond, uncond, step, steps, state, perturbed=None):
        if step < self.zero_init_steps:
            return torch.zeros_like(cond)
        return super().__call__(cond, uncond, step, steps, state)

    def combine(self, cond, uncond, step, state):
        c, u = cond.flatten(1).float(), uncond.flatten(1).float()
        alpha = ((c * u).sum(1, keepdim=True) / ((u**2).sum(1, keepdim=True) + 1e-8)).to(cond.dtype)
        uncond = uncond * alpha.view(-1, *(1,) * (cond.ndim - 1))
        return self._base(cond, uncond) + self.guidance_scale * (cond - uncond)


@dataclass(frozen=True)
class TangentialClassifierFreeGuidance(ClassifierFreeGuidance):
    """= diffusers.guiders.TangentialClassifierFreeGuidance (TCFG, arXiv:2503.18137): the unconditional
    prediction keeps only its component along the first right-singular vector of [cond, uncond] (fp32 SVD)."""

    def combine(self, cond, uncond, step, state):
        preds = torch.stack([cond, uncond], dim=1).float().flatten(2)
        vh = torch.linalg.svd(preds, full_matrices=False)[2]
        kept = vh.clone()
        kept[:, 1] = 0
        u = uncond.reshape(len(uncond), 1, -1).float() @ vh.transpose(-2, -1) @ kept
        uncond = u.reshape(uncond.shape).to(cond.dtype)
        return self._base(cond, uncond) + self.guidance_scale * (cond - uncond)


@dataclass(frozen=True)
class MagnitudeAwareGuidance(ClassifierFreeGuidance):
    """= diffusers.guiders.MagnitudeAwareGuidance (MAMBO-G): the scale falls off as exp(-alpha · |cond -
    uncond| / |uncond|) per sample (L2 norms over all but the batch dimension; diffusers' torch.norm call
    takes them as a matrix norm, which fails on 4-D latents: it runs on 3-D predictions only)."""

    alpha: float = 8.0

    def combine(self, cond, uncond, step, state):
        dim = list(range(1, cond.ndim))
        diff = cond - uncond
        norm = torch.linalg.vector_norm
        ratio = norm(diff, dim=dim, keepdim=True) / norm(uncond, dim=dim, keepdim=True)
        fall = torch.exp(-self.alpha * ratio)
        s = self.guidance_scale * fall if self.use_original_formulation else 1.0 + (self.guidance_scale - 1.0) * fall
        return self._base(cond, uncond) + s * diff


def _blur5(x):
    """= kornia's filter2d with its pyramid kernel ([1, 4, 6, 4, 1] / 16, outer product), reflected borders."""
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k = (k[:, None] * k[None, :] / 256.0).to(x)
    return F.conv2d(F.pad(x, [2, 2, 2, 2], mode="reflect"), k.expand(x.shape[1], 1, 5, 5), groups=x.shape[1])


def _pyrup(x):
    """= kornia.geometry.pyrup: bilinear to twice the size, then the blur."""
    return _blur5(F.interpolate(x, size=(2 * x.shape[-2], 2 * x.shape[-1]), mode="bilinear", align_corners=False))


def laplacian_pyramid(x, levels: int) -> list:
    """= kornia.geometry.transform.build_laplacian_pyramid: band-pass levels, then the last Gaussian level.
    Sides as kornia pads them (to the next power of two, reflected, when neither side is one or a side does
    not halve levels - 1 times); FrequencyDecoupledGuidance crops the rebuilt prediction back."""
    h, w = x.shape[-2:]
    pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    stride = 1 << (levels - 1)
    if not (pow2(w) or pow2(h)) or h % stride or w % stride:
        x = F.pad(x, (0, (1 << (w - 1).bit_length()) - w, 0, (1 << (h - 1).bit_length()) - h), mode="reflect")
    if levels > 1 and min(x.shape[-2:]) >> (levels - 2) < 3:  # the blurred levels need 3 pixels a side
        raise ValueError(
            f"FrequencyDecoupledGuidance: {levels} levels halve {tuple(x.shape[-2:])} latents below 3 pixels: "
            "give fewer guidance_scales (or make a larger image)"
        )
    gauss = [x]
    for _ in range(levels - 1):  # = pyrdown: blur, then bilinear to half (floor)
        g = gauss[-1]
        gauss.append(F.interpolate(_blur5(g), size=(g.shape[-2] // 2, g.shape[-1] // 2), mode="bilinear"))
    return [g - _pyrup(n) for g, n in zip(gauss, gauss[1:])] + [gauss[-1]]


@dataclass(frozen=True)
class FrequencyDecoupledGuidance(ClassifierFreeGuidance):
    """= diffusers.guiders.FrequencyDecoupledGuidance (FDG, arXiv:2506.19713): CFG on each level of a
    Laplacian pyramid of the predictions with its own scale (guidance_scales, highest frequency first), window
    and parallel weight (the guidance direction's part along cond), rebuilt; rescaled after ("data") or per
    level ("freq"). Its scales are its own: the call's guidance_scale does not set them. Not as diffusers: a
    level outside its window keeps cond's band (diffusers appends a stale variable: an error or another
    level's band), and sizes kornia pads come back cropped (diffusers returns the padded size and fails)."""

    guidance_scales: tuple = (10.0, 5.0)
    guidance_rescale: float | tuple = 0.0
    parallel_weights: float | tuple | None = None
    start: float | tuple = 0.0
    stop: float | tuple = 1.0
    guidance_rescale_space: str = "data"
    upcast_to_double: bool = True

    def __post_init__(self):
        scales, weights = self.guidance_scales, self.parallel_weights
        weights = [1.0] if weights is None else weights if isinstance(weights, (list, tuple)) else [weights]
        for name, v in (("guidance_scales", scales), ("parallel_weights", weights)):
            if not isinstance(v, (list, tuple)) or not v or not all(_real(x) for x in v):
                raise ValueError(f"FrequencyDecoupledGuidance: {name} is a number per level, got {v!r}")
        super().__post_init__()
        n = len(self.guidance_scales)
        for name in ("guidance_rescale", "parallel_weights", "start", "stop"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple)) and len(v) != n:
                raise ValueError(f"FrequencyDecoupledGuidance: {name} has {len(v)} values for {n} guidance_scales")
        if self.guidance_rescale_space not in ("data", "freq"):
            raise ValueError(
                f"FrequencyDecoupledGuidance: guidance_rescale_space is 'data' or 'freq', not "
                f"{self.guidance_rescale_space!r}"
            )

    def _per_level(self, name, default=None):
        v = getattr(self, name)
        v = default if v is None else v
        return list(v) if isinstance(v, (list, tuple)) else [v] * len(self.guidance_scales)

    def with_scale(self, guidance_scale, guidance_rescale):
        return replace(self, guidance_scale=guidance_scale, guidance_rescale=self.guidance_rescale or guidance_rescale)

    @property
    def active(self):
        off = 0.0 if self.use_original_formulation else 1.0
        return not all(math.isclose(s, off) for s in self.guidance_scales)

    def _level_on(self, level, step, steps):
        start, stop = self._per_level("start")[level], self._per_level("stop")[level]
        off = 0.0 if self.use_original_formulation else 1.0
        return step in _steps(start, stop, steps) and not math.isclose(self.guidance_scales[level], off)

    def in_window(self, step, steps):
        return step in _steps(min(self._per_level("start")), max(self._per_level("stop")), steps)

    def windows(self):
        return list(zip(self._per_level("start"), self._per_level("stop")))

    def __call__(self, cond, uncond, step, steps, state, perturbed=None):
        if uncond is None or not self.in_window(step, steps):
            return cond
        levels = len(self.guidance_scales)
        conds, unconds = laplacian_pyramid(cond, levels), laplacian_pyramid(uncond, levels)
        rescale, weights = self._per_level("guidance_rescale"), self._per_level("parallel_weights", 1.0)
        guided = []
        for level, (c, u, scale, w, r) in enumerate(zip(conds, unconds, self.guidance_scales, weights, rescale)):
            if not self._level_on(level, step, steps):
                guided.append(c)
                continue
            shift = c - u
            if not math.isclose(w, 1.0):  # the shift's part along c, weighted
                par, orth = _project(shift, c, list(range(1, shift.ndim)), self.upcast_to_double)
                shift = w * par + orth
            pred = (c if self.use_original_formulation else u) + scale * shift
            if self.guidance_rescale_space == "freq" and r > 0.0:
                pred = rescale_noise_cfg(pred, c, r)
            guided.append(pred)
        pred = guided[-1]
        for band in reversed(guided[:-1]):  # = build_image_from_pyramid
            pred = _pyrup(pred) + band
        pred = pred[..., : cond.shape[-2], : cond.shape[-1]]
        if self.guidance_rescale_space == "data" and rescale[0] > 0.0:
            pred = rescale_noise_cfg(pred, cond, rescale[0])
        return pred


@dataclass(frozen=True)
class LayerSkipConfig:
    """= diffusers.hooks.LayerSkipConfig: which blocks of the ModuleList `fqn` to perturb, and how. Attention
    and feed-forward both: the block's output is its input; attention alone: self-attention's output is its
    input; skip_attention_scores: self-attention's output is v (PAG); skip_ff: the feed-forward's output is its
    input. dropout < 1: the skipped layers run and their output is dropped out with that p instead (random)."""

    indices: list | int
    fqn: str = "auto"
    skip_attention: bool = True
    skip_attention_scores: bool = False
    skip_ff: bool = True
    dropout: float = 1.0

    def __post_init__(self):
        if not 0 <= self.dropout <= 1:
            raise ValueError(f"LayerSkipConfig: dropout must be in [0, 1], got {self.dropout}")
        if self.skip_attention_scores and (self.skip_attention or not math.isclose(self.dropout, 1.0)):
            raise ValueError(
                "LayerSkipConfig: skip_attention_scores replaces attention by v: give it with skip_attention=False "
                "and dropout=1.0"
            )

    def perturbations(self, unet, what: str) -> list:
        out = []
        for block in _blocks(unet, self.fqn, self.indices, what):
            if self.skip_attention and self.skip_ff:  # = _apply_layer_skip_hook's choice of hooks
                out.append((block, dict(kind="skip", dropout=self.dropout)))
            elif self.skip_attention or self.skip_attention_scores:
                kind = "identity" if self.skip_attention_scores else "skip"
                out.append((block.attn1, dict(kind=kind, dropout=self.dropout)))
            if self.skip_ff:
                out.append((block.ff, dict(kind="skip", dropout=self.dropout)))
        return out


@dataclass(frozen=True)
class SmoothedEnergyGuidanceConfig:
    """= diffusers.hooks.SmoothedEnergyGuidanceConfig: the blocks of the ModuleList `fqn` whose self-attention
    queries are blurred (to_q: the one query projection SDXL's attention has)."""

    indices: list | int
    fqn: str = "auto"
    _query_proj_identifiers: list | None = None

    def perturbations(self, unet, what: str, sigma: float, sigma_inf: float) -> list:
        if self._query_proj_identifiers not in (None, ["to_q"], ("to_q",)):
            raise ValueError(f"{what}: SDXL's attention projects its queries with to_q alone")
        blocks = _blocks(unet, self.fqn, self.indices, what)
        return [(b.attn1, dict(kind="smooth", sigma=sigma, sigma_inf=sigma_inf)) for b in blocks]


def _blocks(unet, fqn: str, indices, what: str) -> list:
    """The blocks `indices` of the UNet's ModuleList `fqn` (= diffusers' _get_submodule_from_fqn)."""
    names = [n for n, m in unet.named_modules() if n.endswith("transformer_blocks")]
    if fqn == "auto":  # = diffusers, whose "auto" finds a DiT's top-level stack and fails on a UNet
        raise ValueError(
            f"{what}: fqn='auto' finds a transformer's block list; a UNet has one per attention: name it, e.g. "
            f"fqn={names[-1]!r} (the UNet's: {', '.join(names)})"
        )
    blocks = unet.get_submodule(fqn) if fqn in names else None
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{what}: the UNet has no transformer blocks {fqn!r}; its block lists: {', '.join(names)}")
    indices = [indices] if isinstance(indices, int) else list(indices)
    found = [b for i, b in enumerate(blocks) if i in indices]
    if not found:
        raise ValueError(f"{what}: {fqn} has blocks 0..{len(blocks) - 1}, none of {indices}")
    return found


def _configs(layers, config, cls, what: str, **kw) -> list:
    """A guider's `*_layers` (each index a config of fqn 'auto', = diffusers) or its `*_config`: a config, a
    dict of one, or a list of either -> a list of configs."""
    if layers is not None:
        return [cls([i], fqn="auto", **kw) for i in ([layers] if isinstance(layers, int) else layers)]
    items = config if isinstance(config, (list, tuple)) else [config]
    items = [cls(**c) if isinstance(c, dict) else c for c in items]
    if not items or not all(isinstance(c, cls) for c in items):
        raise ValueError(f"{what} takes a {cls.__name__}, a dict of its arguments, or a list of those")
    return items


@dataclass(frozen=True)
class _LayerGuidance(ClassifierFreeGuidance):
    """CFG plus `<prefix>_scale` times (cond - the perturbed cond) in steps (start·n, stop·n), open at both
    ends (= diffusers' _is_slg_enabled); the subclasses name the fields, as diffusers'."""

    extra_chunk = True
    _prefix = ""

    def _get(self, name):
        return getattr(self, self._config if name == "config" else f"{self._prefix}_{name}")

    def __post_init__(self):
        super().__post_init__()
        what, start, stop = type(self).__name__, self._get("start"), self._get("stop")
        if not (0.0 <= start < 1.0 and start <= stop <= 1.0):
            raise ValueError(f"{what}: {self._prefix}_start / _stop must satisfy 0 <= start < 1 and start <= stop <= 1")
        if (self._get("layers") is None) == (self._get("config") is None):
            raise ValueError(f"{what}: give one of {self._prefix}_layers and {self._config}")

    def _configs(self) -> list:
        return _configs(self._get("layers"), self._get("config"), LayerSkipConfig, type(self).__name__)

    def perturbations(self, unet):
        return [p for c in self._configs() for p in c.perturbations(unet, type(self).__name__)]

    def perturbed_steps(self, steps):
        if math.isclose(self._get("scale"), 0.0):
            return range(0)
        return range(int(self._get("start") * steps) + 1, int(self._get("stop") * steps))

    def __call__(self, cond, uncond, step, steps, state, perturbed=None):
        cfg = uncond is not None and self.in_window(step, steps)
        extra = perturbed is not None and step in self.perturbed_steps(steps)
        s = self._get("scale")
        if not cfg and not extra:
            pred = cond
        elif not cfg:  # = SkipLayerGuidance.forward: its four cases, its order of operations
            pred = (cond if self.use_original_formulation else perturbed) + s * (cond - perturbed)
        elif not extra:
            pred = self._base(cond, uncond) + self.guidance_scale * (cond - uncond)
        else:
            pred = self._base(cond, uncond) + self.guidance_scale * (cond - uncond) + s * (cond - perturbed)
        return rescale_noise_cfg(pred, cond, self.guidance_rescale) if self.guidance_rescale > 0 else pred


@dataclass(frozen=True)
class SkipLayerGuidance(_LayerGuidance):
    """= diffusers.guiders.SkipLayerGuidance (SLG, SD 3.5's; STG): the perturbed prediction skips the blocks of
    skip_layer_config (skip_layer_guidance_layers means fqn 'auto', which, as in diffusers, finds no UNet
    blocks). Not as diffusers: in a step where CFG is off and SLG on, diffusers' perturbed batch takes the
    negative prompt and no perturbation (a plain CFG at the SLG scale); here the positive prompt, perturbed."""

    skip_layer_guidance_scale: float = 2.8
    skip_layer_guidance_start: float = 0.01
    skip_layer_guidance_stop: float = 0.2
    skip_layer_guidance_layers: int | list | None = None
    skip_layer_config: object = None

    _prefix, _config = "skip_layer_guidance", "skip_layer_config"


@dataclass(frozen=True)
class PerturbedAttentionGuidance(_LayerGuidance):
    """= diffusers.guiders.PerturbedAttentionGuidance: its perturbation is PAG's (self-attention's output is v:
    every config made skip_attention_scores alone, as diffusers does). minsdxl's pag_scale= is the PAG
    pipelines' form of the same idea (regex layer names, an adaptive scale)."""

    perturbed_guidance_scale: float = 2.8
    perturbed_guidance_start: float = 0.01
    perturbed_guidance_stop: float = 0.2
    perturbed_guidance_layers: int | list | None = None
    perturbed_guidance_config: object = None

    _prefix, _config = "perturbed_guidance", "perturbed_guidance_config"

    def _configs(self):
        pag = dict(skip_attention=False, skip_attention_scores=True, skip_ff=False, dropout=1.0)
        return [replace(c, **pag) for c in super()._configs()]


@dataclass(frozen=True)
class SmoothedEnergyGuidance(_LayerGuidance):
    """= diffusers.guiders.SmoothedEnergyGuidance (SEG, arXiv:2408.00760): the perturbed prediction's
    self-attention queries blurred with a Gaussian of seg_blur_sigma (above seg_blur_threshold_inf, the
    default: each the mean of all). diffusers' own never perturbs (its prepare_models does not count the
    batches) and swaps the blur's two branches: this is the paper's code (minsdxl.unet.Perturbation.blur),
    judged in the tests by diffusers' guider with those two lines fixed."""

    seg_guidance_scale: float = 2.8
    seg_blur_sigma: float = 9999999.0
    seg_blur_threshold_inf: float = 9999.0
    seg_guidance_start: float = 0.0
    seg_guidance_stop: float = 1.0
    seg_guidance_layers: int | list | None = None
    seg_guidance_config: object = None

    _prefix, _config = "seg_guidance", "seg_guidance_config"

    def __post_init__(self):
        super().__post_init__()
        if self.seg_blur_sigma <= 0:
            raise ValueError(
                f"SmoothedEnergyGuidance: seg_blur_sigma must be > 0 (the blur's width), got {self.seg_blur_sigma}"
            )

    def perturbations(self, unet):
        configs = _configs(self.seg_guidance_layers, self.seg_guidance_config, SmoothedEnergyGuidanceConfig, "SEG")
        s, inf = self.seg_blur_sigma, self.seg_blur_threshold_inf
        return [p for c in configs for p in c.perturbations(unet, "SmoothedEnergyGuidance", s, inf)]


@dataclass(frozen=True)
class AutoGuidance(ClassifierFreeGuidance):
    """= diffusers.guiders.AutoGuidance ("Guiding a diffusion model with a bad version of itself"): CFG whose
    unconditional prediction comes from the model with the configured blocks skipped (auto_guidance_config;
    auto_guidance_layers with `dropout` means fqn 'auto', which finds no UNet blocks, as in diffusers)."""

    auto_guidance_layers: int | list | None = None
    auto_guidance_config: object = None
    dropout: float | None = None

    _config = "auto_guidance_config"

    def __post_init__(self):
        super().__post_init__()
        if (self.auto_guidance_layers is None) == (self.auto_guidance_config is None):
            raise ValueError("AutoGuidance: give one of auto_guidance_layers and auto_guidance_config")
        if self.auto_guidance_config is None and self.dropout is None:
            raise ValueError("AutoGuidance: auto_guidance_layers needs dropout")

    def perturbed_steps(self, steps):
        """= _is_ag_enabled: the CFG window, with a scale that guides."""
        return _steps(self.start, self.stop, steps) if self.active else range(0)

    def perturbations(self, unet):
        kw = {} if self.dropout is None else {"dropout": self.dropout}
        configs = _configs(self.auto_guidance_layers, self.auto_guidance_config, LayerSkipConfig, "AutoGuidance", **kw)
        return [p for c in configs for p in c.perturbations(unet, "AutoGuidance")]


GUIDERS = (
    ClassifierFreeGuidance,
    AdaptiveProjectedGuidance,
    AdaptiveProjectedMixGuidance,
    ClassifierFreeZeroStarGuidance,
    TangentialClassifierFreeGuidance,
    MagnitudeAwareGuidance,
    FrequencyDecoupledGuidance,
    SkipLayerGuidance,
    PerturbedAttentionGuidance,
    SmoothedEnergyGuidance,
    AutoGuidance,
)
