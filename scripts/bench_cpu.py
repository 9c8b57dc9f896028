"""CPU benchmark: full-size random SDXL base, 512x512, 2 steps, fp32, minsdxl vs diffusers, same run.

Each library runs in a fresh subprocess (so peak RSS is its own), loading the same diffusers folder
written by bench_load.py (fp16 files, loaded as fp32), then generating one image. Prints seconds per
UNet step (CFG, batch 2), end-to-end seconds (prompt encoding + steps + VAE decode) and peak RSS.

    python scripts/bench_cpu.py [--workdir /tmp/minsdxl_bench] [--size 512] [--steps 2]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import write_model  # noqa: E402

KW = dict(prompt="a photo of an astronaut riding a horse", guidance_scale=5.0)


def measure(lib: str, work: Path, size: int, steps: int):
    folder = work / "sdxl-base"
    stamps = []

    def cb(*a):
        stamps.append(time.perf_counter())
        return {}

    kw = dict(KW, height=size, width=size, num_inference_steps=steps, callback_on_step_end=cb)
    t0 = time.perf_counter()
    if lib == "minsdxl":
        import minsdxl

        model = minsdxl.load(folder, dtype=torch.float32)
        t1 = time.perf_counter()
        minsdxl.text2img(model, **kw, seed=0, progress=False)
    else:
        import diffusers

        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
            folder, variant="fp16", torch_dtype=torch.float32, local_files_only=True, add_watermarker=False
        )
        pipe.set_progress_bar_config(disable=True)
        t1 = time.perf_counter()
        pipe(**kw, generator=torch.Generator().manual_seed(0))
    t2 = time.perf_counter()
    step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(dict(load_s=t1 - t0, generate_s=t2 - t1, s_per_step=step, peak_rss_gib=rss)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/minsdxl_bench")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.workdir)
    if args.measure:
        return measure(args.measure, work, args.size, args.steps)
    work.mkdir(parents=True, exist_ok=True)
    write_model(work)
    print(
        f"\nSDXL base (random weights), fp32, {args.size}x{args.size}, {args.steps} steps, CFG; "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'library':9} {'load s':>7} {'s/UNet step':>11} {'generate s':>10} {'peak RSS GiB':>13}")
    res = {}
    for lib in ("diffusers", "minsdxl"):
        cmd = [
            sys.executable,
            __file__,
            "--workdir",
            str(work),
            "--size",
            str(args.size),
            "--steps",
            str(args.steps),
            "--measure",
            lib,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:])
            continue
        res[lib] = r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{lib:9} {r['load_s']:7.1f} {r['s_per_step']:11.2f} {r['generate_s']:10.1f} {r['peak_rss_gib']:13.2f}",
            flush=True,
        )
    if len(res) == 2:
        d, m = res["diffusers"], res["minsdxl"]
        print(
            f"ratio minsdxl/diffusers: step {m['s_per_step'] / d['s_per_step']:.2f}x, "
            f"generate {m['generate_s'] / d['generate_s']:.2f}x, peak RSS {m['peak_rss_gib'] / d['peak_rss_gib']:.2f}x"
        )


if __name__ == "__main__":
    main()
