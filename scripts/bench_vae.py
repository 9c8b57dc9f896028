"""Decode benchmark: SDXL's VAE and TAESDXL (minsdxl.taesd), minsdxl vs diffusers, same random weights, same run.

One latent batch decoded to SIZE x SIZE pixels (fp32, the CPU's threads) by four modules: minsdxl's AutoencoderKL and
diffusers' (SDXL's VAE shapes, the same tensors), minsdxl's AutoencoderTiny and diffusers' (taesdxl's shapes). They
take turns for --reps rounds (the order rotates), so drift of a shared machine hits all alike; prints the median and
min seconds per decode, each against diffusers' VAE, and the largest difference of each pair of libraries.

    python scripts/bench_vae.py [--size 1024] [--reps 3]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    import diffusers
    from sdxl_testing import diffusers_vae_config, meta_diffusers, random_state_dict

    from minsdxl.checkpoint import build_taesd, build_vae
    from minsdxl.config import VAE_PRESETS

    with torch.device("meta"):
        shapes = diffusers.AutoencoderKL(**diffusers_vae_config(VAE_PRESETS["sdxl"]))
    sd = random_state_dict(shapes, seed=0)
    vae_ref = meta_diffusers(diffusers.AutoencoderKL, diffusers_vae_config(VAE_PRESETS["sdxl"]), sd)
    vae = build_vae(sd)
    tiny_ref = diffusers.AutoencoderTiny().eval()
    tiny = build_taesd({k: v.clone() for k, v in tiny_ref.state_dict().items()})
    z = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
    runs = {
        "diffusers VAE": lambda: vae_ref.decode(z / vae_ref.config.scaling_factor).sample,
        "minsdxl VAE": lambda: vae.decode(vae.unscale_latents(z)),
        "diffusers TAESD": lambda: tiny_ref.decode(z).sample,
        "minsdxl TAESD": lambda: tiny.decode(tiny.unscale_latents(z)),
    }
    names, times = list(runs), {name: [] for name in runs}
    print(f"decode 1 x 4 x {args.size // 8}^2 latents -> {args.size}^2 px, fp32, {torch.get_num_threads()} threads")
    with torch.inference_mode():
        out = {name: f() for name, f in runs.items()}  # warm-up, and the outputs compared
        for a, b in (("minsdxl VAE", "diffusers VAE"), ("minsdxl TAESD", "diffusers TAESD")):
            print(f"{a} vs {b}: max |difference| = {(out[a] - out[b]).abs().max().item():.1e}")
        for i in range(args.reps):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                t0 = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["diffusers VAE"])
    print(f"\n{'decoder':16} {'median s':>9} {'min s':>7} {'vs diffusers VAE':>17}")
    for name, ts in times.items():
        print(f"{name:16} {statistics.median(ts):9.2f} {min(ts):7.2f} {statistics.median(ts) / ref:16.3f}x")


if __name__ == "__main__":
    main()
