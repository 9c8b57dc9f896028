"""ControlNet parity with diffusers: ControlNetModel itself, and StableDiffusionXLControlNetPipeline,
-Img2ImgPipeline and -InpaintPipeline against minsdxl.text2img / img2img / inpaint with controlnet=,
on tiny random weights (the ControlNets made by diffusers' ControlNetModel.from_unet, then every
weight randomised: the zero convs too, so the residuals are not zero).

Bounds: the model's outputs within 1e-5 relative (one forward in fp32, ~5e-7 measured); final
latents within 1e-4 relative, as in test_pipelines (a few steps compound association-order rounding).
"""

import copy
import json

import diffusers
import numpy as np
import pytest
import torch
from sdxl_testing import TINY_UNET, offload_moves, randomize_, rel_err
from sdxl_testing import box_mask as _mask
from sdxl_testing import smooth_image as _image

import minsdxl
from minsdxl.checkpoint import (
    CheckpointError,
    Topology,
    _rename,
    controlnet_table,
    ldm_controlnet_to_diffusers,
    save_safetensors,
)
from minsdxl.config import ControlNetUnionConfig
from minsdxl.controlnet import controlnet_config_json

LATENT_TOL = 1e-4
MODEL_TOL = 1e-5
EMBED = (4, 8, 8, 16)  # the control image encoder's widths (SDXL's: 16, 32, 96, 256), small for speed


@pytest.fixture(scope="module")
def cn(tmp_path_factory, tiny_base, tiny_inpaint):
    """Two diffusers ControlNets for the tiny base UNet, saved as diffusers folders, and minsdxl's loads."""
    root = tmp_path_factory.mktemp("controlnet")
    pipe = tiny_base[0]
    refs, ours = [], []
    for i in range(2):
        net = diffusers.ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=EMBED)
        randomize_(net, 5 + i).eval()
        net.save_pretrained(root / f"cn{i}")
        refs.append(net)
        ours.append(minsdxl.load_controlnet(root / f"cn{i}"))
    base = minsdxl.load(tiny_base[1])
    return dict(
        root=root,
        refs=refs,
        ours=ours,
        base=(pipe, base),
        inpaint=(tiny_inpaint[0], minsdxl.load(tiny_inpaint[1])),
    )


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ctx = torch.randn(batch, 77, 48, generator=g)
    cond = torch.rand(batch, 3, 64, 64, generator=g)
    pooled = torch.randn(batch, 32, generator=g)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)
    return x, ctx, cond, pooled, ids


def _variant(ref, tmp_path, **config):
    """A copy of a diffusers ControlNet with config changes (as a config.json would have them), and ours."""
    net = copy.deepcopy(ref)
    net.register_to_config(**config)
    net.save_pretrained(tmp_path)
    return net, minsdxl.load_controlnet(tmp_path)


@pytest.mark.parametrize(
    "config,guess",
    [
        ({}, False),
        ({}, True),
        ({"global_pool_conditions": True}, False),
        ({"controlnet_conditioning_channel_order": "bgr"}, True),
    ],
    ids=["plain", "guess_mode", "global_pool", "bgr"],
)
def test_model_matches_diffusers(cn, tmp_path, config, guess):
    ref, ours = _variant(cn["refs"][0], tmp_path, **config) if config else (cn["refs"][0], cn["ours"][0])
    m = assert_same_outputs(ref, ours, guess)
    if config.get("global_pool_conditions"):
        assert m.shape[-2:] == (1, 1)


