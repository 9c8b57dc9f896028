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
    import diffusers
    import safetensors.torch
    import transformers
    from sdxl_testing import SDXL_SCHEDULER, diffusers_unet_config, diffusers_vae_config, random_state_dict
    from tokenizer_fixtures import write_sdxl_tokenizers

    from minsdxl.checkpoint import diffusers_to_sgm
    from minsdxl.config import UNET_PRESETS, VAE_PRESETS

    folder = work / "sdxl-base"
    clip_l = transformers.CLIPTextConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        hidden_act="quick_gelu",
        projection_dim=768,
    )
    big_g = transformers.CLIPTextConfig(
        hidden_size=1280,
        intermediate_size=5120,
        num_attention_heads=20,
        num_hidden_layers=32,
        hidden_act="gelu",
        projection_dim=1280,
    )
    with torch.device("meta"):
        parts = {
            "unet": diffusers.UNet2DConditionModel(**diffusers_unet_config(UNET_PRESETS["base"])),
            "vae": diffusers.AutoencoderKL(**diffusers_vae_config(VAE_PRESETS["sdxl"])),
            "text_encoder": transformers.CLIPTextModel(clip_l),
            "text_encoder_2": transformers.CLIPTextModelWithProjection(big_g),
        }
    sds = {}
    for seed, (name, model) in enumerate(parts.items()):
        print(f"writing {name} ...", flush=True)
        sds[name] = random_state_dict(model, seed, dtype=torch.float16)
        model.load_state_dict(sds[name], assign=True)
        model.save_pretrained(folder / name, variant="fp16", safe_serialization=True, max_shard_size="20GB")
    write_sdxl_tokenizers(folder)
    diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": None,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    print("writing the single file ...", flush=True)
    safetensors.torch.save_file(diffusers_to_sgm(sds), work / "sd_xl_base.safetensors")


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
