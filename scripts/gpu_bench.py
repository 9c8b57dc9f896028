"""One-call GPU benchmark: Triton attention vs SDPA, and SDXL base end to end, minsdxl vs diffusers.

    python scripts/gpu_bench.py [--out bench.json] [--steps 30] [--size 1024] [--skip-compile]
    python scripts/gpu_bench.py --tiny --device cpu      # a dry run of every code path, no GPU

Prints a table as it goes (a time-out still leaves numbers) and writes JSON after every row:
 1. kernel correctness vs fp32 SDPA (fp16, bf16) at SDXL's attention shapes, both Triton kernels (TMA
    descriptors and pointers), and their speed vs SDPA's flash backend: GPU time from CUDA-graph replays
    (no launch overhead) and per call as launched (with it).
 1b. GEMM fusion leads: GPU time of q, k, v as three GEMMs vs one, and of GEGLU's projection with its
    compiled gelu * mul vs the projection alone, at SDXL's two transformer widths, times the layers at
    each: what fused QKV / a GEGLU epilogue could save per UNet step at most; and what minsdxl's Triton
    GEGLU GEMM (minsdxl.kernels.geglu_gemm, the epilogue fused) takes and saves, with its error;
 2. parity: minsdxl vs diffusers final latents, same weights and seed (relative max difference);
 3. (--offload) peak GPU memory of one image with and without model offload, both libraries;
 4. full-size random SDXL base, bf16, CFG, end to end (text encoders + N steps + VAE decode) and ms per
    denoising step (CUDA events at diffusers' callback_on_step_end, so the same loop is timed), peak GPU
    memory, the time before the first step (prompt encoding, latents) and after the last (VAE decode,
    PIL images), the image's mean |difference| in 8-bit levels from the first timed row's (same seed), for
    minsdxl eager, diffusers eager (SDPA), diffusers + torch.compile, minsdxl.compile's defaults on CUDA
    (CUDA graphs + Triton attention, text encoders compiled too), and last diffusers + torch.compile
    with CUDA graphs (--all: also minsdxl compiled + Triton without CUDA graphs, minsdxl's defaults
    with eager text encoders, with the UNet's self-attention on SDPA (cuDNN on Hopper), and with
    fused_geglu=True); graphs
    compiled during the timed run (must be 0);
    --profile writes the top GPU kernels of diffusers + torch.compile and of minsdxl.compile's defaults
    to <out dir>/profile_*.txt.
    --lora: a random LoRA on every layer loaded into minsdxl.compile's defaults (weights written in place
    under CUDA graphs) and unloaded: output changed, no new graphs, compiled vs eager, bit-equal after.
 5. (--controlnet) SDXL base + a ControlNet of controlnet-canny-sdxl-1.0's shapes: latent parity, and ms per
    step / end to end eager and compiled, minsdxl (compile(model, controlnet=net)) vs diffusers.
 6. (--deepcache N:BRANCH) DeepCache (the whole UNet every N steps, the shallow branch between; it changes the
    image, so not a row of 4.): minsdxl.deepcache eager and under minsdxl.compile's defaults vs the DeepCache
    package on diffusers' eager pipeline (needs its wheel: pip's DeepCache 0.1.1), ms per step (the mean of
    full and cached steps after the first), end to end, and the image's mean |difference| from the package's.
 7. (--storage-dtype fp8) the UNet's layers stored in float8 e4m3fn, computed in bf16 (it changes the image):
    diffusers' unet.enable_layerwise_casting on its eager pipeline, minsdxl.layerwise eager and under
    minsdxl.compile's defaults, each on a float8 copy of the UNet: the UNet's weight GiB, ms per step, end to
    end, peak GPU memory (the bf16 models stay resident) and the image's mean |difference| from diffusers'.
"""

import argparse
import functools
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # test helpers: random weights, tiny configs, tokenizer folders

RESULTS: dict = {}
ATTENTION_SHAPES = [(2, 10, 4096, 4096, 64), (2, 10, 4096, 77, 64), (2, 20, 1024, 1024, 64), (2, 20, 1024, 77, 64)]


def log(*a):
    print(*a, flush=True)