def assert_same_outputs(ref, ours, guess):
    """The diffusers ControlNet `ref` and ours give the same residuals at scale 0.7; ours's mid residual."""
    x, ctx, cond, pooled, ids = _inputs()
    with torch.no_grad():
        d_ref, m_ref = ref(
            x,
            torch.tensor(500),
            ctx,
            cond,
            conditioning_scale=0.7,
            guess_mode=guess,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": ids},
            return_dict=False,
        )
        d, m = ours(x, torch.tensor(500), ctx, cond, pooled, ids, conditioning_scale=0.7, guess_mode=guess)
        # the prompt projected once (what the sampler passes) gives the same
        d2, m2 = ours(x, torch.tensor(500), ours.project_context(ctx), cond, pooled, ids, 0.7, guess)
    assert len(d) == len(d_ref) == 9  # conv_in + 2 resnets per level + 2 downsamplers
    for a, b, c in zip(d, d_ref, d2):
        assert a.shape == b.shape and rel_err(a, b) <= MODEL_TOL and rel_err(c, b) <= MODEL_TOL
    assert rel_err(m, m_ref) <= MODEL_TOL and rel_err(m2, m_ref) <= MODEL_TOL
    return m


def test_unet_adds_the_residuals_as_diffusers(cn):
    pipe, model = cn["base"]
    x, ctx, cond, pooled, ids = _inputs(seed=1)
    with torch.no_grad():
        down, mid = cn["ours"][0](x, 300.0, ctx, cond, pooled, ids)
        ref = pipe.unet(
            x,
            300.0,
            ctx,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": ids},
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        got = model.unet(
            x, 300.0, ctx, pooled, ids, down_block_additional_residuals=down, mid_block_additional_residual=mid
        )
        plain = model.unet(x, 300.0, ctx, pooled, ids)
    assert rel_err(got, ref) <= MODEL_TOL
    assert rel_err(plain, ref) > 1e-2  # the residuals matter
    with pytest.raises(ValueError, match="8, this UNet has 9 skips"):
        model.unet(
            x, 300.0, ctx, pooled, ids, down_block_additional_residuals=down[:8], mid_block_additional_residual=mid
        )


def _run(pipe, fn, model, **kw):
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="latent").images
    got = fn(model, **kw, generator=torch.Generator().manual_seed(0), output_type="latent", progress=False)
    return ref, got


def _close(ref, got):
    assert got.shape == ref.shape
    err = rel_err(got, ref)
    assert err <= LATENT_TOL, f"final latents differ: relative error {err:.2e}"


TEXT2IMG = {
    "default": dict(),
    "guess_mode": dict(guess_mode=True),
    "window_and_scale": dict(control_guidance_start=0.25, control_guidance_end=0.75, controlnet_conditioning_scale=0.6),
    "denoising_end": dict(denoising_end=0.6, control_guidance_end=0.5),  # windows count the uncut steps
    "batch": dict(prompt=["a cat", "a dog"], num_images_per_prompt=2),
    "no_cfg": dict(guidance_scale=1.0),
    "size_from_control_image": dict(image=_image(3, (96, 64))),
    "height_width_resize_it": dict(image=_image(3, (96, 64)), height=64, width=80),
    "multi": dict(nets=2, controlnet_conditioning_scale=[0.5, 0.8], control_guidance_end=[1.0, 0.5]),
    "multi_guess_mode": dict(nets=2, guess_mode=True),
    "multi_one_list": dict(nets=2, control_guidance_start=[0.0, 0.5]),  # the end repeated
}


def _nets(cn, kw, key):
    """(diffusers' ControlNet(s), ours) for a case; `nets=2`: both, with a second control image."""
    if kw.pop("nets", 1) == 1:
        return cn["refs"][0], cn["ours"][0]
    kw[key] = [kw[key], _image(2)]
    return cn["refs"], cn["ours"]


@pytest.mark.parametrize("case", list(TEXT2IMG))
def test_text2img(cn, case):
    kw = dict(prompt="a cat", num_inference_steps=4, image=_image(1)) | TEXT2IMG[case]
    pipe, model = cn["base"]
    refs, ours = _nets(cn, kw, "image")
    cpipe = diffusers.StableDiffusionXLControlNetPipeline(**pipe.components, controlnet=refs)
    _close(*_run(cpipe, lambda m, **k: minsdxl.text2img(m, **k, controlnet=ours), model, **kw))


