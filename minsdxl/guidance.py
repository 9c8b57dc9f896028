"""Guidance rules other than plain CFG: diffusers' guiders (diffusers/guiders/*.py, used by its Modular
pipelines), with diffusers' class names, arguments and defaults, for `guider=` on text2img, img2img and
inpaint. Each combines the conditional and unconditional noise predictions of one step.

One difference: `guidance_scale=None` (the default here; diffusers' is 7.5) takes the call's guidance_scale,
so one kwargs dict still sets it. The call's guidance_rescale goes to the guider's `guidance_rescale` instead.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


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
        return int(self.start * steps) <= step < int(self.stop * steps)

    def __call__(self, cond, uncond, step: int, steps: int, state: dict) -> torch.Tensor:
        """The step's prediction; `state` lives for one call (a momentum buffer)."""
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
        diff = cond - uncond
        nd = self.adaptive_projected_guidance_norm_dim
        dim = [-i for i in range(1, diff.ndim)] if nd is None else [nd] if isinstance(nd, int) else list(nd)
        if self.adaptive_projected_guidance_momentum is not None:  # = MomentumBuffer, reset each call
            diff = state["average"] = diff + self.adaptive_projected_guidance_momentum * state.get("average", 0)
        if self.adaptive_projected_guidance_rescale > 0:
            norm = diff.norm(p=2, dim=dim, keepdim=True)
            diff = diff * torch.minimum(torch.ones_like(diff), self.adaptive_projected_guidance_rescale / norm)
        v0, v1 = diff.double(), F.normalize(cond.double(), dim=dim)
        parallel = (v0 * v1).sum(dim=dim, keepdim=True) * v1
        orthogonal = (v0 - parallel).to(diff.dtype)
        return self._base(cond, uncond) + self.guidance_scale * (orthogonal + self.eta * parallel.to(diff.dtype))


@dataclass(frozen=True)
class ClassifierFreeZeroStarGuidance(ClassifierFreeGuidance):
    """= diffusers.guiders.ClassifierFreeZeroStarGuidance (CFG-Zero*, arXiv:2503.18886): the unconditional
    prediction scaled by its optimal projection onto the conditional one; the first `zero_init_steps` steps
    predict zero (before the window test, as in diffusers). Not as diffusers: those zeros are not rescaled
    (diffusers rescales them with guidance_rescale > 0: 0/0, a NaN image)."""

    zero_init_steps: int = 1

    def __call__(self, cond, uncond, step, steps, state):
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


GUIDERS = (
    ClassifierFreeGuidance,
    AdaptiveProjectedGuidance,
    ClassifierFreeZeroStarGuidance,
    TangentialClassifierFreeGuidance,
    MagnitudeAwareGuidance,
)