def save(args):
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(RESULTS, indent=2, default=str))


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def wall_ms(fn, device, reps=10, warmup=2):
    """Mean milliseconds per call, launch overhead included (synchronised wall clock)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps * 1e3


def gpu_ms(fn, device):
    """Median GPU milliseconds per call from CUDA-graph replays (no launch gaps); wall clock on CPU."""
    if torch.device(device).type != "cuda":
        return wall_ms(fn, device, reps=2, warmup=1)
    from triton.testing import do_bench_cudagraph

    fn()  # autotuning happens here, outside the capture
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=50, return_mode="median")


# ------------------------------------------------------------------------------------------------
# 1. attention


def attention_section(args):
    import torch.nn.functional as F

    from minsdxl.kernels import flash_attention, flash_attn

    dev = args.device
    shapes = ATTENTION_SHAPES if not args.tiny else [(1, 2, 64, 64, 64), (1, 2, 64, 77, 64)]
    dtypes = [torch.bfloat16, torch.float16] if dev == "cuda" else [torch.float32]
    log("\n1. attention: Triton (TMA / pointers) vs SDPA flash, [B, L, H*D] viewed as [B, H, L, D]")
    log("   GPU ms = median of CUDA-graph replays; launched ms = per call with launch overhead;")
    log("   sdpa = SDPA's flash backend (FlashAttention-2), default = the backend torch picks (cuDNN on Hopper)")
    log(
        f"{'dtype':6} {'B,H,Lq,Lk,D':22} {'rel err tma':>11} {'rel ptrs':>9} {'tma GPU ms':>10} {'ptrs GPU':>9} "
        f"{'sdpa GPU':>9} {'default GPU':>11} {'tma TF/s':>9} {'sdpa TF/s':>9} {'tma launched':>12} "
        f"{'sdpa launched':>13}"
    )
    rows = []

    def sdpa(q, k, v):
        if dev != "cuda":
            return F.scaled_dot_product_attention(q, k, v)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    def triton(q, k, v, tma):  # tma: the TMA kernel at any length (False: the pointer kernel)
        flash_attn._TMA, min_keys, flash_attn.TMA_MIN_KEYS = tma, flash_attn.TMA_MIN_KEYS, 0
        try:
            return flash_attention(q, k, v)
        finally:
            flash_attn._TMA, flash_attn.TMA_MIN_KEYS = True, min_keys

    for dtype in dtypes:
        for b, h, lq, lk, d in shapes:

            def mk(n, b=b, h=h, d=d, dtype=dtype):
                return torch.randn(b, n, h * d, device=dev, dtype=dtype).view(b, n, h, d).transpose(1, 2)

            q, k, v = mk(lq), mk(lk), mk(lk)
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            row = dict(dtype=str(dtype), shape=(b, h, lq, lk, d), tma_fits=flash_attn._tma_fits(q, k, v, q))
            flops = 4 * b * h * lq * lk * d
            for name, fn in [
                ("tma", lambda: triton(q, k, v, True)),  # noqa: B023
                ("ptrs", lambda: triton(q, k, v, False)),  # noqa: B023
                ("sdpa", lambda: sdpa(q, k, v)),  # noqa: B023
                ("sdpa_default", lambda: F.scaled_dot_product_attention(q, k, v)),  # noqa: B023  torch's pick
            ]:
                if name == "ptrs" and dtype != dtypes[0]:
                    continue  # the fallback kernel: one dtype is enough
                try:
                    out = fn().float()
                    row[f"{name}_rel_err"] = ((out - ref).abs().max() / ref.abs().max()).item()
                    row[f"{name}_gpu_ms"] = gpu_ms(fn, dev)
                    row[f"{name}_tflops"] = flops / row[f"{name}_gpu_ms"] / 1e9
                    if name in ("tma", "sdpa"):
                        row[f"{name}_launched_ms"] = wall_ms(fn, dev)
                except Exception as e:  # a failure is a result: report it and go on
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    log(f"   {name} failed at {(b, h, lq, lk, d)} {dtype}: {row[f'{name}_error']}")
            rows.append(row)

            def f(key, fmt, row=row):
                return format(row[key], fmt) if key in row else "-"

            log(
                f"{str(dtype)[6:]:6} {str((b, h, lq, lk, d)):22} {f('tma_rel_err', '11.2e')} "
                f"{f('ptrs_rel_err', '9.2e')} {f('tma_gpu_ms', '10.4f')} {f('ptrs_gpu_ms', '9.4f')} "
                f"{f('sdpa_gpu_ms', '9.4f')} {f('sdpa_default_gpu_ms', '11.4f')} {f('tma_tflops', '9.1f')} "
                f"{f('sdpa_tflops', '9.1f')} "
                f"{f('tma_launched_ms', '12.4f')} {f('sdpa_launched_ms', '13.4f')}"
            )
            RESULTS["attention"] = rows
            save(args)
    return rows


def fall_back_if_broken(rows) -> None:
    """If the TMA kernel failed anywhere, the rest of the run uses the pointer kernel (and says so)."""
    from minsdxl.kernels import flash_attn

    if any("tma_error" in r for r in rows):
        flash_attn._TMA = False
        log("   the TMA kernel failed: minsdxl's Triton attention uses the pointer kernel in this run")


# ------------------------------------------------------------------------------------------------
# 1b. GEMM fusion leads (the issue's "fused QKV / GEGLU, where profiling shows it pays"): what each
# could save per UNet step at most, from the GPU time of the GEMMs as the compiled UNet runs them

# (tokens per image, channels, transformer layers at that level) for SDXL base at 1024^2, CFG = batch 2
UNET_LEVELS = [(4096, 640, 10), (1024, 1280, 60)]


def gemm_leads(args):
    import torch.nn.functional as F

    from minsdxl.kernels import geglu_gemm

    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    levels = UNET_LEVELS if not args.tiny else [(64, 32, 2)]
    log(
        "\n1b. GEMM fusion leads, GPU ms per layer (CUDA-graph replays); saved ms/step = layers x gap; "
        "triton geglu: minsdxl's GEGLU GEMM (saved vs proj+geglu, rel err vs it)"
    )
    log(
        f"{'tokens x2, C':14} {'q,k,v apart':>11} {'qkv fused':>10} {'saved/step':>10} "
        f"{'proj+geglu':>10} {'proj alone':>10} {'saved/step':>10} {'triton geglu':>12} {'rel err':>8} "
        f"{'saved/step':>10}"
    )
    rows = []

    def geglu(x, w, b):  # diffusers' GEGLU: proj to 2 * inner, then hidden * gelu(gate); compiled as in the UNet
        h, gate = F.linear(x, w, b).chunk(2, dim=-1)
        return h * F.gelu(gate)

    geglu_compiled = torch.compile(geglu, fullgraph=True, dynamic=False)
    for tokens, c, layers in levels:
        x = torch.randn(2 * tokens, c, device=dev, dtype=dtype)
        wq, wk, wv = (torch.randn(c, c, device=dev, dtype=dtype) * c**-0.5 for _ in range(3))
        wqkv = torch.cat([wq, wk, wv])
        w1 = torch.randn(8 * c, c, device=dev, dtype=dtype) * c**-0.5  # inner = 4c, proj to 2 * inner
        b1 = torch.zeros(8 * c, device=dev, dtype=dtype)
        row = dict(tokens=tokens, channels=c, layers=layers)
        try:
            row["qkv_apart_ms"] = gpu_ms(lambda: (x @ wq.T, x @ wk.T, x @ wv.T), dev)  # noqa: B023
            row["qkv_fused_ms"] = gpu_ms(lambda: x @ wqkv.T, dev)  # noqa: B023
            row["geglu_ms"] = gpu_ms(lambda: geglu_compiled(x, w1, b1), dev)  # noqa: B023
            row["proj_alone_ms"] = gpu_ms(lambda: F.linear(x, w1, b1), dev)  # noqa: B023  an epilogue's floor
            row["qkv_saved_ms_per_step"] = layers * (row["qkv_apart_ms"] - row["qkv_fused_ms"])
            row["geglu_saved_ms_per_step_at_most"] = layers * (row["geglu_ms"] - row["proj_alone_ms"])
            # minsdxl.compile(fused_geglu=True)'s kernel: the same GEGLU as one GEMM with the epilogue
            ref = geglu_compiled(x, w1, b1).float()
            row["triton_geglu_rel_err"] = (
                (geglu_gemm.geglu(x, w1, b1).float() - ref).abs().max() / ref.abs().max()
            ).item()
            row["triton_geglu_ms"] = gpu_ms(lambda: geglu_gemm.geglu(x, w1, b1), dev)  # noqa: B023
            row["triton_geglu_saved_ms_per_step"] = layers * (row["geglu_ms"] - row["triton_geglu_ms"])
            log(
                f"{str((tokens, c)):14} {row['qkv_apart_ms']:11.4f} {row['qkv_fused_ms']:10.4f} "
                f"{row['qkv_saved_ms_per_step']:10.3f} {row['geglu_ms']:10.4f} {row['proj_alone_ms']:10.4f} "
                f"{row['geglu_saved_ms_per_step_at_most']:10.3f} {row['triton_geglu_ms']:12.4f} "
                f"{row['triton_geglu_rel_err']:8.1e} {row['triton_geglu_saved_ms_per_step']:10.3f}"
            )
        except Exception as e:  # a failure is a result
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"{str((tokens, c)):14} FAILED: {row['error']}")
        rows.append(row)
        RESULTS["gemm_leads"] = rows
        save(args)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# models


def build(args):
    """A full-size (or tiny) random SDXL base as a diffusers pipeline, and a minsdxl model sharing its tensors."""
    from sdxl_testing import full_size_pipeline, minsdxl_from_pipe, tiny_pipeline

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp())
    if args.tiny:
        pipe = tiny_pipeline("base", tmp / "tok").to(args.device, torch.bfloat16 if args.device == "cuda" else None)
    else:
        pipe = full_size_pipeline("base", torch.bfloat16, args.device, tokenizer_root=tmp / "tok")
    pipe.set_progress_bar_config(disable=True)
    model = minsdxl_from_pipe(pipe)
    log(
        f"\nbuilt random SDXL base ({sum(p.numel() for p in pipe.unet.parameters()) / 1e9:.2f} B UNet params, "
        f"{next(pipe.unet.parameters()).dtype}) in {time.perf_counter() - t0:.1f} s"
    )
    return pipe, model


def generate(which, pipe, model, kw, callback=None):
    import minsdxl

    if which == "diffusers":
        gen = torch.Generator("cpu").manual_seed(0)
        return pipe(**kw, generator=gen, callback_on_step_end=callback).images
    return minsdxl.text2img(model, **kw, seed=0, progress=False, callback_on_step_end=callback)


def timed(call, dev):
    """One timed call(callback) that makes images: (first image, ms per denoising step, end-to-end s, ms before
    the first step, ms after the last), from CUDA events (CPU clocks) at callback_on_step_end."""
    stamps = []

    def stamp(*_):
        if dev == "cuda":
            stamps.append(torch.cuda.Event(enable_timing=True))
            stamps[-1].record()
        else:
            stamps.append(time.perf_counter())
        return {}

    t0 = time.perf_counter()
    stamp()  # the GPU is idle here and after the call: the first and last stamps are wall times
    image = call(stamp)[0]
    sync(dev)
    end_s = time.perf_counter() - t0
    stamp()
    sync(dev)  # the last event must have completed before elapsed_time
    ms = [stamps[0].elapsed_time(e) for e in stamps] if dev == "cuda" else [(t - stamps[0]) * 1e3 for t in stamps]
    # stamps: call start, the end of each step, call end
    step_ms = (ms[-2] - ms[1]) / (len(ms) - 3)
    before_ms = ms[1] - step_ms  # prompt encoding, latents, timesteps: before the first step
    after_ms = ms[-1] - ms[-2]  # VAE decode and the PIL images
    return image, step_ms, end_s, before_ms, after_ms


def image_levels(a, b):
    """Mean |difference| of two PIL images in 8-bit levels (None without a reference)."""
    import numpy as np

    if b is None:
        return None
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())


def peak_gib(dev):
    return torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")


def reset_peak(dev):
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------------------------
# 2. parity


def parity(args, pipe, model, dtype):
    """Final latents of both, same weights, prompt and seed; also where (if anywhere) each went non-finite."""
    import minsdxl

    pipe.to(dtype=dtype)
    model.to(dtype=dtype)
    steps = min(args.steps, 10)
    kw = dict(
        prompt="a photo of a cat", height=args.size, width=args.size, num_inference_steps=steps, output_type="latent"
    )
    first_bad = {}

    def watch(side):
        def cb(_, i, t, kw):
            if side not in first_bad and not torch.isfinite(kw["latents"]).all():
                first_bad[side] = i
            return {}

        return cb

    ref = pipe(**kw, generator=torch.Generator("cpu").manual_seed(1), callback_on_step_end=watch("diffusers"))
    ref = ref.images.float()
    got = minsdxl.text2img(model, **kw, seed=1, progress=False, callback_on_step_end=watch("minsdxl")).float()
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    mean = ((got - ref).abs().mean() / ref.abs().mean()).item()
    res = dict(
        steps=steps,
        dtype=str(dtype),
        rel_max_diff=rel,
        rel_mean_diff=mean,
        first_nonfinite_step=first_bad,
        max_abs_ref=ref.abs().max().item(),
        max_abs_got=got.abs().max().item(),
    )
    RESULTS.setdefault("parity", []).append(res)
    log(
        f"\n2. parity, {dtype}, {steps} steps: final latents max|diff|/max|ref| = {rel:.3e}, "
        f"mean|diff|/mean|ref| = {mean:.3e}; max|ref| {res['max_abs_ref']:.3g}, max|ours| {res['max_abs_got']:.3g}; "
        f"first non-finite step {first_bad or 'none'}"
    )
    save(args)


# ------------------------------------------------------------------------------------------------
# 3. offload


def offload_section(args, pipe, model):
    """Peak GPU memory of one image with and without model offload (minsdxl and diffusers), each measured
    with only that library's weights on the GPU. Leaves both on the device (no longer sharing tensors)."""
    dev, rows = args.device, []
    kw = dict(prompt="a photo of a cat", height=args.size, width=args.size, num_inference_steps=min(args.steps, 4))
    log(f"\n3. model offload, {kw['num_inference_steps']} steps: peak GPU memory while generating one image")
    pipe.to("cpu")  # minsdxl's tensors keep the shared GPU storage alive until the model moves too
    for name in ("minsdxl offload", "minsdxl", "diffusers", "diffusers enable_model_cpu_offload"):
        offload = name.endswith("offload")
        if name == "diffusers enable_model_cpu_offload" and dev != "cuda":
            continue  # diffusers' offload needs an accelerator
        if name.startswith("minsdxl"):
            model.to("cpu" if offload else dev)
            model.offload_device = dev if offload else None
            which = "minsdxl"
        else:
            model.to("cpu")
            if offload:
                pipe.enable_model_cpu_offload()
            else:
                pipe.to(dev)
            which = "diffusers"
        reset_peak(dev)
        t0 = time.perf_counter()
        generate(which, pipe, model, kw)
        sync(dev)
        secs = time.perf_counter() - t0
        rows.append(dict(config=name, seconds=secs, peak_gib=peak_gib(dev)))
        log(f"{name:36} {secs:8.2f} s {rows[-1]['peak_gib']:8.2f} GiB")
        RESULTS["offload"] = rows
        save(args)
    model.offload_device = None
    if dev == "cuda":
        pipe.remove_all_hooks()
    pipe.to(dev)
    model.to(dev)


