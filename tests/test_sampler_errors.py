"""Bad input to text2img / img2img / inpaint: a clear error (or warning) before any heavy work, and
the VAE's non-finite guard (fp32 retry with a warning; never a NaN image)."""

import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import minsdxl


@pytest.fixture(scope="module")
def base(tiny_base):
    return minsdxl.load(tiny_base[1])


@pytest.fixture(scope="module")
def refiner(tiny_refiner, base):
    return minsdxl.load(tiny_refiner[1], share=base)


def _forbid_unet(model, monkeypatch):
    """Errors must come before any denoising: make the UNet explode if it is reached."""
    monkeypatch.setattr(model.unet, "forward", lambda *a, **k: pytest.fail("the UNet ran before the error"))


IMG = PIL.Image.new("RGB", (64, 64), (120, 30, 200))
MASK = PIL.Image.new("L", (64, 64), 255)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(height=100, width=64), r"height=100 is not a multiple of 8.*96 or 104"),
        (dict(height=64, width=70), r"width=70 is not a multiple of 8.*64 or 72"),
        (dict(num_inference_steps=0), r"num_inference_steps must be between 1 and 1000"),
        (dict(denoising_end=1.5), r"denoising_end must be a float in \(0, 1\)"),
        (dict(scheduler="Heun++"), r"unknown scheduler 'Heun\+\+'; valid names"),
        (dict(output_type="jpeg"), r"output_type must be one of"),
        (dict(prompt=["a", "b"], negative_prompt=["c"]), r"negative"),
        (dict(prompt=3), r"prompt"),
        (dict(latents=torch.zeros(1, 4, 5, 5)), r"latents have shape \(1, 4, 5, 5\); this call needs \(1, 4, 8, 8\)"),
        (dict(generator=torch.Generator(), seed=1), r"either generator= or seed="),
        (dict(scheduler="ddim", eta=0.5), r"eta > 0 \(stochastic DDIM\) is not supported"),
        (dict(cross_attention_kwargs={"scale": 0.5, "gligen": 1}), r"\['gligen'\] are not supported"),
        (dict(cross_attention_kwargs={"ip_adapter_masks": [1]}), r"ip_adapter_masks place image prompts"),
        (dict(callback_on_step_end_tensor_inputs=["latents", "noise_pred"]), r"\['noise_pred'\] cannot be given"),
        (dict(image=IMG), r"image= is a ControlNet's control image: pass controlnet="),
    ],
)
def test_text2img_errors(base, monkeypatch, kwargs, match):
    _forbid_unet(base, monkeypatch)
    kw = {"prompt": "a cat", "height": 64, "width": 64, "progress": False, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        minsdxl.text2img(base, **kw)


def test_eta_is_ignored_by_schedulers_whose_step_takes_none(base):
    # = diffusers' prepare_extra_step_kwargs: eta reaches only schedulers whose step takes it; LCM's does not
    kw = dict(prompt="a cat", height=64, width=64, num_inference_steps=2, scheduler="lcm", output_type="latent")
    with_eta = minsdxl.text2img(base, **kw, eta=0.5, seed=0, progress=False)
    assert torch.equal(with_eta, minsdxl.text2img(base, **kw, seed=0, progress=False))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(strength=0.0), r"strength must be a number in \(0, 1\]"),
        (dict(strength=1.5), r"strength must be a number in \(0, 1\]"),
        (dict(denoising_start=0.0), r"denoising_start must be a float in \(0, 1\)"),
        (dict(denoising_start=0.8, denoising_end=0.5), r"denoising_start=0.8 must be below denoising_end=0.5"),
        (dict(image=None), r"img2img needs image="),
        (dict(image="cat.png"), r"unsupported image type str"),
    ],
)
def test_img2img_errors(base, monkeypatch, kwargs, match):
    _forbid_unet(base, monkeypatch)
    with pytest.raises((ValueError, TypeError), match=match):
        minsdxl.img2img(base, **{"prompt": "a cat", "image": IMG, "progress": False, **kwargs})