def test_text2img_controlnet_changes_the_image_and_scale_zero_is_exact(cn):
    pipe, model = cn["base"]
    kw = dict(prompt="a cat", num_inference_steps=3, output_type="latent", progress=False)
    plain = minsdxl.text2img(model, **kw, height=64, width=64, seed=0)
    controlled = minsdxl.text2img(model, **kw, image=_image(1), controlnet=cn["ours"][0], seed=0)
    zero = minsdxl.text2img(
        model, **kw, image=_image(1), controlnet=cn["ours"][0], controlnet_conditioning_scale=0.0, seed=0
    )
    assert rel_err(controlled, plain) > 1e-2
    # scale 0 is not run at all: bit-equal to no ControlNet (diffusers adds exact zeros)
    assert torch.equal(zero, plain)


IMG2IMG = {
    "default": dict(),  # strength 0.8 and conditioning scale 0.8: the ControlNet pipeline's defaults
    "guess_mode": dict(guess_mode=True, strength=0.6),
    "multi": dict(nets=2, controlnet_conditioning_scale=[0.5, 1.0], control_guidance_start=[0.0, 0.3]),
    "aesthetic_ids": dict(num_images_per_prompt=2, original_size=(96, 96), target_size=(64, 64)),
}


@pytest.mark.parametrize("case", list(IMG2IMG))
def test_img2img(cn, case):
    kw = dict(prompt="a cat", num_inference_steps=4, image=_image(4), control_image=_image(1)) | IMG2IMG[case]
    pipe, model = cn["base"]
    refs, ours = _nets(cn, kw, "control_image")
    cpipe = diffusers.StableDiffusionXLControlNetImg2ImgPipeline(**pipe.components, controlnet=refs)
    ref, got = _run(cpipe, lambda m, **k: minsdxl.img2img(m, **k, controlnet=ours), model, **kw)
    _close(ref, got)


INPAINT = {
    "nine_channel": ("inpaint", dict()),  # guidance 5.0: the ControlNet inpaint pipeline's default
    "nine_channel_guess": ("inpaint", dict(guess_mode=True, strength=0.7)),
    "four_channel": ("base", dict(strength=0.8)),
    "four_channel_multi": ("base", dict(nets=2, control_guidance_end=[0.5, 1.0])),
    "padding_mask_crop": ("inpaint", dict(padding_mask_crop=8, image=_image(4, (96, 80)), mask_image=_mask((96, 80)))),
}


@pytest.mark.parametrize("case", list(INPAINT))
def test_inpaint(cn, case):
    kind, extra = INPAINT[case]
    kw = dict(prompt="a cat", num_inference_steps=4, image=_image(4), mask_image=_mask(), control_image=_image(1))
    kw |= extra
    if "padding_mask_crop" in kw:
        kw["control_image"] = _image(1, (96, 80))
        kw |= dict(height=64, width=64, output_type="pil")
    pipe, model = cn[kind]
    refs, ours = _nets(cn, kw, "control_image")
    cpipe = diffusers.StableDiffusionXLControlNetInpaintPipeline(**pipe.components, controlnet=refs)
    cpipe.set_progress_bar_config(disable=True)
    if kw.get("output_type") == "pil":  # the crop is pasted back into the PIL image
        ref = cpipe(**kw, generator=torch.Generator().manual_seed(0)).images
        got = minsdxl.inpaint(model, **kw, controlnet=ours, generator=torch.Generator().manual_seed(0), progress=False)
        a, b = (np.stack([np.asarray(i, dtype=np.int16) for i in x]) for x in (ref, got))
        # test_pipelines' _assert_images_close: 1-level flips at .5, none larger than 2 levels
        assert a.shape == b.shape and (np.abs(a - b) <= 1).mean() >= 0.999 and np.abs(a - b).max() <= 2
        return
    ref, got = _run(cpipe, lambda m, **k: minsdxl.inpaint(m, **k, controlnet=ours), model, **kw)
    _close(ref, got)


# ------------------------------------------------------------------------------------------------
# ControlNet-Union (xinsir/controlnet-union-sdxl-1.0, ProMax: 8 kinds) against diffusers' Union pipelines

