"""`minsdxl convert` / checkpoint.save_single_file: a diffusers folder to Stability's single file and back,
judged by diffusers' own from_single_file / from_pretrained, and what the single file carries beyond the
weights (Playground's latent statistics, A1111's v-prediction markers)."""

from dataclasses import replace

import diffusers
import pytest
import torch
from sdxl_testing import component_state_dicts

import minsdxl
from minsdxl.checkpoint import read_checkpoint, read_safetensors, save_single_file
from minsdxl.cli import main


def _same_weights(pipe, expected: dict, dtype):
    got = component_state_dicts(pipe)
    assert got.keys() == expected.keys()
    for comp, sd in expected.items():
        for k, v in sd.items():
            assert torch.equal(got[comp][k], v.to(dtype)), f"{comp}.{k} differs"


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_folder_to_single_file_and_back(kind, request, tmp_path, capsys):
    pipe, folder = request.getfixturevalue(f"tiny_{kind}")
    cls = type(pipe)
    expected = component_state_dicts(pipe)
    single = tmp_path / "model.safetensors"
    assert main(["convert", str(folder), str(single), "--dtype", "fp16"]) == 0
    assert f"wrote the SDXL {kind} {single}" in capsys.readouterr().out
    keys = read_safetensors(single)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.")) for k in keys)
    assert {str(t.dtype) for t in keys.values() if t.is_floating_point()} == {"torch.float16"}
    # the independent judge: diffusers reads our file as the same weights, rounded to fp16
    judge = cls.from_single_file(str(single), config=str(folder), local_files_only=True, dtype=torch.float16)
    _same_weights(judge, expected, torch.float16)
    # and back to a diffusers folder, which diffusers' from_pretrained reads
    back = tmp_path / "back"
    assert main(["convert", str(single), str(back), "--config", str(folder)]) == 0
    _same_weights(cls.from_pretrained(back, dtype=torch.float16), expected, torch.float16)
    assert minsdxl.load(back).kind == kind


def test_single_file_carries_what_its_format_has_no_config_for(tiny_base, tmp_path):
    model = minsdxl.load(tiny_base[1])
    mean, std = (-1.6574, 1.886, -1.383, 2.5155), (8.4927, 5.9022, 6.5498, 5.2299)
    model.vae.config = replace(model.vae.config, latents_mean=mean, latents_std=std)
    save_single_file(model, tmp_path / "stats.safetensors")
    keys = read_safetensors(tmp_path / "stats.safetensors")
    assert keys["edm_mean"].shape == (1, 4, 1, 1) and "v_pred" not in keys
    _, configs = read_checkpoint(tmp_path / "stats.safetensors")  # Playground's file: its configs come back
    assert configs["vae"]["latents_mean"] == pytest.approx(mean) and configs["vae"]["latents_std"] == pytest.approx(std)
    model.vae.config = replace(model.vae.config, latents_mean=None, latents_std=None)
    model.scheduler_config = {
        **model.scheduler_config,
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
    }
    save_single_file(model, tmp_path / "vpred.safetensors")
    assert {"v_pred", "ztsnr"} <= read_safetensors(tmp_path / "vpred.safetensors").keys()
    _, configs = read_checkpoint(tmp_path / "vpred.safetensors")
    assert configs["scheduler"]["prediction_type"] == "v_prediction" and configs["scheduler"]["rescale_betas_zero_snr"]


def test_refusals(tiny_base, tmp_path, capsys):
    folder = tiny_base[1]
    (tmp_path / "taken.safetensors").write_text("keep me")
    assert main(["convert", str(folder), str(tmp_path / "taken.safetensors")]) == 1
    assert "exists; convert writes a new file or folder" in capsys.readouterr().err
    assert (tmp_path / "taken.safetensors").read_text() == "keep me"
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "out.safetensors")]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()
    model = minsdxl.load(folder)
    model.unet.encoder_hid_proj = torch.nn.Identity()  # what load_ip_adapter adds
    with pytest.raises(ValueError, match="unload_ip_adapter"):
        save_single_file(model, tmp_path / "ip.safetensors")
    assert not list(tmp_path.glob("ip.safetensors*"))


def test_diffusers_judge_is_strict(tiny_base):
    # the helper above must be able to fail: a changed weight is seen
    pipe = diffusers.StableDiffusionXLPipeline(**tiny_base[0].components)
    expected = component_state_dicts(pipe)
    expected["unet"] = {**expected["unet"], "conv_in.bias": expected["unet"]["conv_in.bias"] + 1}
    with pytest.raises(AssertionError, match="conv_in.bias"):
        _same_weights(pipe, expected, torch.float32)


def test_float8_storage_checkpoint(tiny_base, tmp_path):
    """convert --storage-dtype fp8 (a ComfyUI-style fp8 checkpoint): the UNet's layerwise-cast layers in float8, the
    rest in fp16; diffusers' from_single_file reads it as those numbers, and load(storage_dtype=) of it holds the
    very float8 weights load(storage_dtype=) of the original makes."""
    pipe, folder = tiny_base
    single = tmp_path / "fp8.safetensors"
    assert main(["convert", str(folder), str(single), "--storage-dtype", "fp8"]) == 0
    keys = read_safetensors(single)
    narrow = {k for k, t in keys.items() if t.dtype == torch.float8_e4m3fn}
    assert narrow and all(k.startswith("model.diffusion_model.") for k in narrow)
    assert {str(t.dtype) for k, t in keys.items() if k not in narrow and t.is_floating_point()} == {"torch.float16"}
    want = minsdxl.load(folder, dtype=torch.float16, storage_dtype=torch.float8_e4m3fn).unet.state_dict()
    judge = type(pipe).from_single_file(str(single), config=str(folder), local_files_only=True, dtype=torch.float32)
    got = judge.unet.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k].float()) for k in want)
    again = minsdxl.load(single, config=folder, dtype=torch.float16, storage_dtype=torch.float8_e4m3fn)
    assert all(torch.equal(v, want[k]) and v.dtype == want[k].dtype for k, v in again.unet.state_dict().items())
