"""Train the tiny SDXL that ships with minsdxl (`minsdxl.load("tiny")`, the CLI's default model).

    python scripts/train_tiny.py                 # ~70 min on 2 CPU cores -> minsdxl/data/tiny/
    python scripts/train_tiny.py --stage vae     # or in two runs: the VAE (~17 min), then
    python scripts/train_tiny.py --stage unet    # the UNet + text encoders (~50 min) and the export
    python scripts/train_tiny.py --stage export  # re-export from the work folder only

SDXL's topology at a tiny width, trained from scratch on the shape world of `minsdxl.tiny`:
  1. the VAE (4 levels, 8x downsampling, 4 latent channels) on 64x64 pictures, L1 + a small KL term;
     its scaling factor is then set to 1 / std of the latents, SDXL's convention (0.13025 there);
  2. the UNet (3 levels, cross-attention at levels 1 and 2) together with both text encoders (CLIP-L-
     and bigG-style, different widths, the real CLIP BPE tokenizer with SDXL's two pad rules): epsilon
     prediction on SDXL's scaled-linear schedule, context = both encoders' penultimate hidden states,
     pooled = the bigG-style encoder's projection, add_time_ids = the picture's real original size,
     crop and target size. 10 % of captions are dropped to ALL-ZERO context and pooled embeddings,
     the negative diffusers' encode_prompt uses with force_zeros_for_empty_prompt, so classifier-free
     guidance works. An exponential moving average of the weights is what ships.
Prompts whose (colour, shape, position) triple is in `held_out` never occur in training (with any
background, any caption form): the functional tests draw their prompts from there.
Deterministic: one seed for numpy and torch, 2 threads.
"""

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from minsdxl import tiny
from minsdxl.checkpoint import SDXL, save
from minsdxl.config import TextConfig, UNetConfig, VAEConfig
from minsdxl.schedulers import SDXL_SCHEDULER_CONFIG as SCHEDULER
from minsdxl.text_encoder import build_text_encoder
from minsdxl.tokenizer import CLIPTokenizer
from minsdxl.unet import UNet2DConditionModel
from minsdxl.vae import AutoencoderKL

UNET = UNetConfig(
    block_out_channels=(32, 64, 96),
    layers_per_block=2,
    transformer_layers=(0, 1, 2),
    mid_transformer_layers=1,
    attention_head_dim=16,
    cross_attention_dim=32 + 48,  # CLIP-L-style width + bigG-style width, concatenated as in SDXL
    addition_time_embed_dim=16,
    projection_class_embeddings_input_dim=48 + 6 * 16,  # pooled + 6 time ids
    norm_num_groups=16,
    sample_size=tiny.SIZE // 8,
)
VAE = VAEConfig(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=tiny.SIZE)
TEXT_L = TextConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128)
TEXT_G = TextConfig(
    hidden_size=48,
    num_hidden_layers=3,
    num_attention_heads=3,
    intermediate_size=192,
    hidden_act="gelu",
    projection_dim=48,
    pad_token_id=0,
)
FORMS = ((True, True, 0.55), (True, False, 0.15), (False, True, 0.15), (False, False, 0.15))  # pos?, bg?, p


def held_out(seed: int = 1234, n: int = 24) -> list[tuple[str, str, str]]:
    """n (colour, shape, position) triples never shown in training: every colour, shape and position
    still appears with others, so what is tested is composition, not new words."""
    triples = [(c, s, p) for c in tiny.COLORS for s in tiny.SHAPES for p in tiny.POSITIONS]
    order = np.random.default_rng(seed).permutation(len(triples))
    return sorted(triples[i] for i in order[:n])


def make_pool(n: int, rng: np.random.Generator, excluded) -> dict:
    """n training pictures with captions and their real add_time_ids: each is drawn at an original size of
    64, 96 or 128 px, a quarter of them cropped to 85-100 % of the side at a random corner, resized to 64."""
    allowed = [(c, s, p) for c in tiny.COLORS for s in tiny.SHAPES for p in tiny.POSITIONS if (c, s, p) not in excluded]
    forms = [f[:2] for f in FORMS]
    weights = np.array([f[2] for f in FORMS])
    images, captions, time_ids = [], [], []
    for _ in range(n):
        c, s, p = allowed[rng.integers(len(allowed))]
        bg = list(tiny.BACKGROUNDS)[rng.integers(len(tiny.BACKGROUNDS))]
        size = int(rng.choice([64, 96, 128]))
        img = tiny.render(c, s, p, bg, size=size, rng=rng)
        top = left = 0
        if rng.random() < 0.25:
            side = int(size * rng.uniform(0.85, 1.0))
            top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
            img = img.crop((left, top, left + side, top + side))
        if img.size[0] != tiny.SIZE:
            img = img.resize((tiny.SIZE, tiny.SIZE), Image.BICUBIC)
        with_pos, with_bg = forms[rng.choice(len(forms), p=weights)]
        images.append(np.asarray(img))
        captions.append(tiny.caption(c, s, p if with_pos else None, bg if with_bg else None))
        time_ids.append([size, size, top, left, tiny.SIZE, tiny.SIZE])
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    return {"images": x, "captions": captions, "time_ids": torch.tensor(time_ids, dtype=torch.float32)}


