"""SDXL's AutoencoderKL: encoder, decoder and the diagonal Gaussian posterior, in diffusers' names.

Reference: diffusers models/autoencoders/{autoencoder_kl.py, vae.py}. Checkpoints with the older
attention names (query/key/value/proj_attn) are renamed by minsdxl.checkpoint before loading.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .config import VAEConfig
from .layerwise import compute_dtype
from .rng import randn
from .unet import ResnetBlock2D


def _resnet(cin, cout, groups):
    return ResnetBlock2D(cin, cout, temb=None, groups=groups, eps=1e-6)


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels, with a GroupNorm and a residual."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch), nn.Dropout(0.0)])  # keys to_out.0.*
        self.attention_backend: str | None = None  # None: minsdxl.attention's process default

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.group_norm(x).view(b, c, h * w).transpose(1, 2)
        o = self.to_out[0](attention(self.to_q(t), self.to_k(t), self.to_v(t), 1, backend=self.attention_backend))
        return o.transpose(1, 2).reshape(b, c, h, w) + x


class VAEMidBlock(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(ch, ch, groups), _resnet(ch, ch, groups)])
        self.attentions = nn.ModuleList([VAEAttention(ch, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, = diffusers Downsample2D(padding=0)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EncoderBlock(nn.Module):
    def __init__(self, cin, cout, n, groups, downsample):
        super().__init__()
        self.resnets = nn.ModuleList(_resnet(cin if j == 0 else cout, cout, groups) for j in range(n))
        self.downsamplers = nn.ModuleList([Downsample(cout)]) if downsample else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class DecoderBlock(nn.Module):
    def __init__(self, cin, cout, n, groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList(_resnet(cin if j == 0 else cout, cout, groups) for j in range(n))
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if upsample else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, last = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < last) for i in range(len(ch))
        )
        self.mid_block = VAEMidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, last = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels) - 1
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = VAEMidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, i < last) for i in range(len(ch))
        )
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        x = x.to(self.up_blocks[0].resnets[0].norm1.weight.dtype)  # = diffusers' upscale_dtype (its first parameter)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """= diffusers DiagonalGaussianDistribution: moments -> mean, logvar (clamped to [-30, 20])."""

    def __init__(self, moments: torch.Tensor):
        self.mean, self.logvar = moments.chunk(2, dim=1)
        self.logvar = self.logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None) -> torch.Tensor:
        eps = randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean


class Codec(nn.Module):
    """What the sampler meets in model.vae beside encode / decode (AutoencoderKL, taesd.AutoencoderTiny): diffusers'
    tiling and slicing switches and the scaling factor of the UNet's latents."""

    use_slicing = use_tiling = False

    def enable_tiling(self, use_tiling: bool = True):
        """Encode / decode large images in overlapping tiles: memory stays that of one tile, the output changes a
        little (= diffusers' enable_tiling; the tiles and their blending are each class's own)."""
        self.use_tiling = use_tiling

    def disable_tiling(self):
        self.use_tiling = False

    def enable_slicing(self):
        """Encode / decode a batch one image at a time (= diffusers' enable_slicing)."""
        self.use_slicing = True

    def disable_slicing(self):
        self.use_slicing = False

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor


class AutoencoderKL(Codec):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        # diffusers' tile sizes, same names (AutoencoderKL.__init__): images over sample_size px in tiles of it
        self.tile_sample_min_size = config.sample_size
        self.tile_latent_min_size = int(config.sample_size / 2 ** (len(config.block_out_channels) - 1))
        self.tile_overlap_factor = 0.25

    def _stats(self, like: torch.Tensor):
        """The per-channel latent mean and std as [1, C, 1, 1] in `like`'s dtype, or None without them."""
        cfg = self.config
        if cfg.latents_mean is None or cfg.latents_std is None:  # diffusers needs both
            return None
        stats = (cfg.latents_mean, cfg.latents_std)
        return [torch.tensor(v).view(1, -1, 1, 1).to(like.device, like.dtype) for v in stats]

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the UNet's: z * scaling_factor, or with latent statistics (Playground v2.5)
        (z - mean) * scaling_factor / std (= the img2img pipelines' prepare_latents)."""
        stats = self._stats(z)
        if stats is None:
            return self.scaling_factor * z
        return (z - stats[0]) * self.scaling_factor / stats[1]

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse, what `decode` takes (= the SDXL pipelines' decode step, in this order)."""
        stats = self._stats(latents)
        if stats is None:
            return latents / self.scaling_factor
        return latents * stats[1] / self.scaling_factor + stats[0]

    @property
    def force_upcast(self) -> bool:
        return self.config.force_upcast

    @property
    def dtype(self):
        return compute_dtype(self.quant_conv)

    @property
    def device(self):
        return self.quant_conv.weight.device

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: image in [-1, 1], [B, 3, H, W] -> posterior over unscaled latents [B, 4, H/8, W/8]."""
        return DiagonalGaussian(self._sliced(self._encode, x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: unscaled latents (`unscale_latents(latents)`) -> image in about [-1, 1]."""
        return self._sliced(self._decode, z)

    def _sliced(self, run, x):
        return torch.cat([run(one) for one in x.split(1)]) if self.use_slicing and x.shape[0] > 1 else run(x)

    def _encode(self, x):
        run = lambda t: self.quant_conv(self.encoder(t))  # noqa: E731
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return _tiled(run, x, self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor)
        return run(x)

    def _decode(self, z):
        run = lambda t: self.decoder(self.post_quant_conv(t))  # noqa: E731
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return _tiled(run, z, self.tile_latent_min_size, self.tile_sample_min_size, self.tile_overlap_factor)
        return run(z)

    def forward(self, x, generator=None):
        return self.decode(self.encode(x).sample(generator))


def _tiled(run, x, tile: int, tile_out: int, overlap: float) -> torch.Tensor:
    """= diffusers' AutoencoderKL._tiled_encode / tiled_decode: `run` on tiles of `tile` (the last ones
    cut short) every tile * (1 - overlap); each output tile blended linearly into the one above, then
    the one to its left, over tile_out * overlap rows / columns, and cropped to tile_out minus that."""
    step, blend = int(tile * (1 - overlap)), int(tile_out * overlap)
    rows = [
        [run(x[:, :, i : i + tile, j : j + tile]) for j in range(0, x.shape[3], step)]
        for i in range(0, x.shape[2], step)
    ]
    for i, row in enumerate(rows):
        for j, t in enumerate(row):  # in this order, in place: a tile blends in neighbours already blended
            if i > 0:
                _blend(rows[i - 1][j], t, blend, dim=2)
            if j > 0:
                _blend(row[j - 1], t, blend, dim=3)
    keep = tile_out - blend
    return torch.cat([torch.cat([t[:, :, :keep, :keep] for t in row], dim=3) for row in rows], dim=2)


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> None:
    """b's first `extent` rows (dim=2) or columns (dim=3) := a's last ones faded into b's (= blend_v / blend_h)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    for y in range(extent):
        b.select(dim, y).copy_(a.select(dim, y - extent) * (1 - y / extent) + b.select(dim, y) * (y / extent))
