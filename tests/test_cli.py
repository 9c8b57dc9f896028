"""The `minsdxl` command line, run as the real command (`python -m minsdxl`, a subprocess in a temporary
folder, the installed package) on tiny SDXL-topology checkpoints in both layouts.

Every image is checked bit for bit against the Python API called here with the same keywords, which
is also how "image k of a batch = a single run with seed+k" and "--from-png makes the same image" are
shown. Starting Python + torch dominates each run, so independent runs go two at a time
(`_run_all`), and each generation run checks several things at once.
"""

import concurrent.futures
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import diffusers.image_processor
import numpy as np
import PIL.Image
import pytest
import torch
from sdxl_testing import (
    TINY_UNET,
    TINY_VISION,
    component_state_dicts,
    diffusers_unet_config,
    flat_ip_adapter,
    hf_vision_config,
    kohya_lora,
    lora_layers,
    peft_lora,
    plain_adapter,
    random_lora_pairs,
    random_state_dict,
)
from test_upscaler import random_esrgan

import minsdxl
from minsdxl.checkpoint import diffusers_to_sgm, read_safetensors, save_safetensors
from minsdxl.cli import _from_a1111, build_parser, describe_control, main, read_png_metadata
from minsdxl.config import ControlNetUnionConfig
from minsdxl.controlnet import controlnet_config_json
from minsdxl.image import blur_mask, canny, outpaint_canvas
from minsdxl.metadata import infotext, parse_infotext, save_png
from minsdxl.upscaler import load_upscaler, upscale

REPO = Path(__file__).resolve().parents[1]
SIZE = ["-W", "64", "-H", "64", "--steps", "2"]


def _env(cache):
    env = dict(os.environ)
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    env["PYTHONPATH"] = os.pathsep.join(path)
    env["XDG_CACHE_HOME"] = str(cache)  # the hash cache, kept out of the home folder
    # the same thread count as this process: the in-process reference images must match bit for bit
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return env


def _run_all(jobs: dict, cache) -> dict:
    """{name: (argv, cwd)} -> {name: CompletedProcess}, two processes at a time."""

    def run(argv, cwd):
        cmd = argv if argv[0] != "minsdxl" else [sys.executable, "-m", "minsdxl", *argv[1:]]
        return subprocess.run(cmd, cwd=cwd, env=_env(cache), capture_output=True, text=True, timeout=600)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(run, argv, cwd) for name, (argv, cwd) in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def _ok(r):
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r


def _pixels(path):
    with PIL.Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _same(path, image: PIL.Image.Image):
    assert np.array_equal(_pixels(path), np.asarray(image)), f"{path} differs from the API's image"


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