def test_inpaint_errors(base, refiner, monkeypatch):
    _forbid_unet(base, monkeypatch)
    with pytest.raises(ValueError, match=r"image is 64x64 but mask_image is 32x64"):
        minsdxl.inpaint(base, "a cat", image=IMG, mask_image=PIL.Image.new("L", (32, 64), 255), height=64, width=64)
    # numpy inputs too ([H, W, C] image, [H, W] mask), which once failed inside the check with a TypeError
    with pytest.raises(ValueError, match=r"image is 64x48 but mask_image is 64x64"):
        minsdxl.inpaint(base, "a cat", image=np.zeros((48, 64, 3)), mask_image=np.ones((64, 64)), height=64, width=64)
    with pytest.raises(ValueError, match=r"inpaint needs mask_image="):
        minsdxl.inpaint(refiner, "a cat", image=IMG)
    with pytest.warns(UserWarning, match="no white pixels"), pytest.raises(RuntimeError, match="stop"):
        monkeypatch.setattr(base.unet, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
        minsdxl.inpaint(base, "a cat", image=IMG, mask_image=PIL.Image.new("L", (64, 64), 0), height=64, width=64)


def test_mode_errors(base, refiner, tiny_inpaint, monkeypatch):
    with pytest.raises(ValueError, match=r"refiner.*only refines: call minsdxl.img2img"):
        minsdxl.text2img(refiner, "a cat", height=64, width=64)
    inpaint_model = minsdxl.load(tiny_inpaint[1])
    with pytest.raises(ValueError, match=r"9-channel inpainting UNet: call minsdxl.inpaint"):
        minsdxl.text2img(inpaint_model, "a cat", height=64, width=64)
    with pytest.raises(ValueError, match=r"9-channel inpainting UNet needs a pixel image"):
        minsdxl.inpaint(inpaint_model, "a cat", image=torch.zeros(1, 4, 8, 8), mask_image=MASK, height=64, width=64)


def test_half_precision_vae_nan_retries_in_fp32(base, monkeypatch):
    """A bf16 VAE that overflows: one warning naming both fixes, then an fp32 decode; never NaN."""
    vae = base.vae
    real_forward = vae.decoder.forward

    def overflowing(z):
        out = real_forward(z)
        return out * float("nan") if z.dtype == torch.bfloat16 else out

    monkeypatch.setattr(vae.decoder, "forward", overflowing)
    vae.to(torch.bfloat16)
    try:
        with pytest.warns(UserWarning, match=r"NaN/Inf; decoding again in float32.*fp16-fix VAE"):
            img = minsdxl.text2img(
                base, "a cat", height=64, width=64, num_inference_steps=1, seed=0, output_type="np", progress=False
            )
        assert np.isfinite(img).all() and vae.dtype == torch.bfloat16  # back to the user's dtype
        vae.to(torch.float32)
        monkeypatch.setattr(vae.decoder, "forward", lambda z: real_forward(z) * float("nan"))
        with warnings.catch_warnings(), pytest.raises(FloatingPointError, match="NaN/Inf even in float32"):
            minsdxl.text2img(base, "a cat", height=64, width=64, num_inference_steps=1, seed=0, progress=False)
    finally:
        vae.to(torch.float32)


def test_model_offload_moves_one_component_at_a_time(tiny_base):
    """load(offload=True): weights wait on the CPU; text encoders, then UNet, then VAE go to the device
    only while they run (on this CPU-only machine the device is the CPU, so we record the moves)."""
    model = minsdxl.load(tiny_base[1], device="cpu:0", offload=True)  # "cpu:0": tells the moves apart
    assert model.offload_device == "cpu:0" and model.unet.device == torch.device("cpu")
    names = ("text_encoder", "text_encoder_2", "unet", "vae")
    before = {(n, k): (p, p.data_ptr()) for n in names for k, p in getattr(model, n).named_parameters()}
    moves = []
    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        module = getattr(model, name)
        real_to = module.to

        def to(*a, _name=name, _real=real_to, **k):
            moves.append((_name, str(a[0]) if a else str(k)))
            return _real(*a, **k)

        module.to = to
    kw = dict(prompt="a cat", height=64, width=64, num_inference_steps=2, seed=0, output_type="np", progress=False)
    got = minsdxl.text2img(model, **kw)
    # each component goes to the device once, and nothing is copied back: afterwards every parameter is
    # the same object holding the same CPU memory as before (the device copies were dropped)
    assert moves == [("text_encoder", "cpu:0"), ("text_encoder_2", "cpu:0"), ("unet", "cpu:0"), ("vae", "cpu:0")]
    after = {(n, k): (p, p.data_ptr()) for n in names for k, p in getattr(model, n).named_parameters()}
    assert after.keys() == before.keys()
    assert all(after[k][0] is before[k][0] and after[k][1] == before[k][1] for k in before)
    ref = minsdxl.text2img(minsdxl.load(tiny_base[1]), **kw)
    # not bit-equal: the moves copy the (memory-mapped) weights into fresh buffers, and CPU matmul
    # kernels may round differently with another alignment; anything but a last-bit change is a bug
    assert np.abs(got - ref).max() <= 1e-5
