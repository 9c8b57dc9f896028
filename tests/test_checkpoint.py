"""Loading: diffusers folders (+ fp16 variants), single-file sgm checkpoints judged by diffusers'
own from_single_file, standalone components, and a clear error for every bad input."""

import copy
import hashlib
import json
import shutil

import diffusers
import numpy as np
import PIL.Image
import pytest
import safetensors.torch
import torch
from sdxl_testing import component_state_dicts, randomize_, rel_err

import minsdxl
from minsdxl.checkpoint import CheckpointError, diffusers_to_sgm, read_safetensors, save_safetensors, sgm_to_diffusers

PIPELINES = {
    "base": diffusers.StableDiffusionXLPipeline,
    "refiner": diffusers.StableDiffusionXLImg2ImgPipeline,
    "inpaint": diffusers.StableDiffusionXLInpaintPipeline,
}


def _assert_same_weights(model, expected: dict):
    for comp, sd in expected.items():
        got = getattr(model, comp).state_dict()
        assert set(got) == set(sd), f"{comp}: {sorted(set(got) ^ set(sd))[:5]}"
        for k, v in sd.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), f"{comp}.{k}"


def _assert_same_outputs(model, pipe):
    """UNet and VAE outputs of a loaded minsdxl model vs the diffusers pipeline it came from."""
    cfg = model.unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 16, 8, generator=g)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    pooled = pipe.text_encoder_2.config.projection_dim
    n_ids = (cfg.projection_class_embeddings_input_dim - pooled) // cfg.addition_time_embed_dim
    text, ids = torch.randn(2, pooled, generator=g), torch.rand(2, n_ids, generator=g) * 1024
    ref = pipe.unet(x, 700.0, ctx, added_cond_kwargs={"text_embeds": text, "time_ids": ids}).sample
    assert rel_err(model.unet(x, 700.0, ctx, text, ids), ref) <= 1e-5
    z = torch.randn(1, 4, 8, 8, generator=g)
    assert rel_err(model.vae.decode(z), pipe.vae.decode(z).sample) <= 1e-5


@pytest.mark.parametrize("kind", ["base", "refiner", "inpaint"])
def test_diffusers_folder(kind, request):
    pipe, folder = request.getfixturevalue(f"tiny_{kind}")
    model = minsdxl.load(folder)
    assert model.kind == kind
    assert model.force_zeros_for_empty_prompt == pipe.config.force_zeros_for_empty_prompt
    assert model.requires_aesthetics_score == pipe.config.get("requires_aesthetics_score", False)
    assert (model.text_encoder is None) == (kind == "refiner")
    assert model.scheduler_config["timestep_spacing"] == "leading"
    _assert_same_weights(model, component_state_dicts(pipe))
    _assert_same_outputs(model, pipe)


def test_fp16_variant_and_dtype(tiny_base, tmp_path):
    pipe, _ = tiny_base
    half = PIPELINES["base"](**copy.deepcopy(pipe.components)).to(torch.float16)  # keep the fixture fp32
    half.save_pretrained(tmp_path, variant="fp16", safe_serialization=True)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    model = minsdxl.load(tmp_path, dtype=torch.float16)
    assert model.unet.dtype == torch.float16 and model.text_encoder_2.dtype == torch.float16
    assert model.vae.dtype == torch.float32  # force_upcast: the VAE stays fp32 (= diffusers' upcast_vae)
    _assert_same_weights(model, {c: sd for c, sd in component_state_dicts(half).items() if c != "vae"})
    # fp16 weights loaded as fp32: converted at load, values exact
    model32 = minsdxl.load(tmp_path, dtype=torch.float32)
    assert torch.equal(model32.unet.conv_in.weight, half.unet.conv_in.weight.float())