@pytest.fixture(scope="module")
def paths(tiny_base, tiny_refiner, tiny_inpaint, tmp_path_factory):
    """The checkpoints and input images the runs use."""
    root = tmp_path_factory.mktemp("cli_inputs")
    single = root / "base.safetensors"
    save_safetensors(diffusers_to_sgm(component_state_dicts(tiny_base[0])), single)
    broken = root / "broken.safetensors"  # the single file less one UNet weight
    sd = dict(read_safetensors(single))
    del sd["model.diffusion_model.out.2.bias"]
    save_safetensors(sd, broken)
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (76, 64, 3), dtype=np.uint8)).save(root / "init.png")  # 64x76
    mask = np.zeros((76, 64), np.uint8)
    mask[16:48, 8:40] = 255
    PIL.Image.fromarray(mask).save(root / "mask.png")
    PIL.Image.fromarray(mask[:64]).save(root / "mask_64.png")
    (root / "not_an_image.png").write_text("not a png")
    model = minsdxl.load(tiny_base[1])  # two LoRAs for it, kohya and diffusers-PEFT keys
    layers = lora_layers(model, only=lambda n: "attn" in n or "mlp" in n)
    save_safetensors(kohya_lora(model, random_lora_pairs(layers, seed=1), alpha=2.0), root / "style.safetensors")
    save_safetensors(peft_lora(random_lora_pairs(layers, seed=2)), root / "detail.safetensors")
    # textual-inversion embeddings: two in an A1111-style folder (one of them named by a prompt), one alone
    (root / "embeddings").mkdir()
    widths = {"clip_l": model.text_encoder.config.hidden_size, "clip_g": model.text_encoder_2.config.hidden_size}
    for seed, file in enumerate(("embeddings/mystyle", "embeddings/unused", "neg")):
        g = torch.Generator().manual_seed(seed)
        save_safetensors({k: torch.randn(2, w, generator=g) for k, w in widths.items()}, root / f"{file}.safetensors")
    # an IP-Adapter with its image encoder beside it (the layout of h94/IP-Adapter's sdxl_models/)
    import transformers

    save_safetensors(flat_ip_adapter(plain_adapter(tiny_base[0].unet)), root / "ip-adapter.safetensors")
    vision = transformers.CLIPVisionModelWithProjection(hf_vision_config(TINY_VISION))
    vision.load_state_dict(random_state_dict(vision, 7))
    vision.save_pretrained(root / "image_encoder")
    PIL.Image.fromarray(rng.integers(0, 256, (29, 40, 3), dtype=np.uint8)).save(root / "style.png")
    # a ControlNet folder (diffusers' layout) and a control image of another size than -W x -H's default
    import diffusers

    net = diffusers.ControlNetModel.from_unet(tiny_base[0].unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    net.load_state_dict(random_state_dict(net, 9))
    net.save_pretrained(root / "controlnet")
    cfg = ControlNetUnionConfig(**vars(TINY_UNET), conditioning_embedding_out_channels=(4, 8, 8, 16))
    cfg = replace(cfg, num_trans_channel=32, num_trans_head=4, num_proj_channel=32)
    union = diffusers.ControlNetUnionModel(**{k: v for k, v in controlnet_config_json(cfg).items() if k[0] != "_"})
    union.load_state_dict(random_state_dict(union, 10))
    union.save_pretrained(root / "union")
    adapter = diffusers.T2IAdapter(channels=[32, 64, 64, 64], downscale_factor=16, adapter_type="full_adapter_xl")
    adapter.load_state_dict(random_state_dict(adapter, 12))
    adapter.save_pretrained(root / "t2i_adapter")
    PIL.Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(root / "edges.png")
    PIL.Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(root / "depth.png")
    # an InstructPix2Pix model: the base's components around an 8-channel UNet
    unet = diffusers.UNet2DConditionModel(**diffusers_unet_config(replace(TINY_UNET, in_channels=8)))
    unet.load_state_dict(random_state_dict(unet, 13))
    keep = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    edit = {k: tiny_base[0].components[k] for k in keep}
    edit = diffusers.StableDiffusionXLInstructPix2PixPipeline(**edit, unet=unet, add_watermarker=False)
    edit.save_pretrained(root / "pix2pix", safe_serialization=True)
    return {
        "pix2pix": root / "pix2pix",
        "controlnet": root / "controlnet",
        "union": root / "union",
        "t2i_adapter": root / "t2i_adapter",
        "control_image": root / "edges.png",
        "control_image_2": root / "depth.png",
        "ip_adapter": root / "ip-adapter.safetensors",
        "ip_image": root / "style.png",
        "lora_style": root / "style.safetensors",
        "embeddings": root / "embeddings",
        "neg_embedding": root / "neg.safetensors",
        "lora_detail": root / "detail.safetensors",
        "base": tiny_base[1],
        "refiner": tiny_refiner[1],
        "inpaint": tiny_inpaint[1],
        "single": single,
        "broken": broken,
        "init": root / "init.png",
        "mask": root / "mask.png",
        "mask_64": root / "mask_64.png",
        "not_an_image": root / "not_an_image.png",
        "cache": root / "cache",
    }


# ------------------------------------------------------------------------------------------------
# Runs that generate (two waves: --from-png needs the first wave's images)

T2I = dict(
    prompt="a red cat, sitting",
    negative_prompt="blurry, dark",
    num_inference_steps=2,
    height=64,
    width=64,
    guidance_scale=6.0,
    scheduler="Euler a",
    crops_coords_top_left=(0, 8),
    original_size=(96, 128),
)
T2I_FLAGS = ["-p", T2I["prompt"], "-n", T2I["negative_prompt"], *SIZE, "--cfg", "6", "--sampler", "Euler a"]
T2I_FLAGS += ["--crop-top-left", "0,8", "--original-size", "128x96"]


WEIGHTED = "a (red:1.3) cat, [sitting] BREAK on a sofa, (mystyle:1.2)"
NEGATIVE = "<neg>, blurry"
TINY_PROMPT = "a yellow circle at the bottom left on a black background"


@pytest.fixture(scope="module")
def runs(paths, tmp_path_factory):
    p = {k: str(v) for k, v in paths.items()}
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("t2i", "i2i", "switch", "inpaint", "info", "lora")}
    first = _run_all(
        {
            "t2i": (["minsdxl", "generate", *T2I_FLAGS, "--model", p["base"], "-s", "5", "-b", "2"], dirs["t2i"]),
            "i2i": (
                ["minsdxl", "-p", "a cat", "--model", p["base"], "-i", p["init"], "--strength", "0.5", "--steps", "2"]
                + ["-s", "1", "--refiner", p["refiner"], "--refiner-mode", "img2img", "--refiner-strength", "0.5"]
                + ["--aesthetic-score", "7", "--clip-skip", "1", "-o", "i2i.png", "-q"],
                dirs["i2i"],
            ),
            "switch": (
                ["minsdxl", "-p", "a cat", "--model", p["base"], *SIZE[:4], "--steps", "4", "-s", "2"]
                + ["--refiner", p["refiner"], "--refiner-switch", "0.5", "-o", "switch.png", "-v", "--offload"],
                dirs["switch"],
            ),
            "inpaint": (  # no seed: a random one, reported
                ["minsdxl", "-p", "a dog", "--model", p["inpaint"], "-i", p["init"], "--mask", p["mask"]]
                + ["--steps", "2", "-o", "inpaint.png", "--no-metadata", "-q"],
                dirs["inpaint"],
            ),
            "inpaint_crop": (  # A1111's "only masked": the box around the mask at -W x -H, pasted back
                ["minsdxl", "-p", "a dog", "--model", p["inpaint"], "-i", p["init"], "--mask", p["mask"]]
                + ["--steps", "2", "--mask-padding", "4", "-W", "64", "-H", "64", "-s", "3", "-o", "crop.png", "-q"]
                + ["--mask-blur", "3"],
                dirs["inpaint"],
            ),
            # the console script, and a single file with its configs from --config
            "info": (
                [str(Path(sys.executable).parent / "minsdxl"), "info", p["single"], "--config", p["base"]],
                dirs["info"],
            ),
            "info_folder": (["minsdxl", "info", p["refiner"], "--json"], dirs["info"]),
            "info_broken": (["minsdxl", "info", p["broken"], "--config", p["base"], "--json"], dirs["info"]),
            # no --model: the bundled tiny model, and README's first command
            "tiny": (["minsdxl", "-p", TINY_PROMPT, "-s", "3", "-o", "tiny.png", "-q"], dirs["t2i"]),
            "info_tiny": (["minsdxl", "info", "tiny"], dirs["info"]),
            "lora": (
                ["minsdxl", *T2I_FLAGS, "--model", p["base"], "-s", "4", "--lora", p["lora_style"] + ":0.123456789"]
                + ["-p", T2I["prompt"] + " <lora:detail:1>", "--lora-dir", str(paths["lora_detail"].parent)]
                + ["-o", "lora.png", "-q"],
                dirs["lora"],
            ),
            "ip": (
                ["minsdxl", *T2I_FLAGS, "--model", p["base"], "-s", "6", "--ip-adapter", p["ip_adapter"]]
                + ["--ip-adapter-image", p["ip_image"], "--ip-adapter-scale", "0.7", "-o", "ip.png", "-q"]
                + ["--freeu", "0.9,0.2,1.3,1.4"],
                dirs["lora"],
            ),
            "cn": (  # text2img at the control image's size (80x64)
                ["minsdxl", "-p", "a cat", "--model", p["base"], "--steps", "3", "-s", "4", "--cfg", "5"]
                + ["--controlnet", p["controlnet"], "--control-image", p["control_image"], "--controlnet-scale"]
                + ["0.7", "--control-end", "0.7", "--guess-mode", "-o", "cn.png", "-q"],
                dirs["lora"],
            ),
            "cn_multi": (  # two ControlNets (here the same one twice), a control image and a scale each
                ["minsdxl", "-p", "a cat", "--model", p["base"], "--steps", "3", "-s", "4", "--controlnet"]
                + [p["controlnet"], "--control-image", p["control_image"], "--controlnet", p["controlnet"]]
                + ["--control-image", p["control_image_2"], "--controlnet-scale", "0.5,0.8", "-o", "cn_multi.png"]
                + ["-q"],
                dirs["lora"],
            ),
            "union": (  # img2img with a ControlNet-Union: the control image resized to the init image's size
                ["minsdxl", "-p", "a cat", "--model", p["base"], "-i", p["init"], "--steps", "3", "-s", "2"]
                + ["--controlnet", p["union"], "--control-image", p["control_image"], "--control-mode", "3"]
                + ["-o", "union.png", "-q"],
                dirs["lora"],
            ),
            "adapter": (  # text2img at the adapter image's size rounded down to 16 (80x64)
                ["minsdxl", "-p", "a cat", "--model", p["base"], "--steps", "3", "-s", "3", "--t2i-adapter"]
                + [p["t2i_adapter"], "--adapter-image", p["init"], "--adapter-scale", "0.8", "--adapter-factor"]
                + ["0.5", "-o", "adapter.png", "-q"],
                dirs["lora"],
            ),
            "pag": (  # with A1111's prompt syntax and textual-inversion embeddings
                ["minsdxl", *T2I_FLAGS, "--model", p["base"], "-s", "7", "--pag-scale", "3", "--pag-layers"]
                + ["mid,up_blocks.0.attentions.1", "-o", "pag.png", "-q", "-p", WEIGHTED, "--prompt-weighting"]
                + ["a1111", "-n", NEGATIVE, "--embedding-dir", p["embeddings"], "--embedding"]
                + [p["neg_embedding"] + ":<neg>"],
                dirs["lora"],
            ),
            "pix2pix": (  # edits the init image at its size rounded down to 8 (64x72)
                ["minsdxl", "-p", "make it red", "--model", p["pix2pix"], "-i", p["init"], "--steps", "3", "-s", "5"]
                + ["--image-cfg", "1.8", "-o", "edit.png", "-q"],
                dirs["lora"],
            ),
            "tiled": (  # the tiny VAE's tiles are 64 px: a 96 px wide image is decoded in 2 x 1 tiles; TCD, eta
                ["minsdxl", "-p", "a cat", "--model", p["base"], "-W", "96", "-H", "64", "--steps", "2", "-s", "8"]
                + ["--vae-tiling", "--sampler", "tcd", "--eta", "0.3", "-o", "tiled.png", "-q"],
                dirs["lora"],
            ),
            "fp8": (
                ["minsdxl", "-p", "a cat", "--model", p["base"], "--steps", "2", "-s", "9", "--storage-dtype", "fp8"]
                + ["-o", "fp8.png", "-q"],
                dirs["lora"],
            ),
        },
        paths["cache"],
    )
    t2i = dirs["t2i"] / "outputs"
    # an image made on a GPU (device and all stored as an older minsdxl did): replayed here on the CPU
    made = read_png_metadata(t2i / "00000-5.png")
    made["minsdxl"]["args"] |= {"device": "cuda:0", "offload": True, "output": "gone.png"}
    text = {"parameters": made["parameters"], "minsdxl": json.dumps(made["minsdxl"])}
    save_png(PIL.Image.open(t2i / "00000-5.png"), dirs["t2i"] / "gpu.png", text)
    again = _run_all(
        {
            "from_gpu": (
                ["minsdxl", "--from-png", str(dirs["t2i"] / "gpu.png"), "-o", "from_gpu.png", "-q"],
                dirs["t2i"],
            ),
            "again": (["minsdxl", "--from-png", str(t2i / "00001-6.png"), "-o", "again.png", "-b", "2"], dirs["t2i"]),
            "moved": (  # the model moved and changed layout; a flag overrides the stored steps
                ["minsdxl", "--from-png", str(t2i / "00000-5.png"), "--model", p["single"]]
                + ["--model-config", p["base"], "--steps", "3", "-o", "moved.png", "-q"],
                dirs["t2i"],
            ),
            "lora_again": (["minsdxl", "--from-png", str(dirs["lora"] / "lora.png"), "-o", "again.png"], dirs["lora"]),
            "ip_again": (["minsdxl", "--from-png", str(dirs["lora"] / "ip.png"), "-o", "ip_again.png"], dirs["lora"]),
            "adapter_again": (
                ["minsdxl", "--from-png", str(dirs["lora"] / "adapter.png"), "-o", "adapter_again.png"],
                dirs["lora"],
            ),
            "cn_again": (["minsdxl", "--from-png", str(dirs["lora"] / "cn.png"), "-o", "cn_again.png"], dirs["lora"]),
            "fp8_again": (["minsdxl", "--from-png", str(dirs["lora"] / "fp8.png"), "-o", "fp8.2.png"], dirs["lora"]),
            "cn_multi_again": (
                ["minsdxl", "--from-png", str(dirs["lora"] / "cn_multi.png"), "-o", "cn_multi_again.png"],
                dirs["lora"],
            ),
        },
        paths["cache"],
    )
    return {**first, **again, "dirs": dirs}


