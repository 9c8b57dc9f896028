"""The one-call GPU benchmark is run on a lent machine with minutes of budget: its every timed code
path (build, parity, eager and compiled rows of both libraries, the JSON) must already work, so CI
runs its CPU dry run on the tiny random model."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_dry_run_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_bench.py"), "--tiny", "--device", "cpu", "--skip-attention"]
    cmd += ["--size", "64", "--steps", "3", "--out", str(out), "--all", "--lora", "--controlnet"]  # ablations too
    cmd += ["--deepcache", "2:4", "--storage-dtype", "fp8"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [p["rel_max_diff"] <= 1e-5 for p in res["parity"]] == [True, True]  # bf16 tier runs in fp32 on CPU
    rows = {r["config"]: r for r in res["sdxl"]}
    assert list(rows) == [
        "minsdxl eager (sdpa)",
        "diffusers eager (sdpa)",
        "minsdxl compile+triton, no graphs",
        "diffusers compile",
        "minsdxl compile defaults (cudagraphs+triton)",
        "diffusers compile+cudagraphs",
        "minsdxl compile defaults, eager text encoders",
        "minsdxl compile defaults, SDPA self-attention",
        "minsdxl compile defaults, fused GEGLU",
    ]
    for name, r in rows.items():
        assert "error" not in r, (name, r["error"])
        assert r["new_graphs_in_timed_run"] == 0, name  # compiled once, reused by the timed run
        assert r["ms_per_step"] > 0 and r["end_to_end_s"] > 0 and r["after_steps_ms"] > 0, name
    # same seed, fp32: every row draws the first row's image (a mean of a few rounding flips at most)
    assert rows["minsdxl eager (sdpa)"]["mean_abs_levels_vs_first"] is None
    assert all(r["mean_abs_levels_vs_first"] < 0.01 for r in list(rows.values())[1:])
    # the GEMM fusion leads ran (their sizes shrink with --tiny), minsdxl's GEGLU GEMM too (fp32 on CPU)
    assert all("error" not in r and r["qkv_fused_ms"] > 0 and r["proj_alone_ms"] > 0 for r in res["gemm_leads"])
    assert all(r["triton_geglu_ms"] > 0 and r["triton_geglu_rel_err"] <= 1e-5 for r in res["gemm_leads"])
    # a LoRA loaded into the compiled model: used (output changed), no recompiles, compiled = eager with it
    # (fp32 inductor reordering), and unloading gives the very output of before
    lora = res["lora_under_cudagraphs"]
    assert "error" not in lora, lora
    assert lora["new_graphs"] == 0 and lora["lora_changes_output_rel"] > 1e-2 and lora["bit_equal_after_unload"]
    assert lora["compiled_vs_eager_rel_with_lora"] <= 1e-5
    # SDXL + a ControlNet: same latents as diffusers, every row timed, compiled once
    cn = res["controlnet"]
    assert cn["parity_rel_max_diff"] <= 1e-5  # fp32 on the CPU
    assert [r["config"] for r in cn["rows"]] == [
        "controlnet: minsdxl eager",
        "controlnet: diffusers eager",
        "controlnet: minsdxl compile defaults",
        "controlnet: diffusers compile",
    ]
    for r in cn["rows"]:
        assert "error" not in r and r["ms_per_step"] > 0 and r["new_graphs_in_timed_run"] == 0, r
    # DeepCache: both libraries draw the same image (fp32 on the CPU), every row timed
    dc = res["deepcache"]
    assert [r["config"] for r in dc["rows"]] == [
        "deepcache: diffusers eager + DeepCache package",
        "deepcache: minsdxl eager",
        "deepcache: minsdxl compile defaults",
    ]
    assert all("error" not in r and r["ms_per_step"] > 0 for r in dc["rows"]), dc["rows"]
    assert all(r["mean_abs_levels_vs_package"] < 0.01 for r in dc["rows"][1:])
    # float8 storage: minsdxl draws diffusers' image (the same rounded weights), the UNet a quarter of fp32
    st = res["storage"]
    assert [r["config"] for r in st["rows"]] == [
        "storage: diffusers eager, layerwise casting",
        "storage: minsdxl eager",
        "storage: minsdxl compile defaults",
    ]
    assert all("error" not in r and r["ms_per_step"] > 0 for r in st["rows"]), st["rows"]
    assert all(r["mean_abs_levels_vs_diffusers"] < 0.01 for r in st["rows"][1:])
    assert abs(st["rows"][0]["unet_gib"] - st["rows"][1]["unet_gib"]) < 1e-3