@pytest.mark.parametrize("kind", ["base", "refiner", "inpaint"])
def test_save_writes_a_folder_diffusers_loads(kind, request, tmp_path, monkeypatch):
    """minsdxl.checkpoint.save -> diffusers' from_pretrained (the judge) and minsdxl.load both read it back,
    tensors and flags identical; fp16 casting and the fp16 variant name; an existing folder is refused."""
    from minsdxl.checkpoint import save

    pipe, folder = request.getfixturevalue(f"tiny_{kind}")
    model = minsdxl.load(folder)
    out = save(model, tmp_path / "saved")
    again = PIPELINES[kind].from_pretrained(out, local_files_only=True, add_watermarker=False)
    assert again.config.force_zeros_for_empty_prompt == pipe.config.force_zeros_for_empty_prompt
    assert again.config.get("requires_aesthetics_score", False) == pipe.config.get("requires_aesthetics_score", False)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(again.scheduler.config) == public(pipe.scheduler.config)
    assert type(again.scheduler) is type(pipe.scheduler)
    _assert_same_weights(minsdxl.load(out), component_state_dicts(pipe))
    _assert_same_weights(again, component_state_dicts(pipe))
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, name, None) is not None:
            prompts = ["a red circle!! at the top left", "zebra, 1girl"]
            kw = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            saved, original = getattr(again, name), getattr(pipe, name)
            assert torch.equal(saved(prompts, **kw).input_ids, original(prompts, **kw).input_ids)
            assert saved.pad_token == original.pad_token
    half = save(model, tmp_path / "half", dtype=torch.float16, variant="fp16")
    assert (half / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert minsdxl.load(half, dtype=torch.float16).unet.conv_in.weight.dtype == torch.float16
    with pytest.raises(FileExistsError, match="exists"):
        save(model, out)
    # a failure half-way (here the third weights file) leaves neither the folder nor its .part behind
    calls = []

    def failing(sd, path, dtype=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return write(sd, path, dtype)

    write = minsdxl.checkpoint.save_safetensors
    monkeypatch.setattr(minsdxl.checkpoint, "save_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        save(model, tmp_path / "broken")
    assert len(calls) == 3 and calls[0].parent.parent.name == "broken.part"
    assert not (tmp_path / "broken").exists() and not (tmp_path / "broken.part").exists()
    monkeypatch.undo()
    # a single file read without config= has no scheduler config; load() samples with SDXL's
    # (make_scheduler's default), so save writes that one, not a bare class name diffusers would fill
    # with its class defaults (linear betas to 0.02, "linspace" spacing)
    model.scheduler_config = {}
    sched = diffusers.EulerDiscreteScheduler.from_pretrained(save(model, tmp_path / "from_file"), subfolder="scheduler")
    assert (sched.config.beta_schedule, sched.config.beta_end, sched.config.timestep_spacing) == (
        "scaled_linear",
        0.012,
        "leading",
    )


def _sgm_file(pipe, path):
    safetensors.torch.save_file(diffusers_to_sgm(component_state_dicts(pipe)), path)
    return path


@pytest.mark.parametrize("kind", ["base", "refiner", "inpaint"])
def test_single_file_is_genuine_sgm_and_loads(kind, request, tmp_path):
    pipe, folder = request.getfixturevalue(f"tiny_{kind}")
    path = _sgm_file(pipe, tmp_path / "model.safetensors")
    keys = read_safetensors(path).keys()
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    # the independent judge: diffusers' own single-file loader reads our file bit-identically
    judge = PIPELINES[kind].from_single_file(str(path), config=str(folder), local_files_only=True)
    expected = component_state_dicts(pipe)
    judged = component_state_dicts(judge)
    assert judged.keys() == expected.keys()
    assert all(set(sd) == set(expected[comp]) for comp, sd in judged.items())
    for comp, sd in judged.items():
        for k, v in sd.items():
            assert torch.equal(v, expected[comp][k]), f"diffusers read {comp}.{k} differently"
    # tiny configs need config= for head size / norm groups (the real SDXL values are the defaults)
    model = minsdxl.load(path, config=folder)
    assert model.kind == kind
    _assert_same_weights(model, expected)
    _assert_same_outputs(model, judge)


def test_single_file_ignores_ema_and_unknown_prefixes(tiny_base, tmp_path):
    pipe, _ = tiny_base
    sd = diffusers_to_sgm(component_state_dicts(pipe))
    sd["model_ema.decay"] = torch.tensor(0.999)
    sd["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(3)
    sd["denoiser.sigmas"] = torch.ones(1000)
    safetensors.torch.save_file(sd, tmp_path / "m.safetensors")
    _assert_same_weights(minsdxl.load(tmp_path / "m.safetensors", config=tiny_base[1]), component_state_dicts(pipe))


def test_standalone_vae_and_legacy_attention_names(tiny_base, tmp_path):
    pipe, folder = tiny_base
    vae_sd = pipe.vae.state_dict()
    legacy = {
        k.replace("to_q.", "query.")
        .replace("to_k.", "key.")
        .replace("to_v.", "value.")
        .replace("to_out.0.", "proj_attn."): v
        for k, v in vae_sd.items()
    }
    assert legacy.keys() != vae_sd.keys()
    safetensors.torch.save_file(legacy, tmp_path / "vae.safetensors")
    vae = minsdxl.load_component(tmp_path / "vae.safetensors", config=folder / "vae")
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in vae_sd.items())
    # an sgm-layout VAE file (first_stage_model. stripped, as Stability ships sdxl_vae.safetensors)
    sgm_vae = {k.removeprefix("first_stage_model."): v for k, v in diffusers_to_sgm({"vae": vae_sd}).items()}
    safetensors.torch.save_file(sgm_vae, tmp_path / "sdxl_vae.safetensors")
    vae2 = minsdxl.load_component(tmp_path / "sdxl_vae.safetensors", config=folder / "vae")
    assert all(torch.equal(vae2.state_dict()[k], v) for k, v in vae_sd.items())
    # a component folder, and the vae= override of load()
    model = minsdxl.load(folder, vae=folder / "vae")
    assert torch.equal(model.vae.decoder.conv_out.weight, pipe.vae.decoder.conv_out.weight)


def test_unet_override_takes_a_unet_file_over_its_base(tiny_base, tmp_path):
    """load(base, unet=FILE) = diffusers' `from_pretrained(base, unet=UNet2DConditionModel(...) with the file's
    weights)` (SDXL-Lightning's recipe): a diffusers-named or sgm UNet file, its head size etc. from the base
    folder's unet/config.json; the CLI's --unet the same, recorded with its hash; a VAE file there is refused."""
    from minsdxl.cli import main, read_png_metadata

    pipe, folder = tiny_base
    other = randomize_(diffusers.UNet2DConditionModel(**pipe.unet.config), 11).eval()
    sd = other.state_dict()
    save_safetensors(sd, tmp_path / "lightning_unet.safetensors")
    save_safetensors(diffusers_to_sgm({"unet": sd}), tmp_path / "lightning_sgm.safetensors")
    for name in ("lightning_unet.safetensors", "lightning_sgm.safetensors"):
        model = minsdxl.load(folder, unet=tmp_path / name)
        assert all(torch.equal(model.unet.state_dict()[k], v) for k, v in sd.items()), name
    ref = diffusers.StableDiffusionXLPipeline(**{**pipe.components, "unet": other})
    ref.set_progress_bar_config(disable=True)
    kw = dict(prompt="a cat", num_inference_steps=2, height=64, width=64)
    expected = ref(**kw, generator=torch.Generator().manual_seed(0), output_type="latent").images
    got = minsdxl.text2img(model, **kw, seed=0, output_type="latent", progress=False)
    assert rel_err(got, expected) <= 1e-4  # the head size came from the base's config (8, not 64)
    out = tmp_path / "x.png"
    argv = ["-p", "a cat", "--model", str(folder), "--unet", str(tmp_path / name), "--steps", "2", "-W", "64"]
    assert main([*argv, "-H", "64", "-s", "0", "-q", "--no-watermark", "-o", str(out)]) == 0
    made = minsdxl.text2img(model, "a cat", num_inference_steps=2, height=64, width=64, seed=0, progress=False)[0]
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(made))
    assert (
        read_png_metadata(out)["minsdxl"]["unet"]["sha256"]
        == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    )
    with pytest.raises(CheckpointError, match="holds AutoencoderKL weights, not a UNet2DConditionModel"):
        minsdxl.load(folder, unet=folder / "vae")


def test_share_reuses_text_encoder_2_and_vae(tiny_base, tiny_refiner):
    base = minsdxl.load(tiny_base[1])
    refiner = minsdxl.load(tiny_refiner[1], share=base)
    assert refiner.text_encoder_2 is base.text_encoder_2 and refiner.vae is base.vae
    assert refiner.kind == "refiner" and refiner.unet is not base.unet


def test_loading_is_memory_mapped(tiny_base):
    """fp32 safetensors loaded as fp32: the parameters are views of the file mapping, not copies."""
    model = minsdxl.load(tiny_base[1])
    w = model.unet.conv_in.weight
    assert w.untyped_storage().nbytes() > w.numel() * 4  # one storage holds the whole file


def test_sgm_table_round_trip(tiny_base, tiny_refiner):
    for pipe, _ in (tiny_base, tiny_refiner):
        comps = component_state_dicts(pipe)
        back, unmapped = sgm_to_diffusers(diffusers_to_sgm(comps))
        assert not unmapped
        for c, sd in comps.items():
            assert set(back[c]) == set(sd) and all(torch.equal(back[c][k], v) for k, v in sd.items())


# ---- errors: each names the problem and the fix ----


def test_error_bundled_tiny_model_missing(tmp_path, monkeypatch):
    from minsdxl import tiny

    monkeypatch.setattr(tiny, "PATH", tmp_path / "gone")
    with pytest.raises(CheckpointError, match="bundled tiny model is missing.*train_tiny.py"):
        minsdxl.load("tiny")


def test_error_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        minsdxl.load(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="Hugging Face repo id.*huggingface-cli download"):
        minsdxl.load("stabilityai/stable-diffusion-xl-base-1.0")


def test_error_folder_not_sdxl(tmp_path, tiny_base):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model_index.json"):
        minsdxl.load(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="single component"):
        minsdxl.load(tiny_base[1] / "vae")


def test_error_truncated_and_corrupt_safetensors(tiny_base, tmp_path):
    src = tiny_base[1] / "unet" / "diffusion_pytorch_model.safetensors"
    data = src.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.*re-download"):
        minsdxl.load(tmp_path / "cut.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"0" * 64)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        minsdxl.load(tmp_path / "garbage.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="truncated"):
        minsdxl.load(tmp_path / "tiny.safetensors")
    # a diffusers folder whose UNet file is cut short
    shutil.copytree(tiny_base[1], tmp_path / "model")
    (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        minsdxl.load(tmp_path / "model")


def test_text_encoder_folder_with_only_pytorch_model_bin(tiny_base, tmp_path):
    # transformers' older file name (pytorch_model.bin) is read where model.safetensors is missing
    shutil.copytree(tiny_base[1], tmp_path / "model")
    te = tmp_path / "model" / "text_encoder"
    weights = read_safetensors(te / "model.safetensors")
    torch.save({k: v.clone() for k, v in weights.items()}, te / "pytorch_model.bin")
    (te / "model.safetensors").unlink()
    loaded = minsdxl.load(tmp_path / "model").text_encoder.state_dict()
    assert all(torch.equal(loaded[k], weights[k]) for k in loaded)


def test_error_sd15_checkpoint(tmp_path):
    sd = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "model.diffusion_model.time_embed.0.weight": torch.zeros(1280, 320),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(768),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
    }
    safetensors.torch.save_file(sd, tmp_path / "v1-5.safetensors")
    with pytest.raises(CheckpointError, match="Stable Diffusion 1.x/2.x.*SDXL"):
        minsdxl.load(tmp_path / "v1-5.safetensors")


def test_error_shape_mismatch_names_key_and_shapes(tiny_base, tmp_path):
    pipe, _ = tiny_base
    sd = diffusers_to_sgm(component_state_dicts(pipe))
    key = "model.diffusion_model.out.2.bias"
    sd[key] = torch.zeros(5)
    safetensors.torch.save_file(sd, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"conv_out\.bias has shape \(5,\).*expects \(4,\)"):
        minsdxl.load(tmp_path / "m.safetensors", config=tiny_base[1])


def test_error_missing_and_unexpected_keys(tiny_base, tmp_path):
    pipe, _ = tiny_base
    sd = diffusers_to_sgm(component_state_dicts(pipe))
    del sd["model.diffusion_model.time_embed.2.weight"]
    safetensors.torch.save_file(sd, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1 keys \(time_embedding\.linear_2\.weight\)"):
        minsdxl.load(tmp_path / "missing.safetensors", config=tiny_base[1])
    sd = diffusers_to_sgm(component_state_dicts(pipe))
    sd["model.diffusion_model.input_blocks.1.0.extra.weight"] = torch.zeros(2)
    safetensors.torch.save_file(sd, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected 1 keys \(down_blocks\.0\.resnets\.0\.extra\.weight\)"):
        minsdxl.load(tmp_path / "extra.safetensors", config=tiny_base[1])
    sd = diffusers_to_sgm(component_state_dicts(pipe))
    sd["model.diffusion_model.mystery.weight"] = torch.zeros(2)
    safetensors.torch.save_file(sd, tmp_path / "unknown.safetensors")
    with pytest.raises(CheckpointError, match=r"no known diffusers name \(model\.diffusion_model\.mystery\.weight\)"):
        minsdxl.load(tmp_path / "unknown.safetensors")


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickles_load_tensors_only(tiny_base, tmp_path, capsys):
    pipe, _ = tiny_base
    sd = diffusers_to_sgm(component_state_dicts(pipe))
    torch.save({"state_dict": sd}, tmp_path / "model.ckpt")
    _assert_same_weights(minsdxl.load(tmp_path / "model.ckpt", config=tiny_base[1]), component_state_dicts(pipe))
    torch.save({"state_dict": sd, "evil": _Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="refusing to load.*never executes pickled code"):
        minsdxl.load(tmp_path / "evil.ckpt")
    assert "pickled code ran" not in capsys.readouterr().out


def test_error_not_a_checkpoint(tmp_path):
    safetensors.torch.save_file({"foo.weight": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="not an SDXL single-file checkpoint"):
        minsdxl.load(tmp_path / "x.safetensors")
    (tmp_path / "x.onnx").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="unknown weights format"):
        minsdxl.load(tmp_path / "x.onnx")


def test_model_index_flags_respected(tiny_base, tmp_path):
    shutil.copytree(tiny_base[1], tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    index["force_zeros_for_empty_prompt"] = False
    (tmp_path / "m" / "model_index.json").write_text(json.dumps(index))
    assert minsdxl.load(tmp_path / "m").force_zeros_for_empty_prompt is False


def test_save_safetensors_round_trips_scalars_and_dtypes(tmp_path):
    # 0-dim tensors (a LoRA's alpha) and mixed dtypes, read back by safetensors itself
    sd = {"alpha": torch.tensor(8.0), "w": torch.randn(3, 2), "ids": torch.arange(4), "half": torch.ones(2).half()}
    path = tmp_path / "x.safetensors"
    minsdxl.checkpoint.save_safetensors(sd, path)
    back = safetensors.torch.load_file(path)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in sd.items())
    minsdxl.checkpoint.save_safetensors(sd, path, dtype=torch.bfloat16)  # floats cast, integers kept
    back = safetensors.torch.load_file(path)
    assert back["alpha"].shape == () and back["alpha"].dtype == torch.bfloat16 and back["ids"].dtype == torch.int64
