"""Random draws in diffusers' order and place: diffusers.utils.torch_utils.randn_tensor, and the
Brownian motion torchsde gives diffusers' DPMSolverSDEScheduler (BrownianInterval, without torchsde).

The same seed reproduces diffusers' image only if noise is drawn on the generator's device, in the
target dtype, one tensor per generator when a list is given, and then moved.
"""

import math

import numpy as np
import torch


def randn(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """= diffusers randn_tensor: draw on the generator's device, then move to `device`."""
    device = torch.device(device or "cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        else:
            if len(generator) != shape[0]:
                raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per image")
            shape1 = (1,) + tuple(shape[1:])
            return torch.cat([randn(shape1, g, device, dtype) for g in generator], dim=0)
    rand_device = generator.device if generator is not None else device
    if rand_device.type != device.type and rand_device.type != "cpu":
        raise ValueError(f"cannot draw on a {rand_device.type} generator for a {device.type} tensor")
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's variation seeds (= modules/processing.py slerp, on one image's noise [C, H, W]): `low`, the seed's
    noise, turned toward `high`, the variation seed's, by the fraction val of the angle between them. The norms
    and dot products run along dim 1 (per channel and column) as A1111 takes them, and its near-parallel
    fallback is kept as written there (low·val + high·(1 - val))."""
    dot = (low / low.norm(dim=1, keepdim=True) * (high / high.norm(dim=1, keepdim=True))).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


class BrownianInterval:
    """A Brownian motion on [t0, t1] (one per element of a `size` tensor), queried by increments W(ta, tb):
    bit for bit torchsde.BrownianInterval(t0, t1, size, dtype, device, entropy, tol=1e-6, pool_size=24,
    halfway_tree=True), as diffusers' BrownianTreeNoiseSampler makes it; no Lévy area (diffusers asks none).

    The motion lives on a binary tree of intervals. The root holds W(t0, t1) = sqrt(t1 - t0)·N(0, 1); an
    interval of length h split at m gives its left half the Brownian bridge's W(start, m) ~ N((m - start)/h·W,
    (m - start)(end - m)/h), its right half the rest W - W_left. W(ta, tb) is the sum, left to right, of
    the tree intervals that tile [ta, tb]. Each split draws its normal from a generator of its own, seeded
    by numpy SeedSequence(entropy, spawn_key=(key, depth)), key being the path from the root in binary, so
    an interval's W is always recomputed the same from its ancestors (no cache is needed for the values).

    Why the tree must be torchsde's exactly: the numbers a query returns are those of the tree intervals it
    is cut into. With halfway_tree every interval splits at its midpoint rounded to tol's 6 decimals (query
    times are rounded so too), down to where the query times fall on split points, so the tree and every
    value in it depend on the entropy alone, never on which queries came before. Splitting at the query
    times (torchsde's default), rounding otherwise or summing in another order would give an equally good
    Brownian motion, but other numbers than diffusers' and another image for the same seed.
    """

    def __init__(self, t0, t1, size, dtype, device, entropy: int, tol=1e-6, pool_size=24):
        self.size, self.dtype, self.device = tuple(size), dtype, torch.device(device)
        self.entropy, self.pool_size, self.digits = entropy, pool_size, -int(math.log10(tol))
        t0, t1 = float(t0), float(t1)
        self.root = (self._round(t0), self._round(t1), 0, 0)  # an interval: (start, end, key, depth)
        # = BrownianInterval.__init__: the root's seed from a SeedSequence without spawn key, the unrounded span
        self._w = {self.root: self._randn(self._seed()) * math.sqrt(t1 - t0)}  # W of the last query's intervals

    def _round(self, t):
        return round(t, self.digits)

    def _seed(self, *spawn_key) -> int:
        seq = np.random.SeedSequence(entropy=self.entropy, spawn_key=spawn_key, pool_size=self.pool_size)
        return int(seq.generate_state(1)[0])  # torchsde's W seed: the first word (the others seed H and A)

    def _randn(self, seed):
        generator = torch.Generator(self.device).manual_seed(seed)
        return torch.randn(self.size, dtype=self.dtype, device=self.device, generator=generator)

    def __call__(self, ta, tb) -> torch.Tensor:
        start, end = self.root[:2]
        ta, tb = (min(max(float(t), start), end) for t in (ta, tb))  # torchsde clamps to [t0, t1] too (and warns)
        if ta > tb:
            raise ValueError(f"Brownian increment W(ta, tb) needs ta <= tb, got ta={ta}, tb={tb}")
        ta, tb = self._round(ta), self._round(tb)
        if ta == tb:  # torchsde: zeros, or a RecursionError where only the rounding made them equal
            return torch.zeros(self.size, dtype=self.dtype, device=self.device)
        kept, self._w = self._w, {self.root: self._w[self.root]}
        parts = self._tile(self.root, ta, tb, kept)
        return sum(parts[1:], parts[0])

    def _tile(self, node, ta, tb, kept):
        """The W of the tree intervals that tile [ta, tb] inside `node`, left to right (= _Interval._loc)."""
        start, end, key, depth = node
        if (ta, tb) == (start, end):
            return [self._w[node]]
        mid = self._round(0.5 * (end + start))
        parts = []
        if ta < mid:
            parts += self._tile(self._half(node, mid, 0, kept), ta, min(tb, mid), kept)
        if tb > mid:
            parts += self._tile(self._half(node, mid, 1, kept), max(ta, mid), tb, kept)
        return parts

    def _half(self, node, mid, right, kept):
        """`node`'s left (right=0) or right half, its W from the Brownian bridge (= _Interval._increment_and_
        space_time_levy_area without H, term for term) or, when the last query had it, from `kept`."""
        start, end, key, depth = node
        half = (mid, end, 2 * key + 1, depth + 1) if right else (start, mid, 2 * key, depth + 1)
        w = kept.get(half)
        if w is None:
            parent, h_reciprocal, left_diff, right_diff = self._w[node], 1 / (end - start), mid - start, end - mid
            mean, var = left_diff * parent * h_reciprocal, left_diff * right_diff * h_reciprocal
            left = mean + math.sqrt(var) * self._randn(self._seed(key, depth))
            w = parent - left if right else left
        self._w[half] = w
        return half
