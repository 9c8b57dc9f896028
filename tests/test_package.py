"""The package itself: imports stay light, the public API is there, kernels live under minsdxl."""

import os
import subprocess
import sys


def _modules_after(code: str) -> set:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    return set(out.stdout.split())


def test_import_minsdxl_imports_no_reference_implementations():
    mods = _modules_after("import minsdxl")
    heavies = "diffusers transformers open_clip torchsde scipy spandrel tomesd kornia triton minsdxl.kernels"
    heavies += " imwatermark cv2 DeepCache"
    for heavy in heavies.split():
        assert heavy not in mods, f"`import minsdxl` imported {heavy}"
    assert "minsdxl.unet" in mods and "minsdxl.sampler" in mods


def test_public_api():
    import minsdxl

    for name in (
        "load",
        "load_component",
        "text2img",
        "img2img",
        "inpaint",
        "encode_prompt",
        "load_textual_inversion",
        "make_scheduler",
        "compile",
        "set_attention",
        "load_lora_weights",
        "set_adapters",
        "get_active_adapters",
        "delete_adapters",
        "unload_lora_weights",
        "disable_lora",
        "enable_lora",
        "SDXL",
        "CheckpointError",
    ):
        assert callable(getattr(minsdxl, name)), name


def test_kernels_install_under_the_minsdxl_namespace():
    mods = _modules_after("import minsdxl.kernels")
    assert "minsdxl.kernels.flash_attn" in mods
    # installing minsdxl adds no top-level `kernels` (PyPI has an unrelated package of that name)
    out = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('kernels'))"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    assert out.stdout.strip() == "None"


def test_wheel_ships_the_tiny_model(tmp_path):
    """The bundled tiny model is package data: a wheel built from the source tree carries every file."""
    import shutil
    import zipfile
    from pathlib import Path

    from minsdxl import tiny

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(".git", "tests", "build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path)]
        + [str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("minsdxl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"minsdxl/data/tiny/{f.relative_to(tiny.PATH).as_posix()}" for f in tiny.PATH.rglob("*") if f.is_file()}
    assert "minsdxl/data/tiny/unet/diffusion_pytorch_model.safetensors" in shipped
    assert shipped <= names, sorted(shipped - names)


def test_attention_environment_variable():
    def run(value):
        code = "import minsdxl; print(minsdxl.attention.get_backend())"
        env = {**os.environ, "MINSDXL_ATTENTION": value}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)

    assert run("math").stdout.split() == ["math"]
    bad = run("flash")  # a typo is an error at import, not a silent SDPA
    assert bad.returncode != 0
    assert "MINSDXL_ATTENTION is 'flash'; choose one of sdpa, math, triton" in bad.stderr
