"""One-call GPU benchmark: Triton attention vs SDPA, and SDXL base end to end, minsdxl vs diffusers.

    python scripts/gpu_bench.py [--out bench.json] [--steps 30] [--size 1024] [--skip-compile]
    python scripts/gpu_bench.py --tiny --device cpu      # a dry run of every code path, no GPU

Prints a table as it goes (a time-out still leaves numbers) and writes JSON after every section:
 1. kernel correctness vs SDPA (fp16, bf16) at SDXL's attention shapes;
 2. attention TFLOP/s at 1024 and 4096 tokens, Triton vs SDPA's flash backend;
 3. full-size random SDXL base, bf16, CFG: ms per UNet step and seconds end to end (text encoders +
    N steps + VAE decode) for minsdxl eager, minsdxl compiled + Triton, diffusers eager (SDPA),
    diffusers + torch.compile; peak GPU memory of each;
 4. parity: minsdxl vs diffusers final latents, same weights and seed (relative max difference);
 5. (--offload) peak GPU memory of one image with and without model offload, both libraries.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # test helpers: random weights, tiny configs, tokenizer folders

RESULTS: dict = {}


def log(*a):
    print(*a, flush=True)


def save(args):
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(RESULTS, indent=2, default=str))


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench(fn, device, reps=10, warmup=2):
    """Mean milliseconds per call (CUDA-synchronised wall clock)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps * 1e3


def attention_section(args):
    import torch.nn.functional as F

    from minsdxl.kernels import flash_attention

    dev = args.device
    shapes = [(2, 10, 4096, 4096, 64), (2, 10, 4096, 77, 64), (2, 20, 1024, 1024, 64), (2, 20, 1024, 77, 64)]
    if args.tiny:
        shapes = [(1, 2, 64, 64, 64), (1, 2, 64, 77, 64)]
    dtypes = [torch.float16, torch.bfloat16] if dev == "cuda" else [torch.float32]
    log("\n1-2. attention: Triton kernel vs SDPA (layout [B, L, H*D] viewed as [B, H, L, D])")
    log(
        f"{'dtype':9} {'B,H,Lq,Lk,D':22} {'max|err|':>9} {'rel':>9} {'triton ms':>10} {'sdpa ms':>9} "
        f"{'triton TF/s':>11} {'sdpa TF/s':>9}"
    )
    rows = []
    for dtype in dtypes:
        for b, h, lq, lk, d in shapes:

            def mk(n, b=b, h=h, d=d, dtype=dtype):
                return torch.randn(b, n, h * d, device=dev, dtype=dtype).view(b, n, h, d).transpose(1, 2)

            q, k, v = mk(lq), mk(lk), mk(lk)
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            out = flash_attention(q, k, v)
            err = (out.float() - ref).abs().max().item()
            rel = err / ref.abs().max().item()
            flops = 4 * b * h * lq * lk * d
            t_tri = bench(lambda: flash_attention(q, k, v), dev)  # noqa: B023
            if dev == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    t_ref = bench(lambda: F.scaled_dot_product_attention(q, k, v), dev)  # noqa: B023
            else:
                t_ref = bench(lambda: F.scaled_dot_product_attention(q, k, v), dev)  # noqa: B023
            row = dict(
                dtype=str(dtype),
                shape=(b, h, lq, lk, d),
                max_abs_err=err,
                rel_err=rel,
                triton_ms=t_tri,
                sdpa_ms=t_ref,
                triton_tflops=flops / t_tri / 1e9,
                sdpa_tflops=flops / t_ref / 1e9,
            )
            rows.append(row)
            log(
                f"{str(dtype)[6:]:9} {str((b, h, lq, lk, d)):22} {err:9.2e} {rel:9.2e} {t_tri:10.3f} {t_ref:9.3f} "
                f"{row['triton_tflops']:11.1f} {row['sdpa_tflops']:9.1f}"
            )
    RESULTS["attention"] = rows
    save(args)


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


