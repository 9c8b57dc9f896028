"""CPU benchmark: full-size random SDXL base, 512x512, 2 steps, fp32, minsdxl vs diffusers, same run.

Each library runs in a fresh subprocess (so peak RSS is its own), loading the same diffusers folder
written by bench_load.py (fp16 files, loaded as fp32), then generating one image. Prints seconds per
UNet step (CFG, batch 2), end-to-end seconds (prompt encoding + steps + VAE decode) and peak RSS.

Then (--reps N, default 5) the UNet step alone, interleaved in one process: minsdxl's UNet and
diffusers' memory-map one fp32 file (no second copy) and take turns on the same inputs, so drift of
this shared machine (one config measured 20-32 s in a row) hits both alike; prints median, min and
the median of each round's ratio to diffusers (the order rotates each round). The negative half of
the prompt is zeros, as generate() has it. minsdxl runs the step as its sampler does (the prompt's
cross-attention k, v projected once per image, UNet2DConditionModel.project_context, which also
skips the all-zero negative prompt's cross-attention) and also with the prompt tokens, as diffusers does.

With --tome RATIO the interleaved rounds add Token Merging at max_downsample 2 (fixed cells): minsdxl.tome on
minsdxl's UNet and the tomesd package on diffusers', each a second model on the same mapped weights.
With --deepcache BRANCH they add DeepCache's cached step (the shallow branch BRANCH on the deep features of a
full step run once before): minsdxl.deepcache and the DeepCache package's DeepCacheSDHelper on diffusers' UNet,
again second models on the same weights.
With --storage-dtype fp8 both libraries also run with the UNet's layers stored in float8 and computed in fp32:
minsdxl.load(storage_dtype=) and diffusers' unet.enable_layerwise_casting, in the end-to-end table (peak RSS) and
in the interleaved rounds (second models holding float8 copies of the mapped weights).

    python scripts/bench_cpu.py [--workdir /tmp/minsdxl_bench] [--size 512] [--steps 2] [--reps 5] [--tome 0.5]
                                [--deepcache 0] [--storage-dtype fp8]
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
from bench_load import ROOT, write_model  # noqa: E402

KW = dict(prompt="a photo of an astronaut riding a horse", guidance_scale=5.0)
STORAGE = {"fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def measure(lib: str, work: Path, size: int, steps: int, storage: str | None = None):
    folder = work / "sdxl-base"
    stamps = []

    def cb(*a):
        stamps.append(time.perf_counter())
        return {}

    kw = dict(KW, height=size, width=size, num_inference_steps=steps, callback_on_step_end=cb)
    t0 = time.perf_counter()
    if lib == "minsdxl":
        import minsdxl

        model = minsdxl.load(folder, dtype=torch.float32, storage_dtype=STORAGE.get(storage))
        t1 = time.perf_counter()
        minsdxl.text2img(model, **kw, seed=0, progress=False)
    else:
        import diffusers

        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
            folder, variant="fp16", torch_dtype=torch.float32, local_files_only=True, add_watermarker=False
        )
        pipe.set_progress_bar_config(disable=True)
        if storage:
            pipe.unet.enable_layerwise_casting(storage_dtype=STORAGE[storage], compute_dtype=torch.float32)
        t1 = time.perf_counter()
        pipe(**kw, generator=torch.Generator().manual_seed(0))
    t2 = time.perf_counter()
    step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(dict(load_s=t1 - t0, generate_s=t2 - t1, s_per_step=step, peak_rss_gib=rss)))


def _parity(label: str, ref: str, runs: dict):
    """The last two runs (minsdxl's, the reference's) on the same inputs."""
    a, b = (f() for f in list(runs.values())[-2:])
    print(f"{label} parity: max |minsdxl - {ref}| / max |{ref}| = {((a - b).abs().max() / b.abs().max()).item():.1e}")


def _second(cfg, sd, make):
    """Another UNet on the same tensors (assign=True: no copy)."""
    with torch.device("meta"):
        m = make(cfg)
    m.load_state_dict(sd, strict=True, assign=True)
    return m.eval()


def interleaved(
    work: Path, size: int, reps: int, tome: float = 0.0, deepcache: int | None = None, storage: str | None = None
):
    import statistics

    import diffusers

    sys.path.insert(0, str(ROOT / "tests"))
    from sdxl_testing import diffusers_unet_config, meta_diffusers

    from minsdxl.checkpoint import read_safetensors, save_safetensors
    from minsdxl.config import UNET_PRESETS
    from minsdxl.unet import UNet2DConditionModel

    f32 = work / "unet_fp32.safetensors"
    if not f32.exists():
        fp16 = read_safetensors(work / "sdxl-base" / "unet" / "diffusion_pytorch_model.fp16.safetensors")
        save_safetensors({k: v.float() for k, v in fp16.items()}, f32)
    sd = read_safetensors(f32)
    cfg = UNET_PRESETS["base"]
    with torch.device("meta"):
        ours = UNet2DConditionModel(cfg)
    ours.load_state_dict(sd, strict=True, assign=True)
    ref = meta_diffusers(diffusers.UNet2DConditionModel, diffusers_unet_config(cfg), sd)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size // 8, size // 8, generator=g)
    ctx, pooled = torch.randn(2, 77, 2048, generator=g), torch.randn(2, 1280, generator=g)
    ctx[0], pooled[0] = 0, 0  # the negative half, as generate() has it (force_zeros_for_empty_prompt)
    ids, t = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32), torch.tensor(500.0)
    with torch.inference_mode():
        kv = ours.project_context(ctx)  # what the sampler does once per image
        runs = {
            "minsdxl (sampler's step)": lambda: ours(x, t, kv, pooled, ids),
            "minsdxl (prompt tokens)": lambda: ours(x, t, ctx, pooled, ids),
            "diffusers": lambda: ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample,
        }
        assert (runs["minsdxl (sampler's step)"]() - runs["diffusers"]()).abs().max() < 1e-3  # also faults pages in
        if tome:  # second models on the same tensors (assign=True: no copy), patched
            import tomesd

            from minsdxl import tome as mt

            ours_t = _second(cfg, sd, UNet2DConditionModel)
            mt.apply_patch(ours_t, ratio=tome, max_downsample=2, use_rand=False)
            ref_t = tomesd.apply_patch(
                meta_diffusers(diffusers.UNet2DConditionModel, diffusers_unet_config(cfg), sd),
                ratio=tome,
                max_downsample=2,
                use_rand=False,
            )
            runs[f"minsdxl + ToMe {tome} (step)"] = lambda: ours_t(x, t, kv, pooled, ids)
            runs[f"diffusers + tomesd {tome}"] = lambda: (
                ref_t(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
            )
            _parity("ToMe", "diffusers+tomesd", runs)
        if deepcache is not None:  # the cached step: the shallow branch on a full step's deep features
            from types import SimpleNamespace

            from DeepCache import DeepCacheSDHelper

            from minsdxl import deepcache as md

            ours_d = _second(cfg, sd, UNet2DConditionModel)
            md.enable(SimpleNamespace(unet=ours_d), cache_interval=1000, cache_branch_id=deepcache)
            ours_d.deepcache.start(0)
            ours_d(x, t, kv, pooled, ids)  # the full step, cached
            ours_d.deepcache.start(1)
            ref_d = meta_diffusers(diffusers.UNet2DConditionModel, diffusers_unet_config(cfg), sd)
            # the package finds the step by the timestep's place in the scheduler's: 500 full, then 400 cached
            helper = DeepCacheSDHelper(SimpleNamespace(unet=ref_d, scheduler=SimpleNamespace(timesteps=[500.0, 400.0])))
            helper.set_params(cache_interval=1000, cache_branch_id=deepcache)
            helper.enable()
            cond = {"text_embeds": pooled, "time_ids": ids}
            ref_d(x, t, ctx, added_cond_kwargs=cond)
            t2 = torch.tensor(400.0)
            runs[f"minsdxl + DeepCache {deepcache} (cached step)"] = lambda: ours_d(x, t2, kv, pooled, ids)
            runs[f"diffusers + DeepCache {deepcache} (cached)"] = lambda: (
                ref_d(x, t2, ctx, added_cond_kwargs=cond).sample
            )
            _parity("DeepCache (cached step)", "diffusers+DeepCache", runs)
        if storage:  # second models holding float8 copies of the mapped weights
            from minsdxl import layerwise

            ours_s = layerwise.enable(_second(cfg, sd, UNet2DConditionModel), STORAGE[storage], torch.float32)
            ref_s = meta_diffusers(diffusers.UNet2DConditionModel, diffusers_unet_config(cfg), sd)
            ref_s.enable_layerwise_casting(storage_dtype=STORAGE[storage], compute_dtype=torch.float32)
            kv_s = ours_s.project_context(ctx)  # by its own float8 to_k / to_v
            runs[f"minsdxl, {storage} storage (step)"] = lambda: ours_s(x, t, kv_s, pooled, ids)
            runs[f"diffusers, {storage} layerwise casting"] = lambda: (
                ref_s(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
            )
            _parity(f"{storage} storage", "diffusers (layerwise casting)", runs)
        times = {name: [] for name in runs}
        names = list(runs)
        for i in range(reps):
            for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate who goes first
                t0 = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - t0)
    print(f"\nUNet step alone, {size}x{size} CFG batch 2, fp32, {reps} interleaved rounds (s)")
    w = max(map(len, times))
    print(f"{'':{w}} {'median':>7} {'min':>7} {'median / diffusers':>18} {'median of round ratios':>22}")
    ref_t = times["diffusers"]
    for name, ts in times.items():
        med, paired = statistics.median(ts), statistics.median(a / b for a, b in zip(ts, ref_t))
        print(f"{name:{w}} {med:7.2f} {min(ts):7.2f} {med / statistics.median(ref_t):17.2f}x {paired:21.2f}x")
    print(json.dumps(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/minsdxl_bench")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="interleaved UNet-step rounds (0: skip)")
    ap.add_argument("--tome", type=float, default=0.0, help="also time Token Merging at this ratio (both libraries)")
    ap.add_argument("--deepcache", type=int, default=None, help="also time DeepCache's cached step, this branch")
    ap.add_argument("--storage-dtype", choices=STORAGE, help="also run both with the UNet stored in float8")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.workdir)
    if args.measure:
        lib, _, storage = args.measure.partition(":")
        return measure(lib, work, args.size, args.steps, storage or None)
    work.mkdir(parents=True, exist_ok=True)
    write_model(work)
    print(
        f"\nSDXL base (random weights), fp32, {args.size}x{args.size}, {args.steps} steps, CFG; "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'library':13} {'load s':>7} {'s/UNet step':>11} {'generate s':>10} {'peak RSS GiB':>13}")
    res = {}
    libs = ["diffusers", "minsdxl"]
    if args.storage_dtype:
        libs += [f"{lib}:{args.storage_dtype}" for lib in libs]
    for lib in libs:
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
            f"{lib:13} {r['load_s']:7.1f} {r['s_per_step']:11.2f} {r['generate_s']:10.1f} {r['peak_rss_gib']:13.2f}",
            flush=True,
        )
    for suffix in ["", f":{args.storage_dtype}"] if args.storage_dtype else [""]:
        if f"diffusers{suffix}" in res and f"minsdxl{suffix}" in res:
            d, m = res[f"diffusers{suffix}"], res[f"minsdxl{suffix}"]
            print(
                f"ratio minsdxl/diffusers{suffix}: step {m['s_per_step'] / d['s_per_step']:.2f}x, generate "
                f"{m['generate_s'] / d['generate_s']:.2f}x, peak RSS {m['peak_rss_gib'] / d['peak_rss_gib']:.2f}x"
            )
    if args.reps:
        interleaved(work, args.size, args.reps, args.tome, args.deepcache, args.storage_dtype)


if __name__ == "__main__":
    main()
