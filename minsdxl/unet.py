"""SDXL's UNet2DConditionModel (base, refiner and 9-channel inpaint) in plain PyTorch.

Module attribute names are diffusers' (down_blocks.i.resnets.j, attentions.j.transformer_blocks.k
.attn1.to_q, ...) so a diffusers UNet state_dict loads with strict=True and no renaming. The
topology is read from a UNetConfig; the reference is diffusers' unets/unet_2d_condition.py with
SDXL's settings (addition_embed_type="text_time", use_linear_projection=True, flip_sin_to_cos=True,
freq_shift=0).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .config import UNetConfig
from .layerwise import compute_dtype


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """= diffusers get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0): [cos, sin],
    computed in fp32 whatever the model dtype (bf16 would round 937 to 936)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int, cond_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)
        # a guidance-distilled UNet's guidance embedding enters here (diffusers' cond_proj)
        self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False) if cond_dim else None

    def forward(self, x, cond=None):
        if cond is not None:
            x = x + self.cond_proj(cond)
        return self.linear_2(F.silu(self.linear_1(x)))


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """= diffusers' get_guidance_scale_embedding (the LCM pipelines'): [sin, cos] of 1000·w, frequencies over
    half - 1 (not half, as timestep_embedding), fp32; w is guidance_scale - 1 per batch row."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    args = (w.float() * 1000.0)[:, None] * freqs[None]
    return F.pad(torch.cat([torch.sin(args), torch.cos(args)], dim=1), (0, dim % 2))


class ResnetBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int | None, groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout) if temb else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, emb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


@dataclass
class Perturbation:
    """A guidance rule's change to one layer's output on one chunk of the batch's rows, set by the sampler for
    one call (Perturbed-Attention Guidance; minsdxl.guidance's layer-perturbing guiders, which diffusers applies
    with hooks on a separate UNet call). The batch is `chunks` equal chunks; `chunk` is the perturbed one."""

    kind: str  # "identity": self-attention's output is v (no scores); "skip": the layer's output is its input;
    # "smooth": self-attention with its queries blurred over the token grid (Smoothed Energy Guidance)
    chunks: int
    chunk: int = -1
    dropout: float = 1.0  # "skip" below 1: the layer runs and its output is dropped out with this p instead
    sigma: float = 0.0  # "smooth"'s blur; above sigma_inf, each query is the mean of them all
    sigma_inf: float = 9999.0
    size: tuple = (0, 0)  # "smooth": the latents' (height, width), which the token grids halve from
    on: bool = True  # off for the steps that do not use the perturbed prediction (no dropout draws)

    def rows(self, n: int) -> tuple[int, int]:
        c, k = self.chunk % self.chunks, n // self.chunks
        return c * k, (c + 1) * k

    def split(self, x, normal, perturbed):
        """normal(rows) on all but the perturbed rows, perturbed(rows) on those; both row-wise functions."""
        a, b = self.rows(len(x))
        rest = torch.cat([x[:a], x[b:]]) if a or b < len(x) else None
        y, z = normal(rest) if rest is not None else None, perturbed(x[a:b])
        return z if y is None else torch.cat([y[:a], z, y[a:]])

    def dropped(self, y):
        """A skipped layer's output on the perturbed rows (= diffusers' layer-skip hooks: F.dropout's
        default training=True, so p < 1 draws from torch's global RNG, as there)."""
        return F.dropout(y, p=self.dropout) if self.dropout < 1 else None

    def blur(self, q):
        """= diffusers' _gaussian_blur_2d as Smoothed Energy Guidance's paper code (SusungHong/SEG-SDXL)
        reads: above sigma_inf every query becomes their mean, else a Gaussian blur of kernel ceil(6 sigma)
        (odd, at most the grid's side) with reflected borders. diffusers swaps the two branches (its
        SmoothedEnergyGuidance also never applies them: its prepare_models does not count the batches), and
        takes the first isqrt(L)^2 tokens as a square grid: here the real grid, the same on square latents."""
        n, length, c = q.shape
        h, w = self.size
        while h * w > length:  # each level of the UNet halves the grid (a stride-2 conv: ceil)
            h, w = (h + 1) // 2, (w + 1) // 2
        if h * w != length:
            raise ValueError(
                f"Smoothed Energy Guidance: {length} query tokens are no level of a {self.size} latent grid "
                "(Token Merging on this layer?); perturb other layers or turn Token Merging off"
            )
        g = q.transpose(1, 2).reshape(n, c, h, w)
        if self.sigma > self.sigma_inf:
            g = g.mean(dim=(-2, -1), keepdim=True).expand(n, c, h, w)
        else:
            k = math.ceil(6 * self.sigma) + 1 - math.ceil(6 * self.sigma) % 2
            side = min(h, w)
            k = min(k, side - (side % 2 - 1))
            x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, steps=k)
            pdf = torch.exp(-0.5 * (x / self.sigma).pow(2))
            k1 = (pdf / pdf.sum()).to(q)
            kernel = (k1[:, None] @ k1[None, :]).expand(c, 1, k, k)
            g = F.conv2d(F.pad(g, [k // 2] * 4, mode="reflect"), kernel, groups=c)
        return g.reshape(n, c, length).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention with diffusers' names; cross-attention when `kv_dim` differs from `dim`.
    `inner` (default dim) and `out_bias` as diffusers' Attention(dim_head * heads, out_bias) for the
    IP-Adapter Plus resampler."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, bias: bool = False, inner=None, out_bias=True):
        super().__init__()
        inner = inner or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(kv_dim or dim, inner, bias=bias)
        self.to_v = nn.Linear(kv_dim or dim, inner, bias=bias)
        # to_out[1] is diffusers' Dropout(0.0): kept so the key is `to_out.0.weight`
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=out_bias), nn.Dropout(0.0)])
        self.attention_backend: str | None = None  # None: minsdxl.attention's process default
        # an attn2's IP-Adapter image k/v projections (minsdxl.ip_adapter.IPAdapterLayer) once loaded; named
        # `processor` so the keys are diffusers' IPAdapterAttnProcessor2_0's (attn2.processor.to_k_ip.0.weight)
        self.processor = None
        self.perturb: Perturbation | None = None  # a guidance rule's, set by the sampler for one call

    def forward(self, x, context=None):
        """context: None (self-attention), the tokens to attend to, or (k, v, zeros, ip) already
        projected by this layer (UNet2DConditionModel.project_context): k, v of all but the first
        `zeros` rows of the batch, whose prompt tokens are all zeros; ip: one (k, v, scale, mask) per
        IP-Adapter image prompt, each attended to by the same queries and added, scaled (and masked:
        mask(q) gives [B, queries, 1] weights: minsdxl.ip_adapter.RegionMask)."""
        p = self.perturb
        if p is not None and p.on and context is None:
            return p.split(x, lambda r: self._attend(r, None), lambda r: self._perturbed(r, p))
        return self._attend(x, context)

    def _perturbed(self, x, p: Perturbation):
        if p.kind == "identity":  # = diffusers' PAGIdentitySelfAttnProcessor2_0: each token attends to itself
            return self.to_out[0](self.to_v(x))  # alone, a softmax of 1: the output is v
        if p.kind == "smooth":
            return self._attend(x, None, p.blur)
        y = p.dropped(self._attend(x, None))
        return x if y is None else y  # = diffusers' skip: AttnProcessor2_0's output replaced by its input

    def _attend(self, x, context, blur=None):
        ip = ()
        if isinstance(context, tuple):
            k, v, zeros, ip = context
        else:
            context = x if context is None else context
            k, v, zeros = self.to_k(context), self.to_v(context), 0
        if zeros:  # the all-zero prompts' rows: k = v = 0 (no bias), attention gives 0, this layer to_out's bias
            bias = self.to_out[0].bias.to(x.dtype).expand(zeros, *x.shape[1:])  # (.to: a float8-stored bias)
            if zeros == len(x):
                return bias.clone()
        q = self.to_q(x[zeros:])
        if blur is not None:
            q = blur(q)
        o = attention(q, k, v, self.heads, backend=self.attention_backend)
        for k_ip, v_ip, scale, mask in ip:  # = IPAdapterAttnProcessor2_0: text attention + scale * image attention
            o_ip = attention(q, k_ip, v_ip, self.heads, backend=self.attention_backend)
            o = o + scale * (o_ip if mask is None else o_ip * mask(q))
        o = self.to_out[0](o)
        return torch.cat([bias, o]) if zeros else o


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)
        # minsdxl.compile(model, fused_geglu=True): proj and h * gelu(gate) as one Triton GEMM where it runs
        self.fused = False

    def forward(self, x):
        w = self.proj.weight
        if self.fused and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):  # no backward
            from minsdxl.kernels import geglu_gemm

            w, b = w.to(x.dtype), self.proj.bias.to(x.dtype)  # (a float8-stored proj: see minsdxl.layerwise)
            if geglu_gemm.fits(x, w):
                return geglu_gemm.geglu(x, w, b)
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # net = [GEGLU, Dropout, Linear] as in diffusers, so the keys are net.0.proj and net.2
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim)])
        self.perturb: Perturbation | None = None  # "skip", set by the sampler for one call

    def forward(self, x):
        p = self.perturb
        if p is not None and p.on:
            return p.split(x, self._ff, lambda r: r if p.dropout >= 1 else p.dropped(self._ff(r)))
        return self._ff(x)

    def _ff(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, kv_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.tome = None  # minsdxl.tome.apply_patch: Token Merging's settings, shared by the UNet's blocks
        self.perturb: Perturbation | None = None  # "skip", set by the sampler for one call

    def forward(self, x, context):
        y = self._block(x, context)
        p = self.perturb
        if p is None or not p.on:
            return y
        # = diffusers' TransformerBlockSkipHook: the block's input (dropout 1) or its output dropped out. The
        # block ran on the perturbed rows too (their context rows are not apart): a few blocks' waste
        a, b = p.rows(len(x))
        z = x[a:b] if p.dropout >= 1 else p.dropped(y[a:b])
        return torch.cat([y[:a], z, y[b:]])

    def _block(self, x, context):
        if self.tome is not None:  # = tomesd's ToMeBlock: tokens merged into each part, copied back after
            ma, mc, mm, ua, uc, um = self.tome.functions(x)
            x = x + ua(self.attn1(ma(self.norm1(x))))
            x = x + uc(self.attn2(mc(self.norm2(x)), context))
            return x + um(self.ff(mm(self.norm3(x))))
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    def __init__(self, dim: int, heads: int, depth: int, context_dim: int, groups: int = 32):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(dim, heads, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x, contexts: list):
        b, c, h, w = x.shape
        t = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, HW, C] tokens
        t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, contexts.pop())
        t = self.proj_out(t)
        # x first, so the sum takes x's NCHW layout (diffusers: .permute(...).contiguous()). A
        # channels_last sum would flow into every later conv, which then reorders its weights per call.
        return x + t.reshape(b, h, w, c).permute(0, 3, 1, 2)


