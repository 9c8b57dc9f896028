"""Load-time benchmark: full-size SDXL base (random weights), minsdxl vs diffusers, same run.

Writes the model once (fp16, as Stability and the fp16 diffusers variant ship it) as a diffusers
folder and as a single sgm file, then loads it in fresh subprocesses and prints a table of seconds
to a ready model (and to every weight page touched once) and peak RSS.

    python scripts/bench_load.py [--workdir /tmp/minsdxl_bench] [--dtype fp16 fp32]
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

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def write_model(work: Path):
    """Random full-size SDXL base as a diffusers folder (fp16 variant) and as one sgm file."""
    if (work / "sd_xl_base.safetensors").exists():
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from sdxl_testing import component_state_dicts, full_size_pipeline

    from minsdxl.checkpoint import diffusers_to_sgm, save_safetensors

    print("writing a random SDXL base (fp16) ...", flush=True)
    pipe = full_size_pipeline("base", torch.float16, "cpu", tokenizer_root=work / "tokenizers")
    pipe.save_pretrained(work / "sdxl-base", variant="fp16", safe_serialization=True, max_shard_size="20GB")
    save_safetensors(diffusers_to_sgm(component_state_dicts(pipe)), work / "sd_xl_base.safetensors")


def touch(modules):
    """Read one element per 4 KiB page of every weight (what a first forward pass would fault in)."""
    total = 0.0
    for m in modules:
        for p in m.parameters():
            total += p.detach().reshape(-1)[:: max(1, 4096 // p.element_size())].float().sum().item()
    return total


def measure(which: str, work: Path, dtype: str):
    t0 = time.perf_counter()
    folder, single = work / "sdxl-base", work / "sd_xl_base.safetensors"
    if which.startswith("minsdxl"):
        import minsdxl

        m = minsdxl.load(folder if which == "minsdxl-folder" else single, dtype=DTYPES[dtype])
    else:
        import diffusers

        kw = dict(torch_dtype=DTYPES[dtype], local_files_only=True)
        if which == "diffusers-folder":
            m = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, variant="fp16", **kw)
        else:
            m = diffusers.StableDiffusionXLPipeline.from_single_file(str(single), config=str(folder), **kw)
    t_load = time.perf_counter() - t0
    touch([m.unet, m.vae, m.text_encoder, m.text_encoder_2])
    t_ready = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"load_s": t_load, "ready_s": t_ready, "peak_rss_gib": rss}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/minsdxl_bench")
    ap.add_argument("--dtype", nargs="+", default=["fp16", "fp32"], choices=list(DTYPES))
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.workdir)
    if args.measure:
        return measure(args.measure, work, args.dtype[0])
    work.mkdir(parents=True, exist_ok=True)
    write_model(work)
    print(f"\nSDXL base, random weights, fp16 files; {os.cpu_count()} CPUs; torch {torch.__version__}")
    print(f"{'dtype':5} {'layout':7} {'loader':9} {'load s':>8} {'ready s':>8} {'peak RSS GiB':>13}")
    for dtype in args.dtype:
        for layout in ("folder", "single"):
            res = {}
            for lib in ("diffusers", "minsdxl"):
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--workdir",
                        str(work),
                        "--dtype",
                        dtype,
                        "--measure",
                        f"{lib}-{layout}",
                    ],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                )
                if out.returncode:
                    print(out.stderr[-2000:])
                    continue
                res[lib] = r = json.loads(out.stdout.strip().splitlines()[-1])
                print(
                    f"{dtype:5} {layout:7} {lib:9} {r['load_s']:8.2f} {r['ready_s']:8.2f} {r['peak_rss_gib']:13.2f}",
                    flush=True,
                )
            if len(res) == 2:
                d, m = res["diffusers"], res["minsdxl"]
                print(
                    f"{'':23} ratio minsdxl/diffusers: ready {m['ready_s'] / d['ready_s']:.2f}x, "
                    f"peak RSS {m['peak_rss_gib'] / d['peak_rss_gib']:.2f}x"
                )


if __name__ == "__main__":
    main()