@pytest.fixture(scope="module")
def api(paths):
    base = minsdxl.load(paths["base"])
    return {
        "base": base,
        "refiner": minsdxl.load(paths["refiner"], share=base),
        "inpaint": minsdxl.load(paths["inpaint"]),
        "single": minsdxl.load(paths["single"], config=paths["base"]),
    }


def test_text2img_batch_metadata_and_api_parity(runs, api, paths):
    r = _ok(runs["t2i"])
    out = runs["dirs"]["t2i"] / "outputs"
    assert {"00000-5.png", "00001-6.png"} <= set(os.listdir(out))
    assert "saved outputs/00000-5.png (seed 5)" in r.stdout and "(seed 6)" in r.stdout
    assert "denoising" in r.stderr  # the progress bar
    for k, seed in enumerate((5, 6)):  # image k of the batch = the API's single run with seed + k
        _same(out / f"0000{k}-{seed}.png", minsdxl.text2img(api["base"], **T2I, seed=seed, progress=False)[0])

    meta = read_png_metadata(out / "00001-6.png")
    unet_file = paths["base"] / "unet" / "diffusion_pytorch_model.safetensors"
    digest = hashlib.sha256(unet_file.read_bytes()).hexdigest()
    a1111 = meta["infotext"]
    assert meta["parameters"].startswith("a red cat, sitting\nNegative prompt: blurry, dark\nSteps: 2, ")
    assert a1111["Prompt"] == T2I["prompt"] and a1111["Negative prompt"] == T2I["negative_prompt"]
    expected = {"Steps": "2", "Sampler": "Euler a", "CFG scale": "6.0", "Seed": "6", "Size": "64x64"}
    expected |= {"Model hash": digest[:10], "Model": paths["base"].name, "RNG": "CPU"}
    expected |= {"Version": f"minsdxl {minsdxl.__version__}"}
    assert expected.items() <= a1111.items()
    assert "Denoising strength" not in a1111 and "Refiner" not in a1111

    ours = meta["minsdxl"]
    assert ours["schema"] == 1 and ours["version"] == minsdxl.__version__
    assert ours["model"]["sha256"] == digest and ours["model"]["hash"] == digest[:10]
    assert ours["model"]["sha256_of"] == "unet/diffusion_pytorch_model.safetensors"
    assert ours["model"]["path"] == str(paths["base"].resolve())
    assert ours["seed"] == 6 and ours["batch"] == {"first_seed": 5, "index": 1, "size": 2}
    assert ours["rng"] == "cpu" and ours["dtype"] == "fp32" and ours["dtypes"]["unet"] == "float32"
    assert ours["scheduler"]["name"] == "euler_a" and ours["scheduler"]["a1111"] == "Euler a"
    assert ours["scheduler"]["config"]["beta_schedule"] == "scaled_linear"
    (call,) = ours["calls"]
    assert call["function"] == "text2img"
    kw = call["kwargs"]
    assert kw["crops_coords_top_left"] == [0, 8] and kw["original_size"] == [96, 128]
    assert kw["num_inference_steps"] == 2 and kw["guidance_scale"] == 6.0 and kw["seed"] == 6
    assert kw["negative_crops_coords_top_left"] == [0, 0]  # the API's defaults are recorded too


def test_default_model_is_the_bundled_tiny_one(runs):
    from minsdxl import tiny

    _ok(runs["tiny"])
    path = runs["dirs"]["t2i"] / "tiny.png"
    _same(path, minsdxl.text2img(minsdxl.load("tiny"), TINY_PROMPT, seed=3, progress=False)[0])
    found = tiny.describe(PIL.Image.open(path), "black")
    assert (found["color"], found["position"]) == ("yellow", "bottom left")
    meta = read_png_metadata(path)
    assert meta["infotext"]["Model"] == "tiny" and meta["minsdxl"]["args"]["model"] == "tiny"
    text = _ok(runs["info_tiny"]).stdout
    assert "SDXL base" in text and "every component matches" in text


def test_from_png_makes_the_same_image(runs):
    r = _ok(runs["again"])
    folder = runs["dirs"]["t2i"]
    # -b 2 from an image with seed 6: seeds 6 and 7, "-{index}" added to the -o name
    assert "(seed 6)" in r.stdout and "(seed 7)" in r.stdout
    assert np.array_equal(_pixels(folder / "again-0.png"), _pixels(folder / "outputs" / "00001-6.png"))
    old = read_png_metadata(folder / "outputs" / "00001-6.png")["minsdxl"]
    new = read_png_metadata(folder / "again-0.png")["minsdxl"]
    assert new["args"] == old["args"] and new["calls"] == old["calls"]


def test_from_png_runs_where_it_is_replayed(runs):
    # where and how a run ran (device, offload, output name) is not replayed: a PNG made on a GPU
    # makes the same image on a machine without one
    _ok(runs["from_gpu"])
    folder = runs["dirs"]["t2i"]
    assert np.array_equal(_pixels(folder / "from_gpu.png"), _pixels(folder / "outputs" / "00000-5.png"))
    meta = read_png_metadata(folder / "from_gpu.png")["minsdxl"]
    assert meta["device"] == "cpu" and not {"device", "offload", "output"} & set(meta["args"])


def test_from_png_with_moved_single_file_model_and_override(runs, api, paths):
    r = _ok(runs["moved"])
    # same weights, another file: the hash differs, and the CLI says so
    assert "differs from the one that made" in r.stderr
    meta = read_png_metadata(runs["dirs"]["t2i"] / "moved.png")
    assert meta["infotext"]["Steps"] == "3" and meta["infotext"]["Seed"] == "5"
    assert meta["minsdxl"]["model"]["layout"] == "single file"
    assert meta["minsdxl"]["model"]["sha256"] == hashlib.sha256(paths["single"].read_bytes()).hexdigest()
    expected = minsdxl.text2img(api["single"], **{**T2I, "num_inference_steps": 3}, seed=5, progress=False)[0]
    _same(runs["dirs"]["t2i"] / "moved.png", expected)


def test_lora_flags_metadata_and_from_png(runs, api, paths):
    # --lora style.safetensors:0.123456789 (stored exactly for --from-png) and an A1111 / stable-diffusion.cpp
    # prompt tag <lora:detail:1> (taken out of the prompt's text, found in --lora-dir)
    _ok(runs["lora"])
    folder = runs["dirs"]["lora"]
    model = minsdxl.load(paths["base"])
    minsdxl.load_lora_weights(model, paths["lora_style"], adapter_name="style")
    minsdxl.load_lora_weights(model, paths["lora_detail"], adapter_name="detail")
    minsdxl.set_adapters(model, ["style", "detail"], [0.123456789, 1.0])
    _same(folder / "lora.png", minsdxl.text2img(model, **T2I, seed=4, progress=False)[0])
    plain = np.asarray(minsdxl.text2img(api["base"], **T2I, seed=4, progress=False)[0])
    assert np.abs(_pixels(folder / "lora.png").astype(int) - plain).mean() > 1  # the LoRAs matter
    meta = read_png_metadata(folder / "lora.png")
    digest = {n: hashlib.sha256(paths[f"lora_{n}"].read_bytes()).hexdigest() for n in ("style", "detail")}
    # A1111's "Lora hashes" (what Civitai reads), the adapters named after their files
    assert meta["infotext"]["Lora hashes"] == f"style: {digest['style'][:10]}, detail: {digest['detail'][:10]}"
    assert meta["infotext"]["Prompt"] == T2I["prompt"] + " <lora:detail:1>"  # as A1111 writes it
    loras = [(x["name"], x["scale"], x["sha256"], x["path"]) for x in meta["minsdxl"]["loras"]]
    expected = [
        (n, w, digest[n], str(paths[f"lora_{n}"].resolve())) for n, w in (("style", 0.123456789), ("detail", 1.0))
    ]
    assert loras == expected
    assert meta["minsdxl"]["args"]["lora"] == [f"{paths['lora_style'].resolve()}:0.123456789"]
    _ok(runs["lora_again"])  # --from-png loads the same LoRAs with the same scales
    assert np.array_equal(_pixels(folder / "again.png"), _pixels(folder / "lora.png"))