# ------------------------------------------------------------------------------------------------
# 4. end to end


def unique_graphs():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def profile(args, which, pipe, model, kw, name):
    """Top GPU kernels of a 3-step run (the compiled code is reused), written next to the JSON."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        generate(which, pipe, model, {**kw, "num_inference_steps": 3})
        sync(args.device)
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90)
    except Exception:  # newer torch names it device time
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90)
    path = Path(args.out).parent / f"profile_{name}.txt"
    path.write_text(table)
    log(f"   profile of 3 steps ({name}) -> {path}")


def run_configs(args, pipe, model):
    import minsdxl

    dev, size, steps = args.device, args.size, args.steps
    kw = dict(
        prompt="a photo of an astronaut riding a horse",
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=5.0,
    )
    # name, library, attention backend, compile mode (False: eager; "auto": minsdxl.compile's defaults),
    # minsdxl.compile's keywords (text_encoders: compile them too; fused_geglu) and "sdpa_self" (the UNet's
    # self-attention on SDPA, set after compile, before the first call traces it)
    defaults = dict(text_encoders=True)
    configs = [
        ("minsdxl eager (sdpa)", "minsdxl", "sdpa", False, {}),
        ("diffusers eager (sdpa)", "diffusers", None, False, {}),
        ("diffusers compile", "diffusers", None, None, {}),
        ("minsdxl compile defaults (cudagraphs+triton)", "minsdxl", "auto", "auto", defaults),
        # not the issue's baseline (that is plain torch.compile), but the fair question for CUDA graphs
        ("diffusers compile+cudagraphs", "diffusers", None, "reduce-overhead", {}),
    ]
    if args.all or args.only:  # ablations, ~100 s of compiling each: not by default
        # H200 run A: 40.1 ms/step; and the "before ms" of the text encoders compiled or not
        configs.insert(2, ("minsdxl compile+triton, no graphs", "minsdxl", "triton", None, defaults))
        configs.append(("minsdxl compile defaults, eager text encoders", "minsdxl", "auto", "auto", {}))
        # the H100 attention table: cuDNN (SDPA's default on Hopper) beats Triton at 4096 keys, not at 77
        configs.append(
            (
                "minsdxl compile defaults, SDPA self-attention",
                "minsdxl",
                "auto",
                "auto",
                {**defaults, "sdpa_self": True},
            )
        )
        # the GEMM lead of 1b: GEGLU's projection and h * gelu(gate) as one Triton GEMM
        configs.append(
            ("minsdxl compile defaults, fused GEGLU", "minsdxl", "auto", "auto", {**defaults, "fused_geglu": True})
        )
    log(f"\n4. SDXL base, {model.unet.dtype}, {size}x{size}, {steps} steps, CFG (batch 2 per UNet call), device {dev}")
    log(
        f"{'config':44} {'first run s':>11} {'ms/step':>8} {'end-to-end s':>12} {'before ms':>9} {'after ms':>8} "
        f"{'peak GiB':>9} {'new graphs':>10} {'levels vs 1st':>13}"
    )
    rows = RESULTS.setdefault("sdxl", [])
    first_image = None
    for name, which, backend, mode, options in configs:
        if args.only and not any(re.search(o, name) for o in args.only):  # regular expressions
            continue
        if args.skip_compile and mode is not False:
            continue
        try:
            minsdxl.set_attention(backend if backend and backend != "auto" else "sdpa", model)
            if mode is not False:
                torch._dynamo.reset()
                if which == "minsdxl":
                    keywords = {"text_encoders": False, **{k: v for k, v in options.items() if k != "sdpa_self"}}
                    minsdxl.compile(model, mode=mode, attention_backend=backend, **keywords)
                    if options.get("sdpa_self"):  # traced at the first call: set before it
                        for n, m in model.unet.named_modules():
                            if n.endswith(".attn1"):
                                m.attention_backend = "sdpa"
                else:
                    pipe.unet.compile(fullgraph=True, mode=mode)
                    pipe.vae.decoder.compile(fullgraph=True, mode=mode)
            reset_peak(dev)
            t0 = time.perf_counter()
            generate(which, pipe, model, kw)  # warm-up (compiles when compiled)
            if mode in ("auto", "reduce-overhead") and (which == "diffusers" or model.cuda_graphs):
                # CUDA graphs record on a graph's 2nd call: the VAE decoder's
                generate(which, pipe, model, {**kw, "num_inference_steps": 2})
            sync(dev)
            first = time.perf_counter() - t0
            graphs = unique_graphs()
            call = functools.partial(generate, which, pipe, model, kw)
            image, step_ms, end_s, before_ms, after_ms = timed(call, dev)
            row = dict(
                config=name,
                first_run_s=first,
                ms_per_step=step_ms,
                end_to_end_s=end_s,
                before_steps_ms=before_ms,
                after_steps_ms=after_ms,
                # same seed and weights: how far compiled / CUDA-graph / Triton output is from the first row's
                mean_abs_levels_vs_first=image_levels(image, first_image),
                peak_gib=peak_gib(dev),
                new_graphs_in_timed_run=unique_graphs() - graphs,
            )
            rows.append(row)
            first_image = image if first_image is None else first_image
            log(
                f"{name:44} {first:11.1f} {step_ms:8.1f} {end_s:12.3f} {before_ms:9.1f} {after_ms:8.1f} "
                f"{row['peak_gib']:9.2f} {row['new_graphs_in_timed_run']:10d} "
                f"{row['mean_abs_levels_vs_first'] or 0.0:13.2f}"
            )
            save(args)
            if args.profile and mode in (None, "auto"):
                profile(args, which, pipe, model, kw, which)
            if args.lora and which == "minsdxl" and backend == "auto" and options == defaults:
                lora_check(args, model, kw)
        except Exception as e:  # report and go on to the next config
            row_failed(rows, name, e)
            save(args)
        finally:
            if mode is not False:  # back to eager for the next config
                uncompile(model, pipe.unet, pipe.vae.decoder)
                minsdxl.speed.set_fused_geglu(model, False)
    minsdxl.set_attention("sdpa", model)


def row_failed(rows: list, name: str, e: Exception) -> None:
    rows.append(dict(config=name, error=f"{type(e).__name__}: {str(e)[:500]}"))
    log(f"{name:44} FAILED: {rows[-1]['error']}")


def section_row(name, generate_kw, kw, dev, again_steps=0):
    """A row of sections 5 and 6: a warm-up call (compiles when compiled; again with `again_steps` steps where
    CUDA graphs record on a 2nd call), then the timed one. (row, image); row["line"] is its log line so far."""
    reset_peak(dev)
    t0 = time.perf_counter()
    generate_kw(kw)
    if again_steps:
        generate_kw({**kw, "num_inference_steps": again_steps})
    sync(dev)
    first, graphs = time.perf_counter() - t0, unique_graphs()
    image, step_ms, end_s, _, _ = timed(functools.partial(generate_kw, kw), dev)
    row = dict(config=name, first_run_s=first, ms_per_step=step_ms, end_to_end_s=end_s, peak_gib=peak_gib(dev))
    row["new_graphs_in_timed_run"] = unique_graphs() - graphs
    row["line"] = f"{name:44} {first:11.1f} {step_ms:8.1f} {end_s:12.3f} {row['peak_gib']:9.2f}"
    return row, image


def versus(out, row, image, reference, which, key, width, extra="") -> object:
    """A row of sections 6 and 7 recorded and logged with its image's mean |difference| (`key`) from the section's
    first image (the reference library's; None for that library's own rows). Returns the reference image."""
    reference = image if reference is None else reference
    levels = row[key] = image_levels(image, reference) if which == "minsdxl" else None
    out["rows"].append(row)
    log(f"{row['line']}{extra} {'-' if levels is None else f'{levels:.2f}':>{width}}")
    return reference


def controlnet_section(args, pipe, model):
    """5. (--controlnet) SDXL base + one ControlNet of controlnet-canny-sdxl-1.0's shapes (diffusers' from_unet,
    random control convs so its residuals count): final-latent parity in eager mode, then ms per step and end to
    end, eager and compiled, both libraries (minsdxl.compile(model, controlnet=net): CUDA graphs + Triton on
    CUDA; diffusers: UNet, ControlNet and VAE decoder torch.compile'd)."""
    import diffusers
    import numpy as np
    import PIL.Image
    from sdxl_testing import randomize_

    import minsdxl

    dev, dtype = args.device, next(pipe.unet.parameters()).dtype
    channels = (4, 8, 8, 16) if args.tiny else (16, 32, 96, 256)  # controlnet-canny-sdxl-1.0's hint encoder
    net = diffusers.ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=channels)
    net = randomize_(net, 5).to(dev, dtype).eval()
    folder = Path(tempfile.mkdtemp()) / "controlnet"
    net.save_pretrained(folder)
    ours = minsdxl.load_controlnet(folder, dtype=dtype, device=dev)
    cpipe = diffusers.StableDiffusionXLControlNetPipeline(**pipe.components, controlnet=net)
    cpipe.set_progress_bar_config(disable=True)
    edges = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    kw = dict(prompt="a house", image=PIL.Image.fromarray(edges), num_inference_steps=args.steps)
    kw |= dict(height=args.size, width=args.size, controlnet_conditioning_scale=0.5)

    def generate_cn(which, kw, callback=None):
        if which == "diffusers":
            gen = torch.Generator("cpu").manual_seed(0)
            return cpipe(**kw, generator=gen, callback_on_step_end=callback).images
        return minsdxl.text2img(model, **kw, controlnet=ours, seed=0, progress=False, callback_on_step_end=callback)

    few = {**kw, "num_inference_steps": min(args.steps, 10), "output_type": "latent"}
    ref, got = (generate_cn(w, few).float() for w in ("diffusers", "minsdxl"))
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    out = RESULTS.setdefault("controlnet", {"parity_rel_max_diff": rel, "rows": []})
    log(f"\n5. ControlNet ({sum(p.numel() for p in net.parameters()) / 1e9:.2f} B params), {dtype}: parity {rel:.3e}")
    log(f"{'config':44} {'first run s':>11} {'ms/step':>8} {'end-to-end s':>12} {'peak GiB':>9} {'new graphs':>10}")
    for name, which, compiled in (
        ("controlnet: minsdxl eager", "minsdxl", False),
        ("controlnet: diffusers eager", "diffusers", False),
        ("controlnet: minsdxl compile defaults", "minsdxl", True),
        ("controlnet: diffusers compile", "diffusers", True),
    ):
        if args.skip_compile and compiled:
            continue
        try:
            if compiled:
                torch._dynamo.reset()
                if which == "minsdxl":
                    minsdxl.compile(model, controlnet=ours, text_encoders=False)
                else:
                    for m in (cpipe.unet, cpipe.controlnet, cpipe.vae.decoder):
                        m.compile(fullgraph=True)
            graphs = compiled and which == "minsdxl" and model.cuda_graphs
            row, _ = section_row(name, functools.partial(generate_cn, which), kw, dev, 2 if graphs else 0)
            out["rows"].append(row)
            log(f"{row['line']} {row['new_graphs_in_timed_run']:10d}")
        except Exception as e:  # report and go on
            row_failed(out["rows"], name, e)
        finally:
            save(args)
            if compiled:
                uncompile(model, ours, cpipe.unet, cpipe.controlnet, cpipe.vae.decoder)


