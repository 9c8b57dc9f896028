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
    cmd += ["--size", "64", "--steps", "3", "--out", str(out), "--all", "--vae-layout"]  # the ablations too
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
    ]
    for name, r in rows.items():
        assert "error" not in r, (name, r["error"])
        assert r["new_graphs_in_timed_run"] == 0, name  # compiled once, reused by the timed run
        assert r["ms_per_step"] > 0 and r["end_to_end_s"] > 0 and r["after_steps_ms"] > 0, name
    # same seed, fp32: every row draws the first row's image (a mean of a few rounding flips at most)
    assert rows["minsdxl eager (sdpa)"]["mean_abs_levels_vs_first"] is None
    assert all(r["mean_abs_levels_vs_first"] < 0.01 for r in list(rows.values())[1:])
    # the VAE layout ablation: both layouts decode, to the same image (the sum's layout changes no value)
    vae = {r["config"]: r for r in res["vae_layout"]}
    assert list(vae) == ["channels_last sum (as is)", "NCHW sum"]
    assert all("error" not in r and r["ms"] > 0 for r in vae.values()), vae
    assert vae["NCHW sum"]["max_abs_vs_first"] <= 1e-5