# the tiny UNet's topology, 8 kinds (ProMax's), a 4-head 32-wide transformer
UNION = ControlNetUnionConfig(
    **vars(TINY_UNET),
    conditioning_embedding_out_channels=EMBED,
    num_control_type=8,
    num_trans_channel=32,
    num_trans_head=4,
    num_proj_channel=32,
)


@pytest.fixture(scope="module")
def unions(cn):
    """Two diffusers ControlNetUnionModels of the UNION config, for the tiny base UNet."""
    config = {k: v for k, v in controlnet_config_json(UNION).items() if not k.startswith("_")}
    refs, ours = [], []
    for i in range(2):
        net = diffusers.ControlNetUnionModel(**config)
        randomize_(net, 11 + i).eval()
        net.save_pretrained(cn["root"] / f"union{i}")
        refs.append(net)
        ours.append(minsdxl.load_controlnet(cn["root"] / f"union{i}"))
    return refs, ours


@pytest.mark.parametrize("guess", [False, True])
@pytest.mark.parametrize("modes", [[3], [3, 1]])
def test_union_model_matches_diffusers(unions, modes, guess):
    (ref, _), (ours, _) = unions
    assert type(ours).__name__ == "ControlNetUnionModel" and ours.config.num_trans_head == 4
    x, ctx, cond, pooled, ids = _inputs(seed=2)
    conds = [cond, cond.flip(-1)][: len(modes)]
    kinds = torch.zeros(8).scatter_(0, torch.tensor(modes), 1).repeat(2, 1)
    scales = [0.7, 0.4][: len(modes)]
    with torch.no_grad():
        d_ref, m_ref = ref(
            x,
            torch.tensor(500),
            ctx,
            conds,
            kinds,
            modes,
            scales,
            guess_mode=guess,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": ids},
            return_dict=False,
        )
        d, m = ours(x, torch.tensor(500), ctx, conds, pooled, ids, kinds, modes, scales, guess)
    assert len(d) == len(d_ref) == 9
    for a, b in zip(d, d_ref):
        assert rel_err(a, b) <= MODEL_TOL
    assert rel_err(m, m_ref) <= MODEL_TOL


UNION_CASES = {
    "one_kind": dict(control_mode=[3]),
    "one_kind_bare": dict(control_image=_image(1), control_mode=3, controlnet_conditioning_scale=0.6),
    "two_kinds": dict(
        control_image=[_image(1), _image(2)],
        control_mode=[3, 1],
        controlnet_conditioning_scale=[0.7, 0.4],
        control_guidance_end=[1.0, 0.5],
    ),
    "guess_mode_no_cfg": dict(control_mode=[5], guess_mode=True, guidance_scale=1.0),  # (with CFG diffusers fails)
    "batch": dict(control_mode=[3], prompt=["a cat", "a dog"], num_images_per_prompt=2),
    "two_unions": dict(nets=2, control_image=[_image(1), _image(2)], control_mode=[3, 6], control_guidance_start=0.3),
}


@pytest.mark.parametrize("case", list(UNION_CASES))
def test_union_text2img(cn, unions, case):
    kw = dict(prompt="a cat", num_inference_steps=4, control_image=[_image(1)]) | UNION_CASES[case]
    refs, ours = unions
    refs, ours = (refs, ours) if kw.pop("nets", 1) == 2 else (refs[0], ours[0])
    pipe, model = cn["base"]
    cpipe = diffusers.StableDiffusionXLControlNetUnionPipeline(**pipe.components, controlnet=refs)
    _close(*_run(cpipe, lambda m, **k: minsdxl.text2img(m, **k, controlnet=ours), model, **kw))


# (diffusers' Union inpaint pipeline refuses the 9-channel inpainting UNet: "should have either 4 or 9 input
# channels, not 9"; minsdxl runs it as with a ControlNet, with no reference to compare with)
@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_union_img2img_and_inpaint(cn, unions, kind):
    kw = dict(prompt="a cat", num_inference_steps=4, image=_image(4), control_image=[_image(1), _image(2)])
    kw |= dict(control_mode=[3, 1], controlnet_conditioning_scale=[0.8, 0.5])
    pipe, model = cn["base"]
    if kind == "img2img":
        cpipe, fn = diffusers.StableDiffusionXLControlNetUnionImg2ImgPipeline, minsdxl.img2img
    else:
        cpipe, fn = diffusers.StableDiffusionXLControlNetUnionInpaintPipeline, minsdxl.inpaint
        kw |= dict(mask_image=_mask(), strength=0.8)
    cpipe = cpipe(**pipe.components, controlnet=unions[0][0])
    _close(*_run(cpipe, lambda m, **k: fn(m, **k, controlnet=unions[1][0]), model, **kw))