A1111_PARAMETERS = """a (red:1.2) cat <lora:detail:0.5>
Negative prompt: blurry, [dark]
Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6, Seed: 42, Size: 64x72, Model hash: 31e35c80fc, \
Model: sd_xl_base_1.0, Clip skip: 2, Hires upscale: 1.5, Hires steps: 2, Hires upscaler: 4x-UltraSharp, \
Denoising strength: 0.5, ADetailer model: face_yolov8n.pt, Refiner: sd_xl_refiner_1.0 [7440042bbd], \
Refiner switch at: 0.8, Version: v1.10.1"""


def test_from_png_of_an_a1111_image_takes_its_settings(paths, tmp_path, capsys):
    """An AUTOMATIC1111 PNG: its prompt (syntax, <lora:> tags), negative, steps, sampler with its schedule
    type, CFG, seed, size and hires fix drive the run (its upscaler model is not here: Lanczos); what minsdxl
    does not do (ADetailer) is named as left out."""
    png = tmp_path / "a1111.png"
    save_png(PIL.Image.new("RGB", (64, 72)), png, {"parameters": A1111_PARAMETERS})
    argv = ["--from-png", str(png), "--lora-dir", str(paths["lora_detail"].parent), "-o", str(tmp_path / "x.png")]
    assert main(argv) == 1  # no --model: A1111's model is known by name only
    assert "made by A1111 with the model sd_xl_base_1.0 [31e35c80fc]: pass --model PATH" in capsys.readouterr().err
    assert main([*argv, "--model", str(paths["base"]), "-q"]) == 0
    err = capsys.readouterr().err
    assert "left out: ADetailer model" in err and "its settings, not its pixels" in err
    assert "hires upscaler 4x-UltraSharp is not here (pass --upscaler-dir DIR holding it): Lanczos instead" in err
    assert "refined with sd_xl_refiner_1.0 [7440042bbd]: pass --refiner PATH" in err
    model = minsdxl.load(paths["base"])
    minsdxl.load_lora_weights(model, paths["lora_detail"], adapter_name="detail")
    minsdxl.set_adapters(model, ["detail"], [0.5])
    kw = dict(prompt="a (red:1.2) cat ", negative_prompt="blurry, [dark]", guidance_scale=6.0, seed=42)
    kw.update(scheduler="DPM++ 2M Karras", prompt_weighting="a1111", progress=False)
    first = minsdxl.text2img(model, **kw, num_inference_steps=3, width=64, height=72)[0]
    # the hires pass: resized 1.5x (72 * 1.5 = 108 -> 104, a multiple of 8), 2 of 4 steps at strength 0.5
    made = minsdxl.img2img(model, **kw, image=first.resize((96, 104), PIL.Image.LANCZOS), strength=0.5,
                           num_inference_steps=4)  # fmt: skip
    _same(tmp_path / "x.png", made[0])
    info = read_png_metadata(tmp_path / "x.png")["infotext"]
    expected = {"Size": "64x72", "Hires upscale": "1.5", "Hires steps": "2", "Hires upscaler": "Lanczos"}
    assert expected.items() <= info.items() and info["Denoising strength"] == "0.5"
    # with A1111's upscaler folder: 4x-UltraSharp.pth (random ESRGAN weights) upscales, then to a multiple of 8
    (tmp_path / "ESRGAN").mkdir()
    torch.save(random_esrgan("old", nf=8, nb=1), tmp_path / "ESRGAN" / "4x-UltraSharp.pth")
    argv += ["--model", str(paths["base"]), "-q", "--upscaler-dir", str(tmp_path / "ESRGAN"), "--overwrite"]
    assert main(argv) == 0
    big = upscale(load_upscaler(tmp_path / "ESRGAN" / "4x-UltraSharp.pth"), first, scale=1.5)
    assert big.size == (96, 108)  # A1111's int(72 * 1.5), then resized to 104 as A1111 does for SDXL's VAE
    made = minsdxl.img2img(model, **kw, image=big.resize((96, 104), PIL.Image.LANCZOS), strength=0.5,
                           num_inference_steps=4)  # fmt: skip
    _same(tmp_path / "x.png", made[0])
    meta = read_png_metadata(tmp_path / "x.png")
    assert meta["infotext"]["Hires upscaler"] == "4x-UltraSharp" and meta["minsdxl"]["upscaler"]["hash"]


@pytest.mark.parametrize(
    "emphasis,weighting", [(None, "a1111"), ("Original", "a1111"), ("No norm", "a1111_no_norm"), ("None", None)]
)
def test_a1111_emphasis_modes(emphasis, weighting, capsys):
    text = "a (cat:1.2)\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64"
    args = _from_a1111("x.png", text + (f", Emphasis: {emphasis}" if emphasis else ""))["args"]
    assert args.get("prompt_weighting") == weighting and "left out" not in capsys.readouterr().err
    _from_a1111("x.png", text + ", Emphasis: Ignore")
    assert "left out: Emphasis: Ignore" in capsys.readouterr().err


@pytest.mark.parametrize("schedule", ["Automatic", "Karras", "Exponential", "Beta"])
def test_a1111_schedule_types_name_our_schedulers(schedule):
    text = f"a cat\nSteps: 20, Sampler: DPM++ 2M SDE, Schedule type: {schedule}, CFG scale: 7, Seed: 1, Size: 64x64"
    name = _from_a1111("x.png", text)["args"]["sampler"]
    expected = {"Automatic": "dpmpp_2m_sde", "Karras": "dpmpp_2m_sde_karras"}.get(schedule)
    assert minsdxl.make_scheduler(name).name == (expected or f"dpmpp_2m_sde_{schedule.lower()}")


def test_hires_fix_with_a_latent_upscaler(paths, tmp_path, capsys):
    """--hires-scale: text2img's latents interpolated as A1111's "Latent" upscaler does, then img2img runs
    --hires-steps steps at --hires-strength (a schedule of 3 / 0.6 -> 5 steps, 3 of them run)."""
    out = tmp_path / "hires.png"
    argv = ["-p", "a cat", "--model", str(paths["base"]), "-W", "64", "-H", "64", "--steps", "2", "-s", "9", "-q"]
    argv += ["--hires-scale", "1.5", "--hires-steps", "3", "--hires-strength", "0.6", "-o", str(out)]
    assert main(argv) == 0
    model = minsdxl.load(paths["base"])
    kw = dict(prompt="a cat", seed=9, progress=False)
    latents = minsdxl.text2img(model, **kw, num_inference_steps=2, width=64, height=64, output_type="latent")
    big = torch.nn.functional.interpolate(latents, size=(12, 12), mode="bilinear", antialias=False)
    steps = []
    made = minsdxl.img2img(model, **kw, image=big, strength=0.6, num_inference_steps=5,
                           callback_on_step_end=lambda p, i, t, x: steps.append(i) or {})  # fmt: skip
    assert len(steps) == 3
    _same(out, made[0])
    assert main(["--from-png", str(out), "-o", str(tmp_path / "again.png"), "-q"]) == 0  # replayed exactly
    assert np.array_equal(_pixels(tmp_path / "again.png"), _pixels(out))
    calls = read_png_metadata(out)["minsdxl"]["calls"]
    assert [c["function"] for c in calls] == ["text2img", "img2img"]
    assert calls[1]["kwargs"]["image"] == "the base call's latents, x1.5 (Latent)"
    assert main([*argv, "--hires-upscaler", "4x-UltraSharp"]) == 1  # no such file, no --upscaler-dir
    assert "no NAME.pth / NAME.safetensors in --upscaler-dir" in capsys.readouterr().err
    assert main([*argv, "-i", str(paths["init"])]) == 1  # img2img: no hires fix


def test_hires_fix_keeps_the_controlnet(paths, tmp_path):
    """With a ControlNet the hires pass is guided too (A1111's ControlNet extension, Hr Option "Both"): the
    ControlNet img2img call at the hires size, the control image resized to it, the same scale."""
    out = tmp_path / "hires_cn.png"
    argv = ["-p", "a cat", "--model", str(paths["base"]), "-W", "80", "-H", "64", "--steps", "2", "-s", "3", "-q"]
    argv += ["--controlnet", str(paths["controlnet"]), "--control-image", str(paths["control_image"])]
    argv += ["--controlnet-scale", "0.7", "--hires-scale", "1.5", "--hires-upscaler", "Lanczos"]
    argv += ["--hires-steps", "2", "--hires-strength", "0.5", "-o", str(out)]
    assert main(argv) == 0
    model, net = minsdxl.load(paths["base"]), minsdxl.load_controlnet(paths["controlnet"])
    edges = PIL.Image.open(paths["control_image"])
    kw = dict(prompt="a cat", seed=3, progress=False, controlnet=net, controlnet_conditioning_scale=0.7)
    first = minsdxl.text2img(model, **kw, image=edges, num_inference_steps=2, width=80, height=64)[0]
    big = first.resize((120, 96), PIL.Image.LANCZOS)  # 80 x 1.5, 64 x 1.5: multiples of 8 already
    made = minsdxl.img2img(model, **kw, image=big, control_image=edges, strength=0.5, num_inference_steps=4,
                           width=120, height=96)[0]  # fmt: skip
    _same(out, made)
    plain = minsdxl.img2img(model, "a cat", image=big, strength=0.5, num_inference_steps=4, seed=3, progress=False)
    assert not np.array_equal(np.asarray(plain[0]), _pixels(out))  # the ControlNet changed the hires pass
    calls = read_png_metadata(out)["minsdxl"]["calls"]
    assert calls[1]["kwargs"]["controlnet_conditioning_scale"] == 0.7 and calls[1]["kwargs"]["width"] == 120