def run_configs(args, pipe, model):
    import minsdxl
    from minsdxl import attention

    dev, size, steps = args.device, args.size, args.steps
    kw = dict(
        prompt="a photo of an astronaut riding a horse",
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=5.0,
    )
    cfg = model.unet.config
    lat = size // 8
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn(2, 4, lat, lat, device=dev, dtype=model.unet.dtype, generator=g)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, device=dev, dtype=x.dtype, generator=g)
    text = torch.randn(2, 1280 if not args.tiny else 32, device=dev, dtype=x.dtype, generator=g)
    ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, device=dev, dtype=x.dtype)
    t = torch.tensor(500.0, device=dev)

    def unet_step(which):
        if which == "diffusers":
            return lambda: pipe.unet(x, t, ctx, added_cond_kwargs={"text_embeds": text, "time_ids": ids}).sample
        return lambda: model.unet(x, t, ctx, text, ids)

    def e2e(which):
        if which == "diffusers":
            return lambda: pipe(**kw, generator=torch.Generator("cpu").manual_seed(0), output_type="pil").images
        return lambda: minsdxl.text2img(model, **kw, seed=0, progress=False)

    configs = [("minsdxl eager (sdpa)", "minsdxl", "sdpa", False), ("diffusers eager (sdpa)", "diffusers", None, False)]
    if not args.skip_compile:
        configs += [
            ("minsdxl compile+triton", "minsdxl", "triton", True),
            ("diffusers compile", "diffusers", None, True),
        ]
    log(f"\n3. SDXL base, {x.dtype}, {size}x{size}, {steps} steps, CFG (batch 2 per UNet call), device {dev}")
    log(f"{'config':26} {'first run s':>11} {'ms/UNet step':>12} {'end-to-end s':>12} {'peak GiB':>9}")
    rows = RESULTS.setdefault("sdxl", [])
    for name, which, backend, compiled in configs:
        if args.only and not any(o in name for o in args.only):
            continue
        if backend:
            attention.set_backend(backend)
        if compiled:
            if which == "minsdxl":
                minsdxl.compile(model)
            else:
                pipe.unet.compile(fullgraph=True)
                pipe.vae.decoder.compile(fullgraph=True)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        e2e(which)()  # warm-up (compiles when compiled)
        sync(dev)
        first = time.perf_counter() - t0
        step_ms = bench(unet_step(which), dev, reps=5 if args.tiny else 10)
        end_s = bench(e2e(which), dev, reps=1, warmup=0) / 1e3
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
        rows.append(dict(config=name, first_run_s=first, ms_per_unet_step=step_ms, end_to_end_s=end_s, peak_gib=peak))
        log(f"{name:26} {first:11.1f} {step_ms:12.1f} {end_s:12.2f} {peak:9.2f}")
        save(args)
    attention.set_backend("sdpa")


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
        f"\n4. parity, {dtype}, {steps} steps: final latents max|diff|/max|ref| = {rel:.3e}, "
        f"mean|diff|/mean|ref| = {mean:.3e}; max|ref| {res['max_abs_ref']:.3g}, max|ours| {res['max_abs_got']:.3g}; "
        f"first non-finite step {first_bad or 'none'}"
    )
    save(args)


def offload_section(args, pipe, model):
    """5. peak GPU memory of one image with and without model offload (minsdxl and diffusers)."""
    import minsdxl

    kw = dict(prompt="a photo of a cat", height=args.size, width=args.size, num_inference_steps=min(args.steps, 4))
    dev, rows = args.device, []
    log(f"\n5. model offload, {kw['num_inference_steps']} steps: peak GPU memory while generating one image")
    for name in ("minsdxl", "minsdxl offload", "diffusers", "diffusers enable_model_cpu_offload"):
        offload = name.endswith("offload")
        if name.startswith("diffusers") and offload and dev != "cuda":
            continue  # diffusers' offload needs an accelerator
        if name.startswith("minsdxl"):
            model.to("cpu" if offload else dev)
            model.offload_device = dev if offload else None
            run = lambda: minsdxl.text2img(model, **kw, seed=0, progress=False)  # noqa: E731
        else:
            if offload:
                pipe.enable_model_cpu_offload()
            else:
                pipe.to(dev)
            run = lambda: pipe(**kw, generator=torch.Generator("cpu").manual_seed(0))  # noqa: E731
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        run()
        sync(dev)
        secs = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
        rows.append(dict(config=name, seconds=secs, peak_gib=peak))
        log(f"{name:36} {secs:8.2f} s {peak:8.2f} GiB")
    model.offload_device = None
    RESULTS["offload"] = rows
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
    ap.add_argument("--only", nargs="*", help="config names to time (default: all)")
    ap.add_argument("--offload", action="store_true", help="also measure model offload's peak memory")
    args = ap.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        RESULTS["device"] = torch.cuda.get_device_name()
    RESULTS["torch"] = torch.__version__
    log(f"torch {torch.__version__}, device {RESULTS.get('device', args.device)}")
    if not args.skip_attention:
        attention_section(args)
    pipe, model = build(args)
    dtype = next(pipe.unet.parameters()).dtype
    if not args.skip_parity:  # eager, before anything is compiled; fp32 with TF32 off is the tight tier
        parity(args, pipe, model, dtype)
        parity(args, pipe, model, torch.float32)
        pipe.to(dtype=dtype)
        model.to(dtype=dtype)
    run_configs(args, pipe, model)
    if args.offload:  # last: it moves models around (and diffusers' offload hooks stay installed)
        offload_section(args, pipe, model)
    log("\ndone")


if __name__ == "__main__":
    main()