class Downsample2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size):
        # nearest x2, or to the skip's size when the latent is not divisible by 2^levels
        # (= diffusers' forward_upsample_size path)
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class DownBlock(nn.Module):
    """One encoder level: `layers_per_block` x (resnet [+ transformer]), then a stride-2 conv."""

    def __init__(self, cin, cout, cfg: UNetConfig, depths: tuple, downsample: bool):
        super().__init__()
        temb, g = cfg.time_embed_dim, cfg.norm_num_groups
        self.resnets = nn.ModuleList(ResnetBlock2D(cin if j == 0 else cout, cout, temb, g) for j in range(len(depths)))
        self.attentions = level_transformers(cout, depths, cfg)
        self.downsamplers = nn.ModuleList([Downsample2D(cout)]) if downsample else None

    def forward(self, x, emb, contexts, skips: list, residual=None, stop=None):
        """residual: a T2I-Adapter's feature map, added (= diffusers' down_intrablock_additional_residuals) to
        the last resnet + attention's output in a level with attention, else to the level's output; the
        skip pushed there carries it too. stop: run the first `stop` resnets (+ transformers) alone (DeepCache)."""
        last = len(self.resnets) - 1
        for j, resnet in enumerate(self.resnets[:stop]):
            x = resnet(x, emb)
            if self.attentions is not None:
                x = self.attentions[j](x, contexts)
                if residual is not None and j == last:
                    x = x + residual
            skips.append(x)
        if stop is not None:
            return x
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        if residual is not None and self.attentions is None:  # (diffusers' in-place `sample +=`: the skip too)
            x = skips[-1] = x + residual
        return x