def deepcache_section(args, pipe, model):
    """6. (--deepcache N:BRANCH) DeepCache in both libraries (see the module's text)."""
    from DeepCache import DeepCacheSDHelper

    import minsdxl

    dev, (interval, branch) = args.device, [int(v) for v in args.deepcache.split(":")]
    kw = dict(prompt="a photo of an astronaut riding a horse", height=args.size, width=args.size)
    kw |= dict(num_inference_steps=args.steps, guidance_scale=5.0)
    out = RESULTS.setdefault("deepcache", {"interval": interval, "branch": branch, "rows": []})
    log(f"\n6. DeepCache, a full UNet every {interval} steps, branch {branch} between")
    log(f"{'config':44} {'first run s':>11} {'ms/step':>8} {'end-to-end s':>12} {'peak GiB':>9} {'levels vs pkg':>13}")
    reference = None
    for name, which, compiled in (
        ("deepcache: diffusers eager + DeepCache package", "diffusers", False),
        ("deepcache: minsdxl eager", "minsdxl", False),
        ("deepcache: minsdxl compile defaults", "minsdxl", True),
    ):
        if args.skip_compile and compiled:
            continue
        helper = DeepCacheSDHelper(pipe=pipe) if which == "diffusers" else None
        try:
            if helper is not None:
                helper.set_params(cache_interval=interval, cache_branch_id=branch)
                helper.enable()
            else:
                minsdxl.deepcache.enable(model, cache_interval=interval, cache_branch_id=branch)
            if compiled:
                torch._dynamo.reset()
                minsdxl.compile(model, text_encoders=True)
            # CUDA graphs record on a 2nd call: the full and the cached UNet's
            again = 2 * interval if compiled and model.cuda_graphs else 0
            row, image = section_row(name, functools.partial(generate, which, pipe, model), kw, dev, again)
            reference = versus(out, row, image, reference, which, "mean_abs_levels_vs_package", 13)
        except Exception as e:  # report and go on
            row_failed(out["rows"], name, e)
        finally:
            save(args)
            if helper is not None:
                helper.disable()
            minsdxl.deepcache.disable(model)
            if compiled:
                uncompile(model)


