"""DeepCache (Ma, Fang, Wang, arXiv:2312.00858): the UNet's deep features change slowly from step to step, so
every `cache_interval`-th step runs the whole UNet and keeps the features entering the shallow branch, and the
steps between run that branch alone (conv_in, the first down resnets, the last up resnets, conv_out) on them.

= the DeepCache package's DeepCacheSDHelper (set_params(cache_interval, cache_branch_id), its uniform
skip mode) on diffusers' UNet, judged against it in tests/test_deepcache.py. Its branch id b names the
branch by (b // 3, b % 3): the down level and the resnets of it that still run (the up path runs the mirror
image); 0 is the shallowest, and the fastest. The full steps are the call's 0th, cache_interval-th, ...
UNet call (the package counts scheduler timesteps by value, which repeat for Heun's and DPM2's second
evaluations; here each UNet call of the loop is one step). A step whose batch differs from the cached one
(a step callback ended CFG, a guider dropped its extra chunk) runs in full.

    minsdxl.deepcache.enable(model, cache_interval=3, cache_branch_id=0)
    minsdxl.deepcache.disable(model)
"""

from dataclasses import dataclass

import torch

from .unet import unet_of


@dataclass
class DeepCache:
    """The UNet's DeepCache settings and, during a call, its cache (set by the sampler, read by the UNet)."""

    cache_interval: int
    cache_branch_id: int
    branch: tuple  # ((down level, resnets run there), (up level, first resnet run there)) in forward order
    fresh: bool = True  # this step runs the whole UNet
    features: torch.Tensor | None = None  # what entered the shallow branch at the last full step

    def reuse(self, x: torch.Tensor) -> bool:
        """Whether this step runs the shallow branch alone (a cache of this batch's rows exists)."""
        f = self.features
        return not self.fresh and f is not None and f.shape[0] == x.shape[0] and f.device == x.device

    def keep(self) -> None:
        """After a full step under CUDA graphs: the features copied out of the graph's output buffer."""
        if self.fresh and self.features is not None:
            self.features = self.features.clone()

    def start(self, step: int) -> None:
        """The sampler, before each UNet call of its loop: step 0 of a call drops the last call's cache."""
        if step == 0:
            self.features = None
        self.fresh = step % self.cache_interval == 0


def enable(model, cache_interval: int = 3, cache_branch_id: int = 0):
    """Cache the model's UNet's deep features: a full UNet every cache_interval steps, the shallow branch
    cache_branch_id (0 .. 3 x levels - 1; DeepCache's ids) in between. Returns the model."""
    unet = unet_of(model, "DeepCache")
    if isinstance(cache_interval, bool) or not isinstance(cache_interval, int) or cache_interval < 1:
        raise ValueError(
            f"cache_interval must be a whole number >= 1 (1: no step reuses the cache), got {cache_interval!r}"
        )
    levels = len(unet.down_blocks)
    down_level, layer = divmod(cache_branch_id, 3) if isinstance(cache_branch_id, int) else (-1, 0)
    up_resnets = len(unet.up_blocks[levels - 1 - down_level].resnets) if 0 <= down_level < levels else 0
    if isinstance(cache_branch_id, bool) or not 0 <= down_level < levels or layer >= up_resnets:
        raise ValueError(
            f"cache_branch_id must be in 0..{3 * levels - 1} for this UNet's {levels} levels (0: the shallowest "
            f"branch, fastest), got {cache_branch_id!r}"
        )
    # (the package's is_skip_step: down level i runs its resnets j < layer there; up level i, counted from the
    # output, its resnets counted from the output <= layer)
    branch = ((down_level, layer), (levels - 1 - down_level, up_resnets - 1 - layer))
    unet.deepcache = DeepCache(cache_interval, cache_branch_id, branch)
    return model


def disable(model):
    """Back to the whole UNet every step. Returns the model."""
    unet_of(model, "DeepCache").deepcache = None
    return model