def fourier_filter(x: torch.Tensor, scale: float) -> torch.Tensor:
    """FreeU's skip filter (= diffusers fourier_filter, threshold 1): the 2x2 lowest spatial frequencies
    (centred by fftshift) times `scale`, in fp32 (no bf16 FFT; fp16's complex32 is unstable)."""
    f = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = f.shape[-2] // 2, f.shape[-1] // 2
    f[..., h - 1 : h + 1, w - 1 : w + 1] *= scale  # = diffusers' x_freq * mask: the other entries times 1.0
    return torch.fft.ifftn(torch.fft.ifftshift(f, dim=(-2, -1)), dim=(-2, -1)).real.to(x.dtype)


class UpBlock(nn.Module):
    """One decoder level: `layers_per_block + 1` x (concat skip, resnet [+ transformer]), then x2."""

    def __init__(self, cin, cout, prev, cfg: UNetConfig, depths: tuple, upsample: bool):
        super().__init__()
        temb, g = cfg.time_embed_dim, cfg.norm_num_groups
        n = len(depths)
        # = diffusers CrossAttnUpBlock2D: the last resnet's skip comes from the level above
        self.resnets = nn.ModuleList(
            ResnetBlock2D((prev if j == 0 else cout) + (cin if j == n - 1 else cout), cout, temb, g) for j in range(n)
        )
        self.attentions = level_transformers(cout, depths, cfg)
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if upsample else None
        self.freeu: tuple[float, float] | None = None  # (b, s): UNet2DConditionModel.enable_freeu

    def forward(self, x, emb, contexts, skips: list, start=0, stop=None):
        """start / stop: run resnets (+ transformers) [start, stop) alone, the upsampler only to the end (DeepCache)."""
        for j in range(start, len(self.resnets) if stop is None else stop):
            resnet, skip = self.resnets[j], skips.pop()
            if self.freeu is not None:  # = diffusers apply_freeu: backbone half amplified, skip's lows damped
                b, s = self.freeu
                half = x.shape[1] // 2
                x = torch.cat([x[:, :half] * b, x[:, half:]], dim=1)
                skip = fourier_filter(skip, s)
            x = resnet(torch.cat([x, skip], dim=1), emb)
            if self.attentions is not None:
                x = self.attentions[j](x, contexts)
        if self.upsamplers is not None and stop is None:
            x = self.upsamplers[0](x, size=skips[-1].shape[-2:])
        return x


