"""TAESD / TAESDXL: madebyollin's tiny autoencoder (= diffusers' AutoencoderTiny), in place of SDXL's VAE.

Four stages of 64-wide residual blocks, 1.2 M parameters a half (the VAE's decoder has 49 M): it decodes the UNet's
latents as they are (no scaling factor) in a fraction of the VAE's time, at a lower quality; for previews and quick
drafts (A1111's live previews and its "TAESD" decode method use it). Keys are diffusers' (encoder.layers.N,
decoder.layers.N); checkpoint.py reads the original files too (taesdxl_encoder.pth / taesdxl_decoder.pth, keys N.*,
the decoder's shifted by its parameter-free Clamp), either half alone.

It stands where an AutoencoderKL stands (model.vae): encode() returns an object with sample() / mode() as the VAE's
posterior does, both the latents themselves (diffusers' retrieve_latents: no noise drawn, so a seed's image is
diffusers' with the same VAE), and scale_latents / unscale_latents are the UNet-side scaling as in vae.py, not
diffusers' AutoencoderTiny methods of those names (its [0, 1] quantization for storing latents as bytes).
"""

import torch
import torch.nn as nn

from .config import TAESDConfig
from .layerwise import compute_dtype
from .vae import Codec


def _conv(cin, cout, stride=1, bias=True):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


class Block(nn.Module):
    """= diffusers' AutoencoderTinyBlock (equal widths: its skip is the identity)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(ch, ch), nn.ReLU(), _conv(ch, ch), nn.ReLU(), _conv(ch, ch))

    def forward(self, x):
        return torch.relu(self.conv(x) + x)


class Encoder(nn.Module):
    """= EncoderTiny: a conv, then per stage a stride-2 conv (but the first stage) and its blocks, a conv to the
    latents; the image from [-1, 1] to TAESD's [0, 1] first."""

    def __init__(self, cfg: TAESDConfig):
        super().__init__()
        widths, counts = cfg.encoder_block_out_channels, cfg.num_encoder_blocks
        layers = []
        for i, (w, n) in enumerate(zip(widths, counts)):
            layers.append(_conv(3, w) if i == 0 else _conv(w, w, stride=2, bias=False))
            layers += [Block(w) for _ in range(n)]
        self.layers = nn.Sequential(*layers, _conv(widths[-1], cfg.latent_channels))

    def forward(self, x):
        return self.layers(x.add(1).div(2))


class Decoder(nn.Module):
    """= DecoderTiny: latents soft-clamped to ±3 (tanh), a conv and ReLU, then per stage its blocks, a 2x nearest
    upsample (but the last stage) and a conv (bias-free but the last, to RGB); [0, 1] back to [-1, 1]."""

    def __init__(self, cfg: TAESDConfig):
        super().__init__()
        widths, counts = cfg.decoder_block_out_channels, cfg.num_decoder_blocks
        layers = [_conv(cfg.latent_channels, widths[0]), nn.ReLU()]
        for i, (w, n) in enumerate(zip(widths, counts)):
            last = i == len(widths) - 1
            layers += [Block(w) for _ in range(n)]
            layers += [] if last else [nn.Upsample(scale_factor=2, mode="nearest")]
            layers.append(_conv(w, 3 if last else w, bias=last))
        self.layers = nn.Sequential(*layers)

    def forward(self, z):
        return self.layers(torch.tanh(z / 3) * 3).mul(2).sub(1)


class Latents:
    """What AutoencoderTiny.encode returns: the latents, under the posterior's two methods (no noise to draw)."""

    def __init__(self, z: torch.Tensor):
        self.z = z

    def sample(self, generator=None) -> torch.Tensor:
        return self.z

    def mode(self) -> torch.Tensor:
        return self.z


class AutoencoderTiny(Codec):
    force_upcast = False  # TAESD runs in fp16 as it is (diffusers' config says so too)

    def __init__(self, config: TAESDConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config) if config.num_encoder_blocks else None
        self.decoder = Decoder(config) if config.num_decoder_blocks else None
        # = diffusers' AutoencoderTiny tiles: with tiling on, whatever the size, tiles of 512 px, 1/8 of each blended
        # over the ones before it (not the VAE's tiles)
        self.tile_sample_min_size, self.tile_overlap_factor = 512, 0.125
        self.factor = 2 ** (len(config.decoder_block_out_channels or config.encoder_block_out_channels) - 1)

    def scale_latents(self, z):
        return self.scaling_factor * z

    def unscale_latents(self, latents):
        return latents / self.scaling_factor

    @property
    def dtype(self):
        return compute_dtype(next(m for m in self.modules() if isinstance(m, nn.Conv2d)))

    @property
    def device(self):
        return next(self.parameters()).device

    def encode(self, x: torch.Tensor) -> Latents:
        """x: image in [-1, 1], [B, 3, H, W] -> latents [B, 4, H/8, W/8], wrapped as a posterior (Latents)."""
        if self.encoder is None:
            raise ValueError(
                "this TAESD has no encoder (only its decoder file was loaded): img2img and inpaint encode the image; "
                "put taesdxl_encoder.pth (or .safetensors) beside taesdxl_decoder, or use the full VAE"
            )
        return Latents(self._sliced(self.encoder, x, 1 / self.factor))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: the UNet's latents -> image in about [-1, 1]."""
        if self.decoder is None:
            raise ValueError("this TAESD has no decoder (only its encoder file was loaded): pass taesdxl_decoder too")
        return self._sliced(self.decoder, z, self.factor)

    def _sliced(self, run, x, scale):
        one = (lambda t: self._tiled(run, t, scale)) if self.use_tiling else run
        return torch.cat([one(t) for t in x.split(1)]) if self.use_slicing and x.shape[0] > 1 else one(x)

    def _tiled(self, run, x, scale):
        """= AutoencoderTiny._tiled_encode / _tiled_decode: tiles of 512 px (64 latents) every 7/8 of one, each
        written over the output so far through a mask ramping up over its first 1/8 (not on the first row or
        column); `scale`: output size / input size."""
        size = self.tile_sample_min_size if scale < 1 else self.tile_sample_min_size // self.factor
        blend, out_size = int(size * self.tile_overlap_factor), int(size * scale)
        step = size - blend
        ramp = (torch.arange(out_size) / (int(blend * scale) - 1)).clamp(0, 1).to(x.device)
        channels = self.config.latent_channels if scale < 1 else 3
        # fp32 whatever the model's dtype, as diffusers' torch.zeros
        out = torch.zeros(x.shape[0], channels, int(x.shape[-2] * scale), int(x.shape[-1] * scale), device=x.device)
        for i in range(0, x.shape[-2], step):
            for j in range(0, x.shape[-1], step):
                tile = run(x[..., i : i + size, j : j + size])
                h, w = tile.shape[-2:]
                oi, oj = int(i * scale), int(j * scale)
                rows, cols = (ramp if i else torch.ones_like(ramp)), (ramp if j else torch.ones_like(ramp))
                mask = (rows[:, None] * cols)[:h, :w]
                dest = out[..., oi : oi + h, oj : oj + w]
                dest.copy_(mask * tile + (1 - mask) * dest)
        return out

    def forward(self, x):
        return self.decode(self.encode(x).sample())
