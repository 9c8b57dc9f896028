"""Token Merging for Stable Diffusion (ToMe, arXiv:2303.17604; = the tomesd package's apply_patch, which A1111's
"Token merging ratio" runs): in each transformer block of the highest-resolution levels, the image tokens are
split into destinations (one per sx x sy cell) and sources, the `ratio` of tokens whose source is most similar
to a destination are averaged into it before self-attention, and copied back after. Fewer tokens in
attention: faster at large sizes, at some cost in detail.

SDXL's first level has no attention, so tomesd's default max_downsample=1 changes nothing on it (nor does A1111's
setting, which uses that default): pass max_downsample=2 (the 64 x 64 level of a 1024 px image) or 4.
"""

import math
from dataclasses import dataclass

import torch

from .unet import unet_of


def _nothing(x):
    return x


def bipartite_soft_matching(metric: torch.Tensor, w: int, h: int, sx: int, sy: int, r: int, generator=None):
    """(merge, unmerge) for tokens [B, N = h·w, C] (= tomesd's bipartite_soft_matching_random2d): one destination
    per sy x sy cell (its top left, or a random one with `generator`), cosine similarity of every source to the
    destinations, the r most similar sources averaged into their best destination."""
    b, n, _ = metric.shape
    if r <= 0:
        return _nothing, _nothing
    with torch.no_grad():
        hsy, wsx = h // sy, w // sx
        if generator is None:
            pick = torch.zeros(hsy, wsx, 1, device=metric.device, dtype=torch.int64)
        else:
            pick = torch.randint(sy * sx, (hsy, wsx, 1), device=generator.device, generator=generator)
            pick = pick.to(metric.device)
        # -1 marks each cell's destination, 0 the sources; cells cover the top left when sx, sy do not divide
        cells = torch.zeros(hsy, wsx, sy * sx, device=metric.device, dtype=torch.int64)
        cells.scatter_(2, pick, -torch.ones_like(pick))
        cells = cells.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
        if hsy * sy < h or wsx * sx < w:
            grid = torch.zeros(h, w, device=metric.device, dtype=torch.int64)
            grid[: hsy * sy, : wsx * sx] = cells
            cells = grid
        order = cells.reshape(1, -1, 1).argsort(dim=1)  # destinations first, then sources (a stable order)
        dst_n = hsy * wsx
        src_at, dst_at = order[:, dst_n:], order[:, :dst_n]

        def split(x):
            c = x.shape[-1]
            return x.gather(1, src_at.expand(b, n - dst_n, c)), x.gather(1, dst_at.expand(b, dst_n, c))

        a, d = split(metric / metric.norm(dim=-1, keepdim=True))
        best, best_at = (a @ d.transpose(-1, -2)).max(dim=-1)
        r = min(a.shape[1], r)
        ranked = best.argsort(dim=-1, descending=True)[..., None]
        kept, merged = ranked[:, r:], ranked[:, :r]  # sources left as they are, sources merged
        into = best_at[..., None].gather(-2, merged)

    def merge(x):
        src, dst = split(x)
        c = x.shape[-1]
        keep = src.gather(-2, kept.expand(b, src.shape[1] - r, c))
        dst = dst.scatter_reduce(-2, into.expand(b, r, c), src.gather(-2, merged.expand(b, r, c)), reduce="mean")
        return torch.cat([keep, dst], dim=1)

    def unmerge(x):
        k, c = kept.shape[1], x.shape[-1]
        keep, dst = x[..., :k, :], x[..., k:, :]
        out = torch.zeros(b, n, c, device=x.device, dtype=x.dtype)
        out.scatter_(-2, dst_at.expand(b, dst_n, c), dst)
        out.scatter_(-2, src_at.expand(b, src_at.shape[1], 1).gather(1, kept).expand(b, k, c), keep)
        src = dst.gather(-2, into.expand(b, r, c))  # a merged source gets its destination's result
        out.scatter_(-2, src_at.expand(b, src_at.shape[1], 1).gather(1, merged).expand(b, r, c), src)
        return out

    return merge, unmerge


@dataclass
class ToMe:
    """tomesd's apply_patch arguments, and what a UNet call sets: its latent size and the random generator."""

    ratio: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    size: tuple | None = None  # the UNet input's (h, w), set by its forward
    generator: torch.Generator | None = None

    def functions(self, x: torch.Tensor) -> tuple:
        """(merge, unmerge) for self-attention, cross-attention and the MLP of a block's tokens x [B, N, C]
        (= tomesd's compute_merge)."""
        h0, w0 = self.size
        down = int(math.ceil(math.sqrt(h0 * w0 // x.shape[1])))
        m = u = _nothing
        if down <= self.max_downsample:
            w, h, r = int(math.ceil(w0 / down)), int(math.ceil(h0 / down)), int(x.shape[1] * self.ratio)
            # an odd batch cannot hold a prompt's and its negative's rows alike: tomesd then picks no random cells
            rand = self.use_rand and x.shape[0] % 2 == 0
            m, u = bipartite_soft_matching(x, w, h, self.sx, self.sy, r, self._generator(x.device) if rand else None)
        pick = lambda on: (m, u) if on else (_nothing, _nothing)  # noqa: E731
        (ma, ua), (mc, uc), (mm, um) = pick(self.merge_attn), pick(self.merge_crossattn), pick(self.merge_mlp)
        return ma, mc, mm, ua, uc, um

    def _generator(self, device):
        # = tomesd's init_generator: a fork of the global RNG (torch.manual_seed decides), made on first use
        if self.generator is None or self.generator.device != device:
            state = torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device)
            self.generator = torch.Generator(device=device).set_state(state)
        return self.generator


def _unet(model):
    return unet_of(model, "Token Merging")


def apply_patch(model, ratio: float = 0.5, max_downsample: int = 1, sx: int = 2, sy: int = 2, use_rand: bool = True,
                merge_attn: bool = True, merge_crossattn: bool = False, merge_mlp: bool = False):  # fmt: skip
    """= tomesd.apply_patch(pipe, ...): ToMe on the model's (or this) UNet until remove_patch; the same arguments
    and defaults (on SDXL pass max_downsample >= 2: see the module's note)."""
    for name, v in (("sx", sx), ("sy", sy)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(
                f"{name} must be a whole number >= 1 (the merge cells' side; tomesd's default 2), got {v!r}"
            )
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise ValueError(f"ratio must be a number (the share of tokens merged), got {ratio!r}")
    if not 0 <= ratio < 1 - 1 / (sx * sy) + 1e-9:
        raise ValueError(
            f"ratio must be in [0, {1 - 1 / (sx * sy)}] for sx={sx}, sy={sy} (tomesd's bound), got {ratio}"
        )
    if max_downsample not in (1, 2, 4, 8):
        raise ValueError(f"max_downsample must be 1, 2, 4 or 8 (the levels' downsampling), got {max_downsample}")
    unet = _unet(model)
    unet.tome = ToMe(ratio, max_downsample, sx, sy, use_rand, merge_attn, merge_crossattn, merge_mlp)
    for block in unet.transformer_blocks():
        block.tome = unet.tome
    return model


def remove_patch(model):
    """= tomesd.remove_patch: the UNet as it was."""
    unet = _unet(model)
    unet.tome = None
    for block in unet.transformer_blocks():
        block.tome = None
    return model
