"""LoRA benchmark: full-size SDXL base (random weights, the fp16 diffusers folder bench_load.py writes)
and a random kohya-format LoRA of rank 32 on every UNet transformer layer (proj_in/out, attention,
feed-forward) and both text encoders' attention and MLP layers, as typical SDXL LoRAs are. minsdxl vs
diffusers (+ PEFT), each in a fresh process, same run; prints seconds per operation and peak RSS.

minsdxl merges on load (the weights then cost nothing per step); diffusers keeps PEFT side branches
until fuse_lora, so its comparable "ready to generate at full speed" figure is load + fuse.

    python scripts/bench_lora.py [--workdir /tmp/minsdxl_bench] [--rank 32] [--dtype fp16]
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
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def write_lora(work: Path, rank: int) -> Path:
    path = work / f"lora_r{rank}.safetensors"
    if path.exists():
        return path
    from sdxl_testing import kohya_lora, lora_layers

    import minsdxl
    from minsdxl.checkpoint import save_safetensors

    model = minsdxl.load(work / "sdxl-base", dtype=torch.float16)
    layers = lora_layers(model, only=lambda n: "attentions" in n or "self_attn" in n or ".mlp." in n)
    g = torch.Generator().manual_seed(0)
    pairs = {
        (c, n): (
            (torch.randn(rank, *s[1:], generator=g) * 0.01).half(),
            (torch.randn(s[0], rank, *(1,) * (len(s) - 2), generator=g) * 0.01).half(),
        )
        for c, n, s in layers
    }
    save_safetensors(kohya_lora(model, pairs, alpha=rank / 2), path)
    n = sum(d.numel() + u.numel() for d, u in pairs.values())
    adapted = sum(torch.Size(s).numel() for _, _, s in layers)
    print(f"wrote {path.name}: {len(pairs)} layers ({adapted / 1e9:.2f} B weights adapted), {n / 1e6:.0f} M values")
    return path


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _anon_gib() -> float:
    """Anonymous resident memory now (RssAnon): what the process holds beyond file pages, which a
    memory-mapped checkpoint's untouched weights are (peak RSS counts those too)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon:"))) / 2**20


def measure(lib: str, work: Path, lora: Path, dtype):
    t0 = time.perf_counter()
    out = {}
    if lib == "minsdxl":
        import minsdxl

        m = minsdxl.load(work / "sdxl-base", dtype=dtype)
        out["model_load_s"] = time.perf_counter() - t0
        w = m.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q.weight
        before = w.detach().clone()
        out["load_lora_s"] = _timed(lambda: minsdxl.load_lora_weights(m, lora, adapter_name="x"))
        out["ready_s"] = out["load_lora_s"]  # merged: full speed from here
        out["anon_gib"] = _anon_gib()
        out["reweight_s"] = _timed(lambda: minsdxl.set_adapters(m, "x", 0.5))
        out["unload_s"] = _timed(lambda: minsdxl.unload_lora_weights(m))
        w = m.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q.weight
        out["exact_unload"] = bool(torch.equal(w, before))
    else:
        import diffusers

        p = diffusers.StableDiffusionXLPipeline.from_pretrained(
            work / "sdxl-base", variant="fp16", torch_dtype=dtype, local_files_only=True
        )
        out["model_load_s"] = time.perf_counter() - t0
        w = p.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q
        before = w.weight.detach().clone()
        out["load_lora_s"] = _timed(lambda: p.load_lora_weights(lora, adapter_name="x"))
        out["reweight_s"] = _timed(lambda: p.set_adapters(["x"], [0.5]))
        out["fuse_s"] = _timed(lambda: p.fuse_lora(lora_scale=1.0))
        out["ready_s"] = out["load_lora_s"] + out["fuse_s"]
        out["anon_gib"] = _anon_gib()
        out["unload_s"] = _timed(lambda: (p.unfuse_lora(), p.unload_lora_weights()))
        w = p.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q
        out["exact_unload"] = bool(torch.equal(getattr(w, "base_layer", w).weight, before))
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/minsdxl_bench")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.workdir)
    if args.measure:
        return measure(args.measure, work, work / f"lora_r{args.rank}.safetensors", DTYPES[args.dtype])
    from bench_load import write_model

    work.mkdir(parents=True, exist_ok=True)
    write_model(work)
    write_lora(work, args.rank)
    about = f"{args.dtype}, LoRA rank {args.rank}; {os.cpu_count()} CPUs; torch {torch.__version__}"
    print(f"\nSDXL base, random weights, {about}")
    cols = (
        "model_load_s",
        "load_lora_s",
        "fuse_s",
        "ready_s",
        "reweight_s",
        "unload_s",
        "exact_unload",
        "anon_gib",
        "peak_rss_gib",
    )
    print(f"{'library':9} " + " ".join(f"{c:>13}" for c in cols))
    for lib in ("diffusers", "minsdxl"):
        cmd = [sys.executable, __file__, "--workdir", str(work), "--rank", str(args.rank), "--dtype", args.dtype]
        out = subprocess.run([*cmd, "--measure", lib], capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            print(f"{lib}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        cells = [f"{r[c]:13.2f}" if isinstance(r.get(c), float) else f"{str(r.get(c, '-')):>13}" for c in cols]
        print(f"{lib:9} " + " ".join(cells), flush=True)
    print("ready_s: LoRA applied and the model at full speed (diffusers: load + fuse_lora; minsdxl merges on load)")
    print("anon_gib: anonymous memory once ready; peak_rss_gib also counts memory-mapped file pages")


if __name__ == "__main__":
    main()