class MidBlock(nn.Module):
    """resnet, transformer, resnet (= diffusers UNetMidBlock2DCrossAttn); with mid_transformer_layers 0 one
    resnet alone (= UNetMidBlock2D(num_layers=0, add_attention=False), SSD-1B's and Vega's)."""

    def __init__(self, ch, cfg: UNetConfig):
        super().__init__()
        temb, g, depth = cfg.time_embed_dim, cfg.norm_num_groups, cfg.mid_transformer_layers
        self.resnets = nn.ModuleList(ResnetBlock2D(ch, ch, temb, g) for _ in range(2 if depth else 1))
        self.attentions = level_transformers(ch, (depth,), cfg)

    def forward(self, x, emb, contexts):
        x = self.resnets[0](x, emb)
        return x if self.attentions is None else self.resnets[1](self.attentions[0](x, contexts), emb)


def unet_of(model, what: str) -> "UNet2DConditionModel":
    """A model's UNet (minsdxl.load's, or the UNet itself), or a clear error naming what takes it."""
    unet = getattr(model, "unet", model)
    if not isinstance(unet, UNet2DConditionModel):
        raise TypeError(f"{what} takes a model from minsdxl.load(path) (or its UNet), got {type(model).__name__}")
    return unet


def level_transformers(ch: int, depths: tuple, cfg: UNetConfig) -> nn.ModuleList | None:
    """A level's Transformer2DModels, one per resnet with that many blocks; None for a level without attention."""
    if not any(depths):
        return None
    heads, g = ch // cfg.attention_head_dim, cfg.norm_num_groups
    return nn.ModuleList(Transformer2DModel(ch, heads, d, cfg.cross_attention_dim, g) for d in depths)