def test_union_inputs_are_checked(cn, unions):
    model, union = cn["base"][1], unions[1][0]
    kw = dict(prompt="a cat", num_inference_steps=2, output_type="latent", progress=False, control_image=_image(1))
    cases = [
        (dict(controlnet=union), "needs control_mode="),
        (dict(controlnet=union, control_mode=8), r"control_mode \[8\]: each must be a whole number below 8"),
        (dict(controlnet=union, control_mode=[1, 2]), "control_mode has 2 kinds for 1 control images"),
        (dict(controlnet=cn["ours"][0], control_mode=1), "control_mode= is for a ControlNet-Union"),
        (dict(controlnet=[union, cn["ours"][0]], control_image=[_image(1)] * 2), "mixes ControlNets and"),
        (dict(control_mode=1, control_image=None), "control_mode= is a Union's: pass controlnet="),
        (dict(controlnet=union, control_mode=1, image=_image(1)), "as image= or as control_image=, not both"),
    ]
    for extra, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            minsdxl.text2img(model, **kw | extra)


def test_compile_with_controlnet_matches_eager_without_recompiles(cn, tiny_base):
    import torch._dynamo

    net = minsdxl.load_controlnet(cn["root"] / "cn0")
    model = minsdxl.compile(minsdxl.load(tiny_base[1]), controlnet=net)  # fullgraph: a graph break fails
    assert net._compiled_call_impl is not None
    eager, eager_net = cn["base"][1], cn["ours"][0]
    kw = dict(prompt="a cat", image=_image(1), output_type="latent", progress=False)
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    try:
        # 2 steps, the ControlNet in the first only: the UNet is compiled with residuals and without
        first = dict(kw, controlnet_conditioning_scale=0.8, control_guidance_end=0.5, num_inference_steps=2, seed=0)
        got = minsdxl.text2img(model, **first, controlnet=net)
        # text encoders, UNet (twice: with and without residuals), ControlNet
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 5
        ref = minsdxl.text2img(eager, **first, controlnet=eager_net)
        assert rel_err(got, ref) <= 1e-5  # inductor reorders fp32 ops (as test_compile)
        # more steps, another scale, a guidance window, another prompt: the compiled graphs are reused
        again = dict(kw, prompt="a dog", num_inference_steps=3, seed=1, control_guidance_end=0.6)
        again |= dict(controlnet_conditioning_scale=0.5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = minsdxl.text2img(model, **again, controlnet=net)
        assert rel_err(got, minsdxl.text2img(eager, **again, controlnet=eager_net)) <= 1e-5
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# Loading


def test_load_layouts(cn, tmp_path):
    ref = cn["refs"][0]
    sd = ref.state_dict()

    def same(net):
        assert net.state_dict().keys() == sd.keys()
        assert all(torch.equal(net.state_dict()[k], sd[k]) for k in sd)

    # fp16 variant folder, chosen for float16 as diffusers does
    copy.deepcopy(ref).to(torch.float16).save_pretrained(tmp_path / "fp16", variant="fp16")
    half = minsdxl.load_controlnet(tmp_path / "fp16", dtype=torch.float16)
    assert half.dtype == torch.float16
    assert all(torch.equal(half.state_dict()[k], sd[k].half()) for k in sd)
    # a pipeline folder: its controlnet/ is found
    (tmp_path / "pipe").mkdir()
    ref.save_pretrained(tmp_path / "pipe" / "controlnet")
    same(minsdxl.load_controlnet(tmp_path / "pipe"))
    # one file with diffusers' keys
    save_safetensors(sd, tmp_path / "cn.safetensors")
    same(minsdxl.load_controlnet(tmp_path / "cn.safetensors"))


def test_original_layout_matches_diffusers_converter(cn, tmp_path):
    """A ControlNet in the original layout (control_model.*, as lllyasviel's and early SDXL ones ship),
    written by inverting our table; diffusers' own converter (convert_controlnet_checkpoint) reads the
    same file to the same weights. It leaves out label_emb (SDXL's add_embedding): diffusers has no
    row for it, so that one is checked against the UNet's sgm name (label_emb.0.0 / .0.2)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    sd = cn["refs"][0].state_dict()
    t = Topology(unet_attn=(False, True, True), unet_layers=2)
    inverse = {v: k for k, v in controlnet_table(t, 8).items() if v}
    ldm = {_rename(k, inverse)[0]: v for k, v in sd.items()}
    assert "control_model.input_hint_block.14.weight" in ldm and "control_model.zero_convs.8.0.weight" in ldm
    assert "control_model.label_emb.0.2.weight" in ldm and "control_model.middle_block_out.0.bias" in ldm
    theirs = convert_controlnet_checkpoint(dict(ldm), json.loads((cn["root"] / "cn0" / "config.json").read_text()))
    ours = ldm_controlnet_to_diffusers(ldm)
    assert set(ours) == set(sd)
    assert set(theirs) == set(sd) - {k for k in sd if k.startswith("add_embedding.")}
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    save_safetensors({k[len("control_model.") :]: v for k, v in ldm.items()}, tmp_path / "bare.safetensors")
    net = minsdxl.load_controlnet(tmp_path / "bare.safetensors", config=cn["root"] / "cn0")
    assert all(torch.equal(net.state_dict()[k], sd[k]) for k in sd)


def test_load_errors(cn, tmp_path, tiny_base):
    sd = cn["refs"][0].state_dict()
    with pytest.raises(CheckpointError, match="no such file or folder"):
        minsdxl.load_controlnet(tmp_path / "nope")
    save_safetensors({k: v for k, v in sd.items() if not k.startswith("add_embedding.")}, tmp_path / "sd15.safetensors")
    with pytest.raises(CheckpointError, match="1.x/2.x ControlNet"):
        minsdxl.load_controlnet(tmp_path / "sd15.safetensors")
    unet = tiny_base[0].unet.state_dict()
    save_safetensors(unet, tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        minsdxl.load_controlnet(tmp_path / "unet.safetensors")
    broken = dict(sd)
    broken["controlnet_mid_block.weight"] = broken["controlnet_mid_block.weight"][:8]
    save_safetensors(broken, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match="controlnet_mid_block.weight has shape"):
        minsdxl.load_controlnet(tmp_path / "broken.safetensors")
    (tmp_path / "union").mkdir()
    for kind, match in (("ControlNetXSAdapter", "a diffusers ControlNetXSAdapter"), ("ControlNetUnionModel", "no a")):
        cfg = json.loads((cn["root"] / "cn0" / "config.json").read_text()) | {"_class_name": kind}
        (tmp_path / "union" / "config.json").write_text(json.dumps(cfg))
        save_safetensors(sd, tmp_path / "union" / "diffusion_pytorch_model.safetensors")
        with pytest.raises(CheckpointError, match=match):
            minsdxl.load_controlnet(tmp_path / "union")


def test_bad_inputs_fail_before_any_work(cn, tiny_refiner):
    pipe, model = cn["base"]
    net = cn["ours"][0]
    img = _image(1)
    kw = dict(prompt="a cat", num_inference_steps=2, output_type="latent", progress=False)
    cases = [
        (dict(image=img), "a ControlNet's control image: pass controlnet="),
        (dict(controlnet=net), "needs its control image: pass image="),
        (dict(controlnet=[net, net], image=img), "need a list of 2 control images"),
        (dict(controlnet=net, image=img, controlnet_conditioning_scale=[1.0]), "one number, not a list"),
        (dict(controlnet=[net, net], image=[img, img], controlnet_conditioning_scale=[1.0]), "has 1 values for 2"),
        (dict(controlnet=net, image=img, control_guidance_start=0.5, control_guidance_end=0.5), "0 <= start < end"),
        (dict(controlnet="canny", image=img), "must be a minsdxl ControlNetModel"),
        (dict(controlnet=net, image=img, height=64, width=72, latents=torch.zeros(1, 4, 8, 8)), "latents have shape"),
    ]
    for extra, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            minsdxl.text2img(model, **kw, **extra)
    with pytest.raises(ValueError, match="control_image= is a ControlNet's control image"):
        minsdxl.img2img(model, **kw, image=img, control_image=img)
    with pytest.raises(ValueError, match="control image is 96x64 but the image to make is 64x64"):
        minsdxl.img2img(model, **kw, image=torch.zeros(1, 4, 8, 8), control_image=img, controlnet=net, width=96)
    with pytest.raises(ValueError, match="got 3 control images for 2 prompts"):
        minsdxl.text2img(model, **kw | {"prompt": ["a", "b"]}, image=[img] * 3, controlnet=net)
    refiner = minsdxl.load(tiny_refiner[1], share=model)
    with pytest.raises(ValueError, match="does not fit the model's UNet"):
        minsdxl.img2img(refiner, **kw, image=img, control_image=img, controlnet=net)


def test_full_size_controlnet_matches_diffusers():
    """SDXL's ControlNet shapes (diffusers/controlnet-canny-sdxl-1.0's config: 1.25 B parameters, 10-layer
    transformers, the 16-32-96-256 control encoder) on random weights, at a 16x16 latent (128 px control
    image): one CFG batch through both, the same tensors (diffusers' weights assigned, no copy)."""
    from sdxl_testing import meta_diffusers, random_state_dict

    from minsdxl.checkpoint import _build
    from minsdxl.config import UNET_PRESETS, controlnet_config_from_state_dict
    from minsdxl.controlnet import ControlNetModel

    ours_cfg = minsdxl.config.ControlNetConfig(**vars(UNET_PRESETS["base"]))
    config = {k: v for k, v in controlnet_config_json(ours_cfg).items() if not k.startswith("_")}
    with torch.device("meta"):
        shapes = diffusers.ControlNetModel(**config)
    sd = random_state_dict(shapes, seed=3)
    ref = meta_diffusers(diffusers.ControlNetModel, config, sd)
    assert sum(t.numel() for t in sd.values()) > 1.2e9
    ours = _build(ControlNetModel, controlnet_config_from_state_dict(sd), sd, "ControlNet", torch.float32, "cpu")
    assert ours.config == ours_cfg
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 2048, generator=g)
    cond, pooled = torch.rand(2, 3, 128, 128, generator=g), torch.randn(2, 1280, generator=g)
    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)
    with torch.no_grad():
        d_ref, m_ref = ref(
            x, 700, ctx, cond, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}, return_dict=False
        )
        d, m = ours(x, 700, ours.project_context(ctx), cond, pooled, ids)
    assert len(d) == len(d_ref) == 9
    for a, b in zip(d, d_ref):
        assert rel_err(a, b) <= MODEL_TOL
    assert rel_err(m, m_ref) <= MODEL_TOL


def test_model_offload_moves_the_controlnet_while_the_unet_runs(cn, tiny_base):
    """load(offload=True): a ControlNet waits on the CPU and visits the device with the UNet, once per call
    (here "cpu:0", to tell the move apart); the result is unchanged."""
    model, net = minsdxl.load(tiny_base[1]), minsdxl.load_controlnet(cn["root"] / "cn0")
    kw = dict(prompt="a cat", num_inference_steps=2, seed=0, output_type="latent", progress=False, image=_image(1))
    moves, want, got = offload_moves(model, net, lambda: minsdxl.text2img(model, **kw, controlnet=net))
    assert moves == ["cpu:0"] and net.device == torch.device("cpu")
    assert rel_err(got, want) <= 1e-5  # the move copies weights into new buffers: last-bit changes at most