def storage_section(args, pipe, model):
    """7. (--storage-dtype fp8) float8 weight storage in both libraries (see the module's text)."""
    import copy

    import diffusers

    import minsdxl

    dev, dtype = args.device, next(pipe.unet.parameters()).dtype
    storage = {"fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[args.storage_dtype]
    kw = dict(prompt="a photo of an astronaut riding a horse", height=args.size, width=args.size)
    kw |= dict(num_inference_steps=args.steps, guidance_scale=5.0)
    out = RESULTS.setdefault("storage", {"storage_dtype": str(storage), "rows": []})
    log(f"\n7. UNet stored in {storage}, computed in {dtype}")
    log(
        f"{'config':44} {'first run s':>11} {'ms/step':>8} {'end-to-end s':>12} {'peak GiB':>9} {'UNet GiB':>8} "
        f"{'levels vs diffusers':>19}"
    )
    unet = copy.deepcopy(pipe.unet)
    unet.enable_layerwise_casting(storage_dtype=storage, compute_dtype=dtype)
    narrow_pipe = diffusers.StableDiffusionXLPipeline(**{**pipe.components, "unet": unet})
    narrow_pipe.set_progress_bar_config(disable=True)
    narrow = copy.copy(model)  # the same encoders and VAE, a float8 copy of the UNet
    narrow.unet = minsdxl.layerwise.enable(copy.deepcopy(model.unet), storage, dtype)
    reference = None
    for name, which, compiled in (
        ("storage: diffusers eager, layerwise casting", "diffusers", False),
        ("storage: minsdxl eager", "minsdxl", False),
        ("storage: minsdxl compile defaults", "minsdxl", True),
    ):
        if args.skip_compile and compiled:
            continue
        try:
            if compiled:
                torch._dynamo.reset()
                minsdxl.compile(narrow, text_encoders=True)
            again = 2 if compiled and narrow.cuda_graphs else 0  # CUDA graphs record on a 2nd call
            row, image = section_row(name, functools.partial(generate, which, narrow_pipe, narrow), kw, dev, again)
            held = (narrow_pipe if which == "diffusers" else narrow).unet.parameters()
            row["unet_gib"] = sum(p.numel() * p.element_size() for p in held) / 2**30
            line = f" {row['unet_gib']:8.2f}"
            reference = versus(out, row, image, reference, which, "mean_abs_levels_vs_diffusers", 19, line)
        except Exception as e:  # report and go on
            row_failed(out["rows"], name, e)
        finally:
            save(args)
            if compiled:
                uncompile(narrow)


def compiled_parts(model) -> list:
    """What minsdxl.compile compiles (its defaults)."""
    return [model.unet, model.vae.decoder, model.text_encoder, model.text_encoder_2]


def uncompile(model, *others) -> None:
    """Back to eager for the next row: the model's compiled parts and `others` (diffusers' modules) as built."""
    torch._dynamo.reset()
    for m in (*compiled_parts(model), *others):
        m._compiled_call_impl = None
    model.cuda_graphs = False


def lora_check(args, model, kw):
    """(--lora) A LoRA loaded into a model that minsdxl.compile has compiled with CUDA graphs (the weights
    are written in place on a GPU): the output must change, without new graphs, match eager with the same
    LoRA as closely as compiled matches eager without it, and be bit-equal again after unloading."""
    from sdxl_testing import kohya_lora, lora_layers, random_lora_pairs

    import minsdxl

    dev = args.device
    small = {**kw, "num_inference_steps": 4, "output_type": "latent"}
    parts = compiled_parts(model)

    def latents():
        out = minsdxl.text2img(model, **small, seed=0, progress=False).float().clone()
        sync(dev)
        return out

    def eager(fn):  # the same model without its compiled code (kept aside and put back)
        kept, graphs = [m._compiled_call_impl for m in parts], model.cuda_graphs
        for m in parts:
            m._compiled_call_impl = None
        model.cuda_graphs = False
        try:
            return fn()
        finally:
            for m, k in zip(parts, kept):
                m._compiled_call_impl = k
            model.cuda_graphs = graphs

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    res = {}
    try:
        sd = kohya_lora(model, random_lora_pairs(lora_layers(model), rank=4), alpha=4)
        base, graphs = latents(), unique_graphs()
        base_eager = eager(latents)
        t0 = time.perf_counter()
        minsdxl.load_lora_weights(model, sd)
        sync(dev)
        res["layers"], res["load_s"] = len(sd) // 3, time.perf_counter() - t0
        with_lora = latents()
        with_lora_eager = eager(latents)
        res["new_graphs"] = unique_graphs() - graphs
        res["lora_changes_output_rel"] = rel(with_lora, base)
        res["compiled_vs_eager_rel_with_lora"] = rel(with_lora, with_lora_eager)
        res["compiled_vs_eager_rel_without"] = rel(base, base_eager)
        t0 = time.perf_counter()
        minsdxl.unload_lora_weights(model)
        sync(dev)
        res["unload_s"] = time.perf_counter() - t0
        res["bit_equal_after_unload"] = bool(torch.equal(latents(), base))
        log(f"   LoRA on minsdxl.compile's defaults (4 steps, latents): {res}")
    except Exception as e:  # report and go on
        res["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        log(f"   LoRA check FAILED: {res['error']}")
        if minsdxl.get_active_adapters(model):
            minsdxl.unload_lora_weights(model)
    RESULTS["lora_under_cudagraphs"] = res
    save(args)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_bench.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--tiny", action="store_true", help="tiny random model: a dry run of the script")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--skip-gemm", action="store_true", help="skip the GEMM fusion leads (1b)")
    ap.add_argument(
        "--only",
        nargs="*",
        help="configs to time: regular expressions searched in their names (default: all but ablations)",
    )
    ap.add_argument("--all", action="store_true", help="also time the ablation rows (see 4. above)")
    ap.add_argument("--offload", action="store_true", help="also measure model offload's peak memory")
    ap.add_argument("--controlnet", action="store_true", help="also time SDXL + a ControlNet (5.), both libraries")
    ap.add_argument("--profile", action="store_true", help="top GPU kernels of each compiled library")
    ap.add_argument("--deepcache", metavar="N:BRANCH", help="also time DeepCache (6.), both libraries, e.g. 3:0")
    ap.add_argument("--storage-dtype", choices=("fp8", "fp8_e5m2"), help="also time float8 weight storage (7.)")
    ap.add_argument(
        "--lora",
        action="store_true",
        help="load and unload a random LoRA into minsdxl.compile's defaults (CUDA graphs): in place, no new graphs",
    )
    args = ap.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        RESULTS["device"] = torch.cuda.get_device_name()
    import triton

    RESULTS["torch"], RESULTS["triton"] = torch.__version__, triton.__version__
    log(f"torch {torch.__version__}, triton {triton.__version__}, device {RESULTS.get('device', args.device)}")
    t0 = time.perf_counter()
    if not args.skip_attention:
        fall_back_if_broken(attention_section(args))
    if not args.skip_gemm:
        gemm_leads(args)
        log(f"   [{time.perf_counter() - t0:.0f} s]")
    pipe, model = build(args)
    dtype = next(pipe.unet.parameters()).dtype
    if not args.skip_parity:  # eager, before anything is compiled; fp32 with TF32 off is the tight tier
        parity(args, pipe, model, dtype)
        parity(args, pipe, model, torch.float32)
        pipe.to(dtype=dtype)
        model.to(dtype=dtype)
    log(f"   [{time.perf_counter() - t0:.0f} s]")
    if args.offload:
        offload_section(args, pipe, model)
        log(f"   [{time.perf_counter() - t0:.0f} s]")
    run_configs(args, pipe, model)
    if args.controlnet:
        controlnet_section(args, pipe, model)
    if args.deepcache:
        deepcache_section(args, pipe, model)
    if args.storage_dtype:
        storage_section(args, pipe, model)
    log(f"\ndone in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