def down_blocks(cfg: UNetConfig) -> nn.ModuleList:
    """The encoder levels (a UNet's and a ControlNet's)."""
    ch, last = cfg.block_out_channels, len(cfg.block_out_channels) - 1
    return nn.ModuleList(
        DownBlock(ch[max(i - 1, 0)], ch[i], cfg, cfg.down_depths(i), downsample=i < last) for i in range(len(ch))
    )


class UNet2DConditionModel(nn.Module):
    kind = "UNet"  # in error messages

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch = cfg.block_out_channels
        self.encoder_half(cfg)
        last, rch = len(ch) - 1, ch[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock(rch[min(i + 1, last)], rch[i], rch[max(i - 1, 0)], cfg, cfg.up_depths(i), upsample=i < last)
            for i in range(len(ch))
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=1e-5)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        self.num_cross_attentions = len(self.cross_attentions())
        # IP-Adapters' image projections (minsdxl.ip_adapter.MultiIPAdapterImageProjection) once loaded:
        # diffusers' attribute name, so the keys are encoder_hid_proj.image_projection_layers.N.*
        self.encoder_hid_proj = None
        self.tome = None  # minsdxl.tome.apply_patch: Token Merging (its blocks share these settings)
        self.deepcache = None  # minsdxl.deepcache.enable: the cached deep features and when to reuse them

    def encoder_half(self, cfg: UNetConfig) -> None:
        """The layers a UNet and a ControlNet share (the ControlNet is a copy of them): conv_in, the time
        and micro-conditioning embeddings, the down blocks and the middle block."""
        ch = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim, cfg.time_cond_proj_dim)
        self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim)
        self.down_blocks = down_blocks(cfg)
        # (diffusers' mid_block_type None: KOALA-style UNets without one)
        self.mid_block = None if cfg.mid_transformer_layers is None else MidBlock(ch[-1], cfg)

    @property
    def dtype(self):
        return compute_dtype(self.conv_in)

    @property
    def device(self):
        return self.conv_in.weight.device

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (arXiv:2309.11497; = diffusers' UNet2DConditionModel.enable_freeu): in the first two
        decoder levels, the first half of the backbone's channels times b1 / b2 and the skip features'
        lowest frequencies times s1 / s2. SDXL values from the FreeU authors: s1=0.9, s2=0.2, b1=1.3,
        b2=1.4 (alt. 0.6, 0.4, 1.1, 1.2). As in diffusers, any factor of 0 leaves FreeU off."""
        on = bool(s1 and s2 and b1 and b2)  # = diffusers' is_freeu_enabled: the four attributes' truthiness
        for i, block in enumerate(self.up_blocks):
            block.freeu = ((b1, s1), (b2, s2))[i] if on and i < 2 else None

    def disable_freeu(self) -> None:
        for block in self.up_blocks:
            block.freeu = None

    def cross_attentions(self) -> list[Attention]:
        """Every attn2, in the order forward runs them (module registration order is forward order)."""
        return [m.attn2 for m in self.transformer_blocks()]

    def transformer_blocks(self) -> list[BasicTransformerBlock]:
        return [m for m in self.modules() if isinstance(m, BasicTransformerBlock)]

    def project_context(self, encoder_hidden_states: torch.Tensor, image_embeds=None, ip_adapter_masks=None) -> list:
        """Each cross-attention's (to_k, to_v, zeros, ip) of the prompt tokens. The prompt is the same at
        every denoising step, so the sampler projects it once and passes this list as
        encoder_hidden_states: SDXL base runs 140 small GEMMs per step fewer (~0.8 ms of a 32 ms step
        in an H200 profile).
        zeros: how many leading rows of the batch have all-zero tokens (CFG's negative half, which
        comes first, when force_zeros_for_empty_prompt). Their k, v are left out: bias-free to_k/to_v
        make them 0, so each attn2 gives exactly its to_out bias there, without to_q, attention or to_out
        (4.1 % of a 512x512 CFG step's FLOPs, 3.7 % at 1024x1024; bit-identical to computing it).
        image_embeds: with IP-Adapters loaded, one tensor per adapter as diffusers' added_cond_kwargs
        ["image_embeds"] ([B, images, dim] or [B, images, tokens, dim]); `ip` then holds each layer's
        (k, v, scale, mask) of the projected image tokens, and no rows are left out (an empty prompt still
        sees the image). ip_adapter_masks: diffusers' cross_attention_kwargs["ip_adapter_masks"]."""
        e = encoder_hidden_states
        tokens = None
        if image_embeds is not None:
            if self.encoder_hid_proj is None:
                raise ValueError("image_embeds were given but no IP-Adapter is loaded: minsdxl.load_ip_adapter first")
            tokens = self.encoder_hid_proj(image_embeds)
        lead = 0  # with an image, the empty prompts' rows still attend to its tokens
        if tokens is None:  # (a host sync on a GPU: only when its answer is used)
            zero = (e == 0).flatten(1).all(1).tolist()
            lead = next((i for i, z in enumerate(zero) if not z), len(zero))
        out = []
        for a in self.cross_attentions():
            n = lead if a.to_k.bias is None and a.to_v.bias is None else 0
            ip = a.processor.project(tokens, ip_adapter_masks) if tokens is not None and a.processor is not None else ()
            out.append((a.to_k(e[n:]), a.to_v(e[n:]), n, ip))
        return out

    def contexts(self, encoder_hidden_states, b: int) -> list:
        """What each transformer block pops in forward order: the prompt tokens (a tensor), or
        project_context's list of it checked against this model and the batch size b."""
        if isinstance(encoder_hidden_states, torch.Tensor):
            contexts = [encoder_hidden_states] * self.num_cross_attentions
        else:
            contexts = [tuple(c) for c in encoder_hidden_states]
            fits = all(len(c) == 4 and len(c[0]) + c[2] == b for c in contexts)
            if len(contexts) != self.num_cross_attentions or not fits:
                raise ValueError(
                    f"encoder_hidden_states: got a list of {len(contexts)}; this {self.kind} needs one (k, v, zeros, "
                    f"ip) for each of its {self.num_cross_attentions} cross-attention layers, for a batch of {b}: "
                    f"make it with this {self.kind}'s project_context from the prompt tokens of that batch"
                )
        return contexts[::-1]  # popped once per transformer block, in forward order (like skips)

    def embed(self, sample, timestep, text_embeds, time_ids, extra=None, timestep_cond=None) -> torch.Tensor:
        """The time embedding plus SDXL's micro-conditioning (= diffusers get_aug_embed "text_time");
        `extra` (a ControlNet-Union's control-type embedding) is added before it, in diffusers' order;
        `timestep_cond` (guidance_scale_embedding) for a guidance-distilled UNet."""
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(1).expand(b) if t.ndim == 0 else t.expand(b)
        emb = self.time_embedding(
            timestep_embedding(t, self.config.block_out_channels[0]).to(sample.dtype), timestep_cond
        )
        if extra is not None:
            emb = emb + extra
        # [pooled, emb(time_ids)]
        tids = timestep_embedding(time_ids.flatten(), self.config.addition_time_embed_dim).reshape(b, -1)
        return emb + self.add_embedding(torch.cat([text_embeds, tids.to(text_embeds.dtype)], dim=-1).to(emb.dtype))

    def forward(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        text_embeds,
        time_ids,
        image_embeds=None,
        ip_adapter_masks=None,
        down_block_additional_residuals=None,
        mid_block_additional_residual=None,
        down_intrablock_additional_residuals=None,
        timestep_cond=None,
    ) -> torch.Tensor:
        """sample [B, C, h, w]; timestep float or tensor (scalar or [B]); encoder_hidden_states
        [B, 77, context] (or project_context's list of it); text_embeds (pooled) [B, 1280]; time_ids
        [B, 6] (base) or [B, 5] (refiner); image_embeds: IP-Adapter image embeddings (see
        project_context) and their ip_adapter_masks, with a tensor encoder_hidden_states;
        down_block_additional_residuals / mid_block_additional_residual: a ControlNet's output, added
        to the skips and to the middle block's output (= diffusers' UNet2DConditionModel.forward);
        down_intrablock_additional_residuals: a T2I-Adapter's feature maps, one per level (DownBlock.forward)
        and one for the middle block's output where its shape fits; timestep_cond [B, time_cond_proj_dim]:
        a guidance-distilled UNet's guidance embedding (guidance_scale_embedding)."""
        b = sample.shape[0]
        if image_embeds is not None and isinstance(encoder_hidden_states, torch.Tensor):
            encoder_hidden_states = self.project_context(encoder_hidden_states, image_embeds, ip_adapter_masks)
        contexts = self.contexts(encoder_hidden_states, b)
        if (timestep_cond is None) != (self.config.time_cond_proj_dim is None):
            raise ValueError(
                "timestep_cond (the guidance embedding) goes with a guidance-distilled UNet (time_cond_proj_dim), "
                f"and only there; this UNet's time_cond_proj_dim is {self.config.time_cond_proj_dim}"
            )
        emb = self.embed(sample, timestep, text_embeds, time_ids, timestep_cond=timestep_cond)
        if self.tome is not None:  # = tomesd's forward pre-hook: the blocks size their grids by it
            self.tome.size = tuple(sample.shape[-2:])

        x = self.conv_in(sample)
        skips = [x]  # pushed by every resnet/downsample on the way down, popped in reverse on the way up
        dc = self.deepcache
        if dc is not None and dc.reuse(x):  # DeepCache: the shallow branch alone, the deep features cached
            (down, stop), (up, start) = dc.branch
            for block in self.down_blocks[:down]:
                x = block(x, emb, contexts, skips)
            self.down_blocks[down](x, emb, contexts, skips, stop=stop)
            residuals = down_block_additional_residuals  # a ControlNet's, on the skips computed
            skips = skips if residuals is None else [s + r for s, r in zip(skips, residuals[: len(skips)])]
            # the prompt contexts left (popped in forward order) are the branch's up transformers', the last ones
            runs = [b.attentions[start if i == 0 else 0 :] for i, b in enumerate(self.up_blocks[up:]) if b.attentions]
            del contexts[sum(len(t.transformer_blocks) for ts in runs for t in ts) :]
            x = self.up_blocks[up](dc.features, emb, contexts, skips, start=start)
            for block in self.up_blocks[up + 1 :]:
                x = block(x, emb, contexts, skips)
            return self.conv_out(F.silu(self.conv_norm_out(x)))
        adapter = list(down_intrablock_additional_residuals or ())
        for block in self.down_blocks:
            x = block(x, emb, contexts, skips, adapter.pop(0) if adapter else None)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"down_block_additional_residuals: got {len(down_block_additional_residuals)}, this UNet has "
                    f"{len(skips)} skips: the ControlNet does not fit this UNet (a different topology)"
                )
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]
        if self.mid_block is not None:
            x = self.mid_block(x, emb, contexts)
            if adapter and adapter[0].shape == x.shape:  # (diffusers: only with a middle block)
                x = x + adapter.pop(0)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual
        for i, block in enumerate(self.up_blocks):
            if dc is not None and i == dc.branch[1][0]:  # the features entering the shallow branch, kept
                x = dc.features = block(x, emb, contexts, skips, stop=dc.branch[1][1])
                x = block(x, emb, contexts, skips, start=dc.branch[1][1])
            else:
                x = block(x, emb, contexts, skips)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