def warmup_cosine(steps: int, warmup: int):
    """Learning-rate factor: linear warm-up, then cosine decay to 10 %."""
    return lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps))))


def log(msg: str, t0: float) -> None:
    print(f"[{(time.time() - t0) / 60:6.1f} min] {msg}", flush=True)


def train_vae(pool, steps: int, batch: int, t0: float) -> AutoencoderKL:
    vae = AutoencoderKL(VAE)
    with torch.no_grad():  # start with a narrow posterior (std e^-4): with a tiny KL weight, a wide one
        vae.quant_conv.bias[VAE.latent_channels :] = -8.0  # buries the shapes in latent noise
    opt = torch.optim.AdamW(vae.parameters(), lr=5e-4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, 100))
    gen = torch.Generator().manual_seed(1)
    n = len(pool["images"])
    avg = None
    for step in range(1, steps + 1):
        x = pool["images"][torch.randint(n, (batch,), generator=gen)]
        post = vae.encode(x)
        rec = vae.decode(post.sample(gen))
        # the shape covers ~10 % of the picture: weigh its pixels (those off the median = background
        # colour) 5x, or a flat background is a cheap minimum
        background = x.flatten(2).median(-1).values[..., None, None]
        w = 1 + 4 * ((x - background).abs().amax(1, keepdim=True) > 0.1).float()
        kl = 0.5 * (post.mean**2 + post.var - 1 - post.logvar).mean()
        loss = ((rec - x).abs() * w).mean() + 0.1 * ((rec - x) ** 2 * w).mean() + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % 100 == 0 or step == steps:
            log(f"vae step {step}/{steps} loss {avg:.4f} (kl {kl.item():.2f})", t0)
    return vae.eval()