def test_controlnet_flags_metadata_and_from_png(runs, api, paths):
    _ok(runs["cn"])
    folder = runs["dirs"]["lora"]
    net = minsdxl.load_controlnet(paths["controlnet"])
    edges = PIL.Image.open(paths["control_image"])
    kw = dict(prompt="a cat", num_inference_steps=3, guidance_scale=5.0, seed=4, progress=False, image=edges)
    kw |= dict(controlnet=net, controlnet_conditioning_scale=0.7, control_guidance_end=0.7, guess_mode=True)
    made = minsdxl.text2img(api["base"], **kw)[0]
    assert made.size == (80, 64)  # the control image's size
    _same(folder / "cn.png", made)
    meta = read_png_metadata(folder / "cn.png")["minsdxl"]
    weights = paths["controlnet"] / "diffusion_pytorch_model.safetensors"
    assert meta["controlnet"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert meta["control_image"]["sha256"] == hashlib.sha256(paths["control_image"].read_bytes()).hexdigest()
    call = meta["calls"][0]["kwargs"]
    assert call["image"] == str(paths["control_image"].resolve())  # text2img's image= is the control image
    assert call["controlnet"] == str(paths["controlnet"].resolve()) and call["guess_mode"] is True
    assert call["controlnet_conditioning_scale"] == 0.7 and call["control_guidance_end"] == 0.7
    _ok(runs["cn_again"])  # --from-png loads the ControlNet and the control image again
    assert np.array_equal(_pixels(folder / "cn_again.png"), _pixels(folder / "cn.png"))


@pytest.mark.parametrize("seed", range(6))
def test_canny_equals_opencv(seed):
    """minsdxl.image.canny = cv2.Canny(np.array(image), low, high) in 3 channels (diffusers' ControlNet docs)."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = rng.integers(5, 90, 2)
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    image = PIL.Image.fromarray(small).resize((w, h), PIL.Image.BICUBIC) if seed % 2 else PIL.Image.fromarray(
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # fmt: skip
    for low, high in ((100, 200), (50, 150), (200, 100), (10.5, 20.9)):
        ref = cv2.Canny(np.array(image), low, high)
        assert np.array_equal(np.asarray(canny(image, low, high)), np.repeat(ref[..., None], 3, axis=2))


def test_info_on_upscalers(tmp_path, capsys):
    torch.save(random_esrgan("old", nf=8, nb=1), tmp_path / "4x-Test.pth")
    save_safetensors(random_esrgan("new", nf=8, nb=2, n_up=1), tmp_path / "2x-Test.safetensors")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "4x-Test.pth").read_bytes()[:1000])
    assert main(["info", str(tmp_path / "4x-Test.pth")]) == 0
    assert "ESRGAN (RRDBNet) upscaler, x4, 1 blocks of 8 channels (growth 32)" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "2x-Test.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["kind"], report["scale"], report["nb"], report["dtypes"]) == ("upscaler", 2, 2, ["float32"])
    assert main(["info", str(tmp_path / "cut.pth")]) == 1
    assert "does not load as an upscaler" in capsys.readouterr().out


def test_canny_flag_turns_a_photo_into_the_control_image(paths, tmp_path, capsys):
    out = tmp_path / "cn.png"
    argv = ["-p", "a cat", "--model", str(paths["base"]), "--steps", "2", "-s", "4", "--controlnet"]
    argv += [str(paths["controlnet"]), "--control-image", str(paths["init"]), "--canny", "50,120", "-q", "-o", str(out)]
    assert main(argv) == 0
    model, net = minsdxl.load(paths["base"]), minsdxl.load_controlnet(paths["controlnet"])
    edges = canny(PIL.Image.open(paths["init"]), 50, 120)
    _same(out, minsdxl.text2img(model, "a cat", image=edges, controlnet=net, num_inference_steps=2, seed=4,
                                progress=False)[0])  # fmt: skip
    assert read_png_metadata(out)["minsdxl"]["args"]["canny"] == [50.0, 120.0]
    assert main(["-p", "a cat", "--model", str(paths["base"]), "--canny"]) == 1
    assert "pass a --controlnet or --t2i-adapter with it" in capsys.readouterr().err


def test_several_controlnets(runs, api, paths):
    _ok(runs["cn_multi"])
    folder = runs["dirs"]["lora"]
    net = minsdxl.load_controlnet(paths["controlnet"])
    images = [PIL.Image.open(paths[k]) for k in ("control_image", "control_image_2")]
    kw = dict(prompt="a cat", num_inference_steps=3, seed=4, progress=False, image=images, controlnet=[net, net])
    made = minsdxl.text2img(api["base"], **kw, controlnet_conditioning_scale=[0.5, 0.8])[0]
    _same(folder / "cn_multi.png", made)
    meta = read_png_metadata(folder / "cn_multi.png")["minsdxl"]
    assert [m["sha256"] for m in meta["control_image"]] == [
        hashlib.sha256(paths[k].read_bytes()).hexdigest() for k in ("control_image", "control_image_2")
    ]
    call = meta["calls"][0]["kwargs"]
    assert call["controlnet"] == [str(paths["controlnet"].resolve())] * 2
    assert call["image"] == [str(paths[k].resolve()) for k in ("control_image", "control_image_2")]
    assert call["controlnet_conditioning_scale"] == [0.5, 0.8]
    _ok(runs["cn_multi_again"])  # --from-png loads both again
    assert np.array_equal(_pixels(folder / "cn_multi_again.png"), _pixels(folder / "cn_multi.png"))


def test_list_flags_are_parsed(capsys):
    args = build_parser()[1]["generate"].parse_args(["--controlnet-scale", "0.5,0.8", "--control-mode", "3"])
    assert args.controlnet_scale == [0.5, 0.8] and args.control_mode == 3  # one value stays a number
    with pytest.raises(SystemExit) as e:  # argparse's usage error
        main(["generate", "--controlnet-scale", "0.5,x"])
    assert e.value.code == 2 and "expected a float or a comma-separated list, got '0.5,x'" in capsys.readouterr().err


def test_compile_flag_compiles_base_and_refiner_and_is_not_replayed(paths, tmp_path, monkeypatch):
    """--compile reaches minsdxl.load(compile=True) for both models (compiling itself: tests/test_compile.py),
    and is a run-only flag: --from-png does not store it."""
    seen = []
    monkeypatch.setattr(minsdxl.speed, "compile", lambda model, **kw: seen.append(model.kind) or model)
    out = tmp_path / "c.png"
    argv = ["-p", "a cat", "--model", str(paths["base"]), "-W", "64", "-H", "64", "--steps", "2", "-s", "1", "-q"]
    argv += ["--refiner", str(paths["refiner"]), "--compile", "-o", str(out)]
    assert main(argv) == 0 and seen == ["base", "refiner"]
    assert "compile" not in read_png_metadata(out)["minsdxl"]["args"]


def test_controlnet_union_img2img(runs, api, paths):
    _ok(runs["union"])
    init = PIL.Image.open(paths["init"])  # 64x76: the CLI rounds down to 64x72 and resizes (Lanczos)
    init = init.resize((64, 72), resample=PIL.Image.LANCZOS)
    union = minsdxl.load_controlnet(paths["union"])
    edges = PIL.Image.open(paths["control_image"])
    kw = dict(prompt="a cat", num_inference_steps=3, seed=2, progress=False, image=init, control_image=edges)
    made = minsdxl.img2img(api["base"], **kw, controlnet=union, control_mode=3, width=64, height=72)[0]
    _same(runs["dirs"]["lora"] / "union.png", made)
    call = read_png_metadata(runs["dirs"]["lora"] / "union.png")["minsdxl"]["calls"][0]["kwargs"]
    assert call["control_mode"] == 3 and call["control_image"] == str(paths["control_image"].resolve())
    assert call["strength"] == 0.8 and call["controlnet_conditioning_scale"] == 0.8  # the ControlNet defaults


def test_t2i_adapter_flags_metadata_and_from_png(runs, api, paths):
    _ok(runs["adapter"])
    folder = runs["dirs"]["lora"]
    adapter = minsdxl.load_t2i_adapter(paths["t2i_adapter"])
    kw = dict(prompt="a cat", num_inference_steps=3, seed=3, progress=False, image=PIL.Image.open(paths["init"]))
    made = minsdxl.text2img(
        api["base"], **kw, adapter=adapter, adapter_conditioning_scale=0.8, adapter_conditioning_factor=0.5
    )
    assert made[0].size == (64, 64)  # the 64x76 image's size rounded down to the adapter's 16
    _same(folder / "adapter.png", made[0])
    meta = read_png_metadata(folder / "adapter.png")["minsdxl"]
    weights = paths["t2i_adapter"] / "diffusion_pytorch_model.safetensors"
    assert meta["t2i_adapter"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    call = meta["calls"][0]["kwargs"]
    assert call["image"] == str(paths["init"].resolve()) and call["adapter"] == str(paths["t2i_adapter"].resolve())
    assert call["adapter_conditioning_scale"] == 0.8 and call["adapter_conditioning_factor"] == 0.5
    _ok(runs["adapter_again"])
    assert np.array_equal(_pixels(folder / "adapter_again.png"), _pixels(folder / "adapter.png"))


def test_pag_prompt_weighting_and_embedding_flags(runs, paths):
    _ok(runs["pag"])
    model = minsdxl.load(paths["base"])
    minsdxl.load_textual_inversion(model, paths["embeddings"] / "mystyle.safetensors", "mystyle")
    minsdxl.load_textual_inversion(model, paths["neg_embedding"], "<neg>")
    layers = ["mid", "up_blocks.0.attentions.1"]
    kw = dict(T2I, prompt=WEIGHTED, negative_prompt=NEGATIVE, seed=7, pag_scale=3.0, pag_applied_layers=layers)
    made = minsdxl.text2img(model, **kw, prompt_weighting="a1111", progress=False)[0]
    png = runs["dirs"]["lora"] / "pag.png"
    _same(png, made)
    meta = read_png_metadata(png)
    call = meta["minsdxl"]["calls"][0]["kwargs"]
    assert call["pag_scale"] == 3.0 and call["pag_applied_layers"] == layers and call["prompt_weighting"] == "a1111"
    # the folder's embedding the prompt names is loaded, the other is not; A1111's "TI hashes"
    assert [(Path(x["path"]).name, x["token"]) for x in meta["minsdxl"]["embeddings"]] == [
        ("neg.safetensors", "<neg>"),
        ("mystyle.safetensors", "mystyle"),
    ]
    assert meta["infotext"]["TI hashes"].startswith("<neg>: ") and ", mystyle: " in meta["infotext"]["TI hashes"]
    plain = minsdxl.text2img(model, **kw, progress=False)[0]
    assert np.abs(np.asarray(plain, dtype=float) - np.asarray(made, dtype=float)).max() > 0  # the syntax was read


def test_info_on_controlnets_and_adapters(paths, capsys):
    for key, kind in (("controlnet", "ControlNet"), ("union", "ControlNet-Union"), ("t2i_adapter", "T2I-Adapter")):
        r = describe_control(paths[key])
        assert r["kind"] == kind and "problem" not in r and r["parameters"] > 0 and r["dtypes"] == ["float32"], r
    assert main(["info", str(paths["controlnet"])]) == 0
    assert f"{paths['controlnet']}: ControlNet for SDXL, " in capsys.readouterr().out
    for other in ("base", "single", "lora_style", "init"):  # a whole model, a LoRA, an image: not one of them
        assert describe_control(paths[other]) is None


def test_instruct_pix2pix_model(runs, paths):
    _ok(runs["pix2pix"])
    init = PIL.Image.open(paths["init"])
    model = minsdxl.load(paths["pix2pix"])
    kw = dict(prompt="make it red", image=init, num_inference_steps=3, image_guidance_scale=1.8, height=72, width=64)
    _same(runs["dirs"]["lora"] / "edit.png", minsdxl.instruct_pix2pix(model, **kw, seed=5, progress=False)[0])
    call = read_png_metadata(runs["dirs"]["lora"] / "edit.png")["minsdxl"]["calls"][0]
    assert call["function"] == "instruct_pix2pix" and call["kwargs"]["image_guidance_scale"] == 1.8


def test_ip_adapter_and_freeu_flags_metadata_and_from_png(runs, api, paths):
    _ok(runs["ip"])
    folder = runs["dirs"]["lora"]
    model = minsdxl.load(paths["base"])
    minsdxl.load_ip_adapter(model, paths["ip_adapter"])  # finds image_encoder/ beside the file, as the CLI
    minsdxl.set_ip_adapter_scale(model, 0.7)
    model.unet.enable_freeu(0.9, 0.2, 1.3, 1.4)
    style = PIL.Image.open(paths["ip_image"])
    _same(folder / "ip.png", minsdxl.text2img(model, **T2I, seed=6, ip_adapter_image=style, progress=False)[0])
    model.unet.disable_freeu()
    no_freeu = np.asarray(minsdxl.text2img(model, **T2I, seed=6, ip_adapter_image=style, progress=False)[0])
    assert np.abs(_pixels(folder / "ip.png").astype(int) - no_freeu).mean() > 1  # FreeU matters
    plain = np.asarray(minsdxl.text2img(api["base"], **T2I, seed=6, progress=False)[0])
    assert np.abs(no_freeu.astype(int) - plain).mean() > 1  # the image prompt matters
    meta = read_png_metadata(folder / "ip.png")["minsdxl"]
    assert meta["ip_adapter"]["sha256"] == hashlib.sha256(paths["ip_adapter"].read_bytes()).hexdigest()
    assert meta["ip_adapter_image"]["sha256"] == hashlib.sha256(paths["ip_image"].read_bytes()).hexdigest()
    assert meta["calls"][0]["kwargs"]["ip_adapter_image"] == str(paths["ip_image"].resolve())
    assert meta["args"]["ip_adapter_scale"] == 0.7 and meta["args"]["freeu"] == [0.9, 0.2, 1.3, 1.4]
    _ok(runs["ip_again"])  # --from-png loads the adapter and the image prompt again
    assert np.array_equal(_pixels(folder / "ip_again.png"), _pixels(folder / "ip.png"))


def test_vae_tiling_and_eta_flags(runs, paths):
    _ok(runs["tiled"])
    model = minsdxl.load(paths["base"])
    kw = dict(prompt="a cat", width=96, height=64, num_inference_steps=2, seed=8, progress=False)
    kw |= dict(scheduler="tcd", eta=0.3)
    model.vae.enable_tiling()
    _same(runs["dirs"]["lora"] / "tiled.png", tiled := minsdxl.text2img(model, **kw)[0])
    model.vae.disable_tiling()
    assert not np.array_equal(np.asarray(tiled), np.asarray(minsdxl.text2img(model, **kw)[0]))
    meta = read_png_metadata(runs["dirs"]["lora"] / "tiled.png")
    assert meta["minsdxl"]["args"]["vae_tiling"] is True
    assert {"Sampler": "TCD", "Eta": "0.3"}.items() <= meta["infotext"].items()


def test_storage_dtype_flag_and_from_png(runs, api, paths):
    """--storage-dtype fp8: the UNet's layers stored in float8 (minsdxl.load(storage_dtype=)), replayed."""
    _ok(runs["fp8"])
    folder = runs["dirs"]["lora"]
    model = minsdxl.load(paths["base"], storage_dtype=torch.float8_e4m3fn)
    kw = dict(prompt="a cat", num_inference_steps=2, seed=9, progress=False)
    _same(folder / "fp8.png", minsdxl.text2img(model, **kw)[0])
    assert not np.array_equal(_pixels(folder / "fp8.png"), np.asarray(minsdxl.text2img(api["base"], **kw)[0]))
    assert read_png_metadata(folder / "fp8.png")["minsdxl"]["args"]["storage_dtype"] == "fp8"
    _ok(runs["fp8_again"])
    assert np.array_equal(_pixels(folder / "fp8.2.png"), _pixels(folder / "fp8.png"))


def test_img2img_then_img2img_refiner(runs, api, paths):
    r = _ok(runs["i2i"])
    assert "denoising" not in r.stderr  # -q
    kw = dict(prompt="a cat", num_inference_steps=2, seed=1, clip_skip=1, progress=False)
    # the CLI resizes the 64x76 image to 64x72 itself; the API, given it as it is, does the same
    image = minsdxl.img2img(api["base"], image=PIL.Image.open(paths["init"]), strength=0.5, **kw)[0]
    _same(
        runs["dirs"]["i2i"] / "i2i.png",
        minsdxl.img2img(api["refiner"], image=image, strength=0.5, aesthetic_score=7.0, **kw)[0],
    )
    meta = read_png_metadata(runs["dirs"]["i2i"] / "i2i.png")
    # A1111 counts the layer read from the end (2 = penultimate, SDXL's default); diffusers' clip_skip=1 reads -3
    expected = {"Denoising strength": "0.5", "Refiner strength": "0.5", "Size": "64x72", "Clip skip": "3"}
    assert expected.items() <= meta["infotext"].items()
    assert meta["minsdxl"]["args"]["clip_skip"] == 1
    assert meta["infotext"]["Refiner"].startswith(f"{paths['refiner'].name} [")
    calls = meta["minsdxl"]["calls"]
    assert [c["function"] for c in calls] == ["img2img", "img2img"]
    assert calls[0]["kwargs"]["image"] == str(paths["init"].resolve())
    assert calls[1]["kwargs"]["aesthetic_score"] == 7.0 and calls[1]["kwargs"]["strength"] == 0.5
    assert meta["minsdxl"]["refiner"]["kind"] == "refiner"


def test_refiner_switch_handoff_and_verbose(runs, api):
    r = _ok(runs["switch"])
    kw = dict(prompt="a cat", num_inference_steps=4, seed=2, progress=False)
    latents = minsdxl.text2img(api["base"], height=64, width=64, denoising_end=0.5, output_type="latent", **kw)
    _same(
        runs["dirs"]["switch"] / "switch.png",
        minsdxl.img2img(api["refiner"], image=latents, denoising_start=0.5, **kw)[0],
    )
    meta = read_png_metadata(runs["dirs"]["switch"] / "switch.png")
    assert meta["infotext"]["Refiner switch at"] == "0.5"
    calls = meta["minsdxl"]["calls"]
    assert calls[0]["kwargs"]["denoising_end"] == 0.5 and calls[0]["kwargs"]["output_type"] == "latent"
    assert calls[1]["kwargs"]["denoising_start"] == 0.5
    # -v: load times, dtype decisions, effective steps (4 steps split at 0.5), peak memory
    assert "loaded" in r.stderr and "float32" in r.stderr
    assert "2 text2img + 2 img2img steps" in r.stderr and "peak memory" in r.stderr


def test_inpaint_only_masked_with_mask_blur(runs, api, paths):
    _ok(runs["inpaint_crop"])
    image, mask = PIL.Image.open(paths["init"]), PIL.Image.open(paths["mask"])
    blurred = diffusers.image_processor.VaeImageProcessor.blur(mask, blur_factor=3)
    assert np.array_equal(np.asarray(blur_mask(mask, 3)), np.asarray(blurred))  # = diffusers' mask_processor.blur
    kw = dict(image=image, height=64, width=64, num_inference_steps=2, seed=3, padding_mask_crop=4)
    path = runs["dirs"]["inpaint"] / "crop.png"
    made = minsdxl.inpaint(api["inpaint"], "a dog", mask_image=blurred, **kw)[0]
    _same(path, made)
    sharp = np.asarray(minsdxl.inpaint(api["inpaint"], "a dog", mask_image=mask, **kw)[0], dtype=float)
    assert np.abs(sharp - np.asarray(made, dtype=float)).max() > 0  # the soft edge blends the paste-back
    assert PIL.Image.open(path).size == image.size  # pasted back into the whole image
    meta = read_png_metadata(path)
    assert {"Inpaint area": "Only masked", "Masked area padding": "4", "Mask blur": "3"}.items() <= meta[
        "infotext"
    ].items()
    assert meta["minsdxl"]["calls"][0]["kwargs"]["padding_mask_crop"] == 4


def test_outpaint_canvas_and_mask():
    rng = np.random.default_rng(1)
    image = PIL.Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    canvas, mask = outpaint_canvas(image, left=8, top=0, right=2, bottom=4, overlap=3)
    c, m, a = np.asarray(canvas), np.asarray(mask), np.asarray(image)
    assert canvas.size == mask.size == (40, 24)
    assert np.array_equal(c[0:20, 8:38], a)  # the picture where it was
    assert np.array_equal(c[0:20, :8], np.repeat(a[:, :1], 8, axis=1))  # its edge column repeated
    assert np.array_equal(c[20:, 8:38], np.repeat(a[-1:], 4, axis=0))
    kept = np.zeros((24, 40), bool)
    kept[0 : 20 - 3, 8 + 3 : 38 - 3] = True  # the picture less 3 px along the extended sides (not the top)
    assert np.array_equal(m == 0, kept) and set(np.unique(m)) == {0, 255}
    for bad in (dict(), dict(left=-8), dict(left=8, overlap=-1), dict(left=2.5)):
        with pytest.raises(ValueError, match="outpaint sizes must be whole pixels"):
            outpaint_canvas(image, **bad)


def test_outpaint_flag(paths, tmp_path):
    out = tmp_path / "wide.png"
    argv = ["-p", "a dog", "--model", str(paths["inpaint"]), "-i", str(paths["init"]), "--outpaint", "16,0,8,4"]
    assert main([*argv, "--outpaint-overlap", "4", "--steps", "2", "-s", "3", "-q", "-o", str(out)]) == 0
    canvas, mask = outpaint_canvas(PIL.Image.open(paths["init"]), 16, 0, 8, 4, overlap=4)
    assert canvas.size == (88, 80)  # 64x76 grown
    model = minsdxl.load(paths["inpaint"])
    made = minsdxl.inpaint(model, "a dog", image=canvas, mask_image=mask, width=88, height=80,
                           num_inference_steps=2, seed=3, progress=False)  # fmt: skip
    _same(out, made[0])
    assert main([*argv, "--mask", str(paths["mask"])]) == 1  # it makes its own mask


def test_inpaint_random_seed_no_metadata(runs, api, paths):
    r = _ok(runs["inpaint"])
    seed = int(r.stdout.rsplit("(seed ", 1)[1].split(")")[0])  # random, and reported
    image, mask = PIL.Image.open(paths["init"]), PIL.Image.open(paths["mask"])
    # the size defaults to the init image's rounded down to a multiple of 8 (64x76 -> 64x72); the inpaint
    # API alone would use the model's default (128x128)
    expected = minsdxl.inpaint(
        api["inpaint"], "a dog", image=image, mask_image=mask, height=72, width=64, num_inference_steps=2, seed=seed
    )[0]
    _same(runs["dirs"]["inpaint"] / "inpaint.png", expected)
    assert read_png_metadata(runs["dirs"]["inpaint"] / "inpaint.png") == {
        "parameters": None,
        "infotext": {},
        "minsdxl": None,
    }


def test_info(runs, tiny_base, tiny_refiner):
    text = _ok(runs["info"]).stdout
    assert "single file" in text and "SDXL base" in text and "every component matches" in text
    n_unet = sum(p.numel() for p in tiny_base[0].unet.parameters())
    assert f"{n_unet:,}" in text

    report = json.loads(_ok(runs["info_folder"]).stdout)
    assert report["kind"] == "refiner" and report["layout"] == "diffusers folder"
    assert set(report["components"]) == {"unet", "vae", "text_encoder_2"}
    for name in ("unet", "vae", "text_encoder_2"):
        c = report["components"][name]
        assert c["parameters"] == sum(p.numel() for p in getattr(tiny_refiner[0], name).parameters())
        assert c["dtypes"] == ["float32"] and "problem" not in c

    broken = runs["info_broken"]
    assert broken.returncode == 1  # a component that would not load
    report = json.loads(broken.stdout)
    assert "missing 1 keys (conv_out.bias)" in report["components"]["unet"]["problem"]
    assert "problem" not in report["components"]["vae"]


# ------------------------------------------------------------------------------------------------
# Errors: a clear message on stderr, exit code 1, no traceback, nothing written

ERRORS = {
    "missing_model": (["--model", "no/such/folder/sdxl"], "no such file or folder"),
    "hub_id_offline": (["--model", "stabilityai/stable-diffusion-xl-base-1.0"], "huggingface-cli download"),
    "unreadable_init": (["--model", "{base}", "-i", "{not_an_image}"], "cannot read the init image"),
    "missing_mask": (["--model", "{inpaint}", "-i", "{init}", "--mask", "nope.png"], "cannot read the mask"),
    "mask_size": (["--model", "{inpaint}", "-i", "{init}", "--mask", "{mask_64}"], "must be the same size"),
    "size_not_8": (["--model", "{base}", "-W", "100"], "-W/--width 100 is not a positive multiple of 8"),
    "unknown_sampler": (["--model", "{base}", "--sampler", "Heun++"], "unknown scheduler 'Heun++'"),
    "outdir_not_writable": (["--model", "{base}", "--outdir", "a_file/images"], "a_file is a file, not a folder"),
    "not_a_refiner": (
        ["--model", "{base}", *SIZE, "--refiner", "{inpaint}"],
        "is an SDXL inpaint checkpoint, not a refiner",
    ),
    "no_overwrite": (["--model", "{base}", *SIZE, "-o", "a_file"], "a_file already exists"),
    "from_png_without_metadata": (["--from-png", "{init}"], "has no minsdxl metadata"),
    "lora_missing": (["--model", "{base}", "--lora", "nope.safetensors:0.5"], "--lora nope.safetensors:0.5: no file"),
    "lora_tag_without_dir": (["--model", "{base}", "-p", "a cat <lora:x:0.5>"], "pass --lora-dir DIR"),
    "lora_not_a_lora": (["--model", "{base}", *SIZE, "--lora", "{init}"], "unknown weights format"),
    "embedding_missing": (
        ["--model", "{base}", "--embedding", "nope.safetensors:x"],
        "--embedding nope.safetensors:x: no",
    ),
    "embedding_sd15": (["--model", "{base}", *SIZE, "--embedding", "{lora_style}"], "SDXL embedding carries `clip_l`"),
    "ip_adapter_without_image": (["--model", "{base}", "--ip-adapter", "{ip_adapter}"], "pass both"),
    "controlnet_without_image": (["--model", "{base}", "--controlnet", "{controlnet}"], "go together: pass both"),
    "adapter_in_img2img": (
        ["--model", "{base}", "-i", "{init}", "--t2i-adapter", "{t2i_adapter}", "--adapter-image", "{init}"],
        "--t2i-adapter works in text2img",
    ),
    "control_scale_without_controlnet": (["--model", "{base}", "--guess-mode"], "apply to a --controlnet"),
    "image_cfg_on_base": (["--model", "{base}", "-i", "{init}", "--image-cfg", "1.5"], "applies to InstructPix2Pix"),
    "pix2pix_without_image": (["--model", "{pix2pix}", *SIZE], "edits the image given with -i IMAGE"),
    "mask_padding_without_mask": (["--model", "{base}", "-i", "{init}", "--mask-padding", "8"], "pass --mask"),
    "mask_padding_with_switch": (
        ["--model", "{base}", "-i", "{init}", "--mask", "{mask}", "--mask-padding", "8", "--refiner", "{refiner}"],
        "use --refiner-mode img2img with it",
    ),
}


@pytest.fixture(scope="module")
def error_runs(paths, tmp_path_factory):
    p = {k: str(v) for k, v in paths.items()}
    jobs, before = {}, {}
    for name, (argv, _) in ERRORS.items():
        cwd = tmp_path_factory.mktemp(name)
        (cwd / "a_file").write_text("keep me")
        if name == "no_overwrite":
            argv = [a.replace("a_file", "a_file.png") for a in argv]
            (cwd / "a_file.png").write_text("keep me")
        jobs[name] = (["minsdxl", "generate", *[a.format(**p) for a in argv]], cwd)
        before[name] = _files(cwd)
    results = _run_all(jobs, paths["cache"])
    return {name: (results[name], jobs[name][1], before[name]) for name in ERRORS}


@pytest.mark.parametrize("name", ERRORS)
def test_error(name, error_runs):
    r, cwd, before = error_runs[name]
    message = ERRORS[name][1].replace("a_file", "a_file.png") if name == "no_overwrite" else ERRORS[name][1]
    assert r.returncode == 1, f"exit {r.returncode}; stderr: {r.stderr}"
    assert "minsdxl: error: " in r.stderr and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert _files(cwd) == before  # nothing written (no outputs/ folder either)
    assert all(f.read_text() == "keep me" for f in cwd.glob("a_file*"))


def test_infotext_quoting_round_trip():
    """A1111's quoting: values with commas, colons or newlines are JSON strings; the prompt keeps its lines."""
    params = {"Steps": 30, "Sampler": "DPM++ 2M Karras", "Model": 'my, model: "v2"', "Seed": 1, "Skipped": None}
    text = infotext("line one\nline two, with comma", "", params)
    assert "Negative prompt" not in text and "Skipped" not in text
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "line one\nline two, with comma" and parsed["Negative prompt"] == ""
    assert parsed["Model"] == 'my, model: "v2"' and parsed["Sampler"] == "DPM++ 2M Karras" and parsed["Steps"] == "30"


def test_save_png_is_atomic_and_never_overwrites(tmp_path, monkeypatch):
    """An interrupted write leaves neither the image nor its temporary file; an existing file is kept."""
    image = PIL.Image.new("RGB", (8, 8), "red")

    def interrupted(self, fp, **kw):
        fp.write(b"\x89PNG half an image")
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(PIL.Image.Image, "save", interrupted)
        save_png(image, tmp_path / "a.png", {"parameters": "x"})
    assert os.listdir(tmp_path) == []

    (tmp_path / "b.png").write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        save_png(image, tmp_path / "b.png", {})
    assert (tmp_path / "b.png").read_bytes() == b"keep me" and os.listdir(tmp_path) == ["b.png"]
    save_png(image, tmp_path / "b.png", {"parameters": "p"}, overwrite=True)
    assert read_png_metadata(tmp_path / "b.png")["parameters"] == "p" and os.listdir(tmp_path) == ["b.png"]


def test_sampler_name_stored_for_from_png():
    from minsdxl.cli import _scheduler_name
    from minsdxl.schedulers import SDXL_SCHEDULER_CONFIG

    def stored(name, **config):
        config = {**SDXL_SCHEDULER_CONFIG, **config}
        return _scheduler_name(minsdxl.make_scheduler(name, config), config)

    assert stored("DPM++ 2M Karras") == "dpmpp_2m_karras"
    assert stored("unipc", use_karras_sigmas=True) == "unipc_karras"
    # a model config's heun-type DPM-Solver: "dpmpp_2m" with that config is that scheduler again
    assert stored(None, _class_name="DPMSolverMultistepScheduler", solver_type="heun") == "dpmpp_2m"
    # no name makes a first-order DPM-Solver: None, and --from-png takes the model's default (its config)
    assert stored(None, _class_name="DPMSolverMultistepScheduler", solver_order=1) is None


def test_ip_adapter_embeds_flag(paths, tmp_path, capsys):
    """--ip-adapter-embeds FILE: diffusers' ip_adapter_image_embeds from a file (no image encoder needed, as for
    a FaceID adapter's insightface embeddings): the API's image, its hash recorded, replayed by --from-png."""
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 1, TINY_VISION.projection_dim, generator=g)  # [negative, positive] rows, one image
    save_safetensors({"embeds": embeds}, tmp_path / "face.safetensors")
    torch.save([embeds], tmp_path / "face.pt")
    out = tmp_path / "e.png"
    argv = [*T2I_FLAGS, "--model", str(paths["base"]), "-s", "6", "-q", "--ip-adapter", str(paths["ip_adapter"])]
    assert main([*argv, "--ip-adapter-embeds", str(tmp_path / "face.safetensors"), "-o", str(out)]) == 0
    model = minsdxl.load(paths["base"])
    minsdxl.load_ip_adapter(model, paths["ip_adapter"], image_encoder_folder=None)
    made = minsdxl.text2img(model, **T2I, seed=6, ip_adapter_image_embeds=[embeds], progress=False)[0]
    _same(out, made)
    meta = read_png_metadata(out)["minsdxl"]
    assert (
        meta["ip_adapter_embeds"]["sha256"] == hashlib.sha256((tmp_path / "face.safetensors").read_bytes()).hexdigest()
    )
    assert meta["calls"][0]["kwargs"]["ip_adapter_image_embeds"].endswith("face.safetensors")
    assert main(["--from-png", str(out), "-q", "-o", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(_pixels(tmp_path / "again.png"), _pixels(out))
    assert main([*argv, "--ip-adapter-embeds", str(tmp_path / "face.pt"), "-o", str(tmp_path / "pt.png")]) == 0
    assert np.array_equal(_pixels(tmp_path / "pt.png"), _pixels(out))  # a .pt list: the same
    assert (
        main([*argv, "--ip-adapter-embeds", str(tmp_path / "face.pt"), "--ip-adapter-image", str(paths["ip_image"])])
        == 1
    )
    assert "the image or its embeddings, not both" in capsys.readouterr().err