@torch.no_grad()
def encode_pool(vae, pool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(posterior mean, std) of every picture, and the scaling factor 1 / std of the latents."""
    means, stds = [], []
    for x in pool["images"].split(256):
        post = vae.encode(x)
        means.append(post.mean)
        stds.append(post.std)
    mean, std = torch.cat(means), torch.cat(stds)
    sample = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(2))
    return mean, std, 1.0 / sample.std().item()


class Denoiser(torch.nn.Module):
    """The UNet and both text encoders, trained together."""

    def __init__(self):
        super().__init__()
        self.unet = UNet2DConditionModel(UNET)
        self.text_encoder = build_text_encoder(TEXT_L)
        self.text_encoder_2 = build_text_encoder(TEXT_G)
        for enc in (self.text_encoder, self.text_encoder_2):  # CLIP's init: small token/position embeddings
            torch.nn.init.normal_(enc.token_embedding.weight, std=0.02)
            emb = enc.text_model.embeddings if hasattr(enc, "text_model") else enc.embeddings
            torch.nn.init.normal_(emb.position_embedding.weight, std=0.01)

    def forward(self, noisy, t, ids_l, ids_g, time_ids, keep):
        h_l, _ = self.text_encoder(ids_l)
        h_g, pooled = self.text_encoder_2(ids_g)
        context = torch.cat([h_l, h_g], dim=-1) * keep[:, None, None]
        return self.unet(noisy, t, context, pooled * keep[:, None], time_ids)


def train_unet(pool, mean, std, scale, steps: int, batch: int, t0: float, work: Path) -> Denoiser:
    model = Denoiser()
    ema = Denoiser()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    ids_l = CLIPTokenizer.bundled()(pool["captions"])
    ids_g = CLIPTokenizer.bundled(pad_token="!")(pool["captions"])
    betas = torch.linspace(SCHEDULER["beta_start"] ** 0.5, SCHEDULER["beta_end"] ** 0.5, 1000) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, 200))
    gen = torch.Generator().manual_seed(3)
    n = len(mean)
    avg = None
    for step in range(1, steps + 1):
        i = torch.randint(n, (batch,), generator=gen)
        x0 = (mean[i] + std[i] * torch.randn(mean[i].shape, generator=gen)) * scale
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(1000, (batch,), generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        keep = (torch.rand(batch, generator=gen) >= 0.1).float()  # caption dropout -> zero embeddings
        pred = model(noisy, t, ids_l[i], ids_g[i], pool["time_ids"][i], keep)
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        avg = loss.item() if avg is None else 0.99 * avg + 0.01 * loss.item()
        if step % 500 == 0:  # a snapshot to look at while training goes on
            torch.save(ema.state_dict(), work / "snapshot.pt")
        if step % 100 == 0 or step == steps:
            log(f"unet step {step}/{steps} loss {avg:.4f} lr {sched.get_last_lr()[0]:.2e}", t0)
    return ema.eval()


def pad_mid_block(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """diffusers' UNet2DConditionModel gives its mid block as many transformer layers as the last level
    (it has no separate setting), so a model trained with fewer is written with identity layers added:
    all-zero weights make attn1, attn2 and the feed-forward each add exactly 0 to the residual stream."""
    cfg = unet.config
    if cfg.mid_transformer_layers >= cfg.transformer_layers[-1]:
        return unet
    padded = UNet2DConditionModel(replace(cfg, mid_transformer_layers=cfg.transformer_layers[-1]))
    sd = unet.state_dict()
    prefix = "mid_block.attentions.0.transformer_blocks."
    for k, v in padded.state_dict().items():
        if k not in sd:
            assert k.startswith(prefix), k
            sd[k] = torch.ones_like(v) if ".norm" in k and k.endswith("weight") else torch.zeros_like(v)
    padded.load_state_dict(sd)
    return padded.eval()


def export(work: Path, out: Path) -> None:
    """The trained weights as a diffusers SDXL folder (fp16 files), loadable by minsdxl.load and by
    diffusers' StableDiffusionXLPipeline.from_pretrained."""
    meta = json.loads((work / "meta.json").read_text())
    vae = AutoencoderKL(replace(VAE, scaling_factor=meta["scaling_factor"]))
    vae.load_state_dict(torch.load(work / "vae.pt", weights_only=True))
    den = Denoiser()
    den.load_state_dict(torch.load(work / "denoiser.pt", weights_only=True))
    model = SDXL(
        unet=pad_mid_block(den.unet),
        vae=vae,
        text_encoder=den.text_encoder,
        text_encoder_2=den.text_encoder_2,
        tokenizer=CLIPTokenizer.bundled(),
        tokenizer_2=CLIPTokenizer.bundled(pad_token="!"),
        scheduler_config=SCHEDULER,
        kind="base",
    )
    shutil.rmtree(out, ignore_errors=True)  # this script owns the folder: replace it whole
    save(model, out, dtype=torch.float16)
    (out / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("tiny-work"), help="checkpoints between stages")
    ap.add_argument("--out", type=Path, default=tiny.PATH, help="the diffusers folder to write")
    ap.add_argument("--stage", choices=["all", "vae", "unet", "export"], default="all")
    ap.add_argument("--pool", type=int, default=30000, help="training pictures")
    ap.add_argument("--vae-steps", type=int, default=1800)
    ap.add_argument("--unet-steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=64, help="UNet batch")
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.stage != "export":
        excluded = held_out()
        pool = make_pool(args.pool, np.random.default_rng(args.seed), set(excluded))
        log(f"{args.pool} pictures, {len(set(pool['captions']))} distinct captions", t0)
        if args.stage in ("all", "vae"):
            vae = train_vae(pool, args.vae_steps, args.vae_batch, t0)
            torch.save(vae.state_dict(), args.work / "vae.pt")
            if args.stage == "vae":
                return
        else:
            vae = AutoencoderKL(VAE)
            vae.load_state_dict(torch.load(args.work / "vae.pt", weights_only=True))
            vae.eval()
        mean, std, scale = encode_pool(vae, pool)
        log(f"latent scaling factor {scale:.5f}", t0)
        meta_path = args.work / "meta.json"
        torch.manual_seed(args.seed + 1)  # the UNet's init does not depend on how the VAE stage ran
        den = train_unet(pool, mean, std, scale, args.unet_steps, args.batch, t0, args.work)
        torch.save(den.state_dict(), args.work / "denoiser.pt")
        meta = {
            "seed": args.seed,
            "pictures": args.pool,
            "vae_steps": args.vae_steps,
            "unet_steps": args.unet_steps,
            "batch": args.batch,
            "vae_batch": args.vae_batch,  # (stage "unet": what the flag says; the VAE came from an earlier run)
            "scaling_factor": scale,
            "minutes": round((time.time() - t0) / 60, 1),  # this run (stage "unet": without the VAE)
            "held_out": excluded,
            "configs": {"unet": asdict(UNET), "vae": asdict(VAE), "text_l": asdict(TEXT_L), "text_g": asdict(TEXT_G)},
        }
        meta_path.write_text(json.dumps(meta, indent=1))
    export(args.work, args.out)


if __name__ == "__main__":
    main()
