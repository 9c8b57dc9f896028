"""Control-LoRA (stabilityai/control-lora) parity with diffusers: a file in SAI's layout, made here from
random tensors for the tiny base UNet, loaded by diffusers (ControlNetModel.from_unet + load_lora_adapter,
peft) and by minsdxl.load_controlnet(path, unet=model.unet): the merged weights, the ControlNet's outputs
and a text2img through StableDiffusionXLControlNetPipeline.

One deliberate difference (minsdxl/controlnet.py): peft wraps each layer that has a LoRA, so the file's
bias for it (a full tensor named `<layer>.bias`) meets no parameter (`<layer>.base_layer.bias`) and is
dropped; the layer keeps the UNet's. minsdxl uses the file's, as ComfyUI's ControlLora (the format's own
implementation) does. The diffusers reference gets them put in by `_with_file_biases`, which also checks
that diffusers still drops them.

Bounds: merged weights within 1e-6 relative (fp32 merges, one rounding apart), outputs as test_controlnet.
"""

from dataclasses import replace

import diffusers
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from sdxl_testing import TINY_REFINER, TINY_UNET, minsdxl_from_pipe, random_state_dict, rel_err, smooth_image
from test_controlnet import EMBED, _close, _run, assert_same_outputs

import minsdxl
from minsdxl.checkpoint import CheckpointError, Topology, _rename, controlnet_table, save_safetensors
from minsdxl.cli import describe_control
from minsdxl.unet import UNet2DConditionModel

WEIGHT_TOL = 1e-6
# peft also matches its target "conv_in" (the UNet's) to controlnet_cond_embedding.conv_in, finds no pair for
# it in the file and says so; it leaves that layer alone
pytestmark = pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")
# left out of the file, so the ControlNet keeps the UNet's: one LoRA'd layer (no bias) and one norm
LEFT_OUT = ("input_blocks.4.1.transformer_blocks.0.attn2.to_k.", "input_blocks.4.1.norm.")


def sai_control_lora(unet, seed=0) -> dict:
    """A Control-LoRA for a diffusers UNet as ComfyUI's ControlLoraSave (Stability's) writes one: the original
    layout without control_model., every >= 2-D weight the ControlNet shares with the UNet as a LoRA pair
    `<layer>.up` [out, r(, 1, 1)] / `<layer>.down` [r, in(, kh, kw)] of rank at most 8 (lower where the
    layer is narrower, as an SVD's; mixed, so diffusers' rank_pattern is used), everything else full
    (biases, norms, input_hint_block, zero_convs, middle_block_out), `lora_controlnet` = tensor([]), fp16."""
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBED)
    target = random_state_dict(net, seed)  # the full tensors' values
    t = Topology(unet_attn=tuple(n > 0 for n in TINY_UNET.transformer_layers), unet_layers=TINY_UNET.layers_per_block)
    inverse = {v: k for k, v in controlnet_table(t, 2 * len(EMBED)).items() if v}
    shared, g = unet.state_dict(), torch.Generator().manual_seed(seed)
    out = {}
    for i, (k, v) in enumerate(target.items()):
        name = _rename(k, inverse)[0].removeprefix("control_model.")
        if name.startswith(LEFT_OUT):
            continue
        if k in shared and v.ndim >= 2:
            r, stem = min(8 - 2 * (i % 3), v.shape[0], v[0].numel()), name.removesuffix(".weight")
            # delta entries ~ 0.5 / sqrt(fan-in): half the size of the weights
            out[stem + ".down"] = torch.randn(r, *v.shape[1:], generator=g) / v[0].numel() ** 0.5
            out[stem + ".up"] = torch.randn(v.shape[0], r, *(1,) * (v.ndim - 2), generator=g) * (0.5 / r**0.5)
        else:
            out[name] = v
    out["lora_controlnet"] = torch.tensor([])
    return {k: v.half() for k, v in out.items()}


def _with_file_biases(net, sai: dict) -> int:
    """Put the file's bias of each LoRA layer into peft's base_layer (see the module docstring); returns how many."""
    from diffusers.utils import convert_sai_sd_control_lora_state_dict_to_peft

    peft_sd = convert_sai_sd_control_lora_state_dict_to_peft(dict(sai))
    n = 0
    for name, m in net.named_modules():
        if isinstance(m, BaseTunerLayer) and f"{name}.bias" in peft_sd:
            bias = peft_sd[f"{name}.bias"].float()
            assert not torch.equal(m.base_layer.bias, bias), f"diffusers now loads {name}.bias: drop this fix-up"
            m.base_layer.bias.copy_(bias)
            n += 1
    return n


def diffusers_control_lora(unet, path, sai):
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBED)
    net.load_lora_adapter(str(path), prefix=None)  # (the default prefix "transformer" would find no keys)
    assert _with_file_biases(net, sai) > 20
    return net.eval()


@pytest.fixture(scope="module")
def cl(tmp_path_factory, tiny_base):
    pipe = tiny_base[0]
    path = tmp_path_factory.mktemp("control_lora") / "control-lora-tiny.safetensors"
    sai = sai_control_lora(pipe.unet)
    save_safetensors(sai, path)
    model = minsdxl_from_pipe(pipe)
    ours = minsdxl.load_controlnet(path, unet=model.unet)
    return dict(pipe=pipe, model=model, path=path, sai=sai, ref=diffusers_control_lora(pipe.unet, path, sai), ours=ours)


def test_file_has_every_kind_of_tensor(cl):
    sai = cl["sai"]
    ranks = {v.shape[0] for k, v in sai.items() if k.endswith(".down")}
    assert len(ranks) >= 3 and 4 in ranks  # mixed ranks
    # what diffusers' load_lora_adapter sets for a Control-LoRA: alpha = r for every layer, i.e. scale 1
    (config,) = cl["ref"].peft_config.values()
    assert config.lora_alpha == config.r and config.rank_pattern and config.alpha_pattern == config.rank_pattern
    for key in (
        "input_blocks.0.0.down",  # conv_in: a 3x3 conv
        "input_blocks.1.0.in_layers.2.up",  # a resnet's conv
        "input_blocks.3.0.op.down",  # a downsampler
        "input_blocks.4.0.skip_connection.down",  # a 1x1 conv
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q.down",  # Linear layers
        "middle_block.1.transformer_blocks.1.ff.net.2.up",
        "time_embed.0.down",
        "label_emb.0.2.up",
        "input_blocks.1.0.in_layers.2.bias",  # a LoRA layer's bias
        "middle_block.0.out_layers.0.weight",  # a norm
        "input_hint_block.14.weight",
        "zero_convs.8.0.bias",
        "middle_block_out.0.weight",
        "lora_controlnet",
    ):
        assert key in sai, key


def test_info_says_what_it_is(cl):
    # `minsdxl info` checks it against the real SDXL base (meta device): this tiny one does not fit it
    r = describe_control(cl["path"])
    assert r["kind"] == "Control-LoRA" and "does not fit this UNet" in r["problem"]


def test_weights_match_diffusers(cl):
    """Every tensor, against diffusers' after fuse_lora (peft's merge, the same math the other way round)."""
    fused = diffusers_control_lora(cl["pipe"].unet, cl["path"], cl["sai"])
    fused.fuse_lora()
    ref = {k.replace(".base_layer", ""): v for k, v in fused.state_dict().items() if ".lora_" not in k}
    ours, unet = cl["ours"].state_dict(), cl["model"].unet.state_dict()
    assert ours.keys() == ref.keys()
    for k in ref:
        assert rel_err(ours[k], ref[k]) <= WEIGHT_TOL, k
    conv1 = "down_blocks.0.resnets.0.conv1."
    assert rel_err(ours[conv1 + "weight"], unet[conv1 + "weight"]) > 0.1  # the LoRA is in
    assert torch.equal(ours[conv1 + "bias"], cl["sai"]["input_blocks.1.0.in_layers.2.bias"].float())  # the file's
    for k in (
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "down_blocks.1.attentions.0.norm.bias",
    ):
        assert torch.equal(ours[k], unet[k])  # not in the file: the UNet's
    # copies, never the UNet's own tensors
    assert not {t.data_ptr() for t in ours.values()} & {t.data_ptr() for t in unet.values()}


def test_half_precision_is_the_fp32_merge_rounded(cl):
    half = minsdxl.load_controlnet(cl["path"], unet=cl["model"].unet, dtype=torch.float16)
    assert half.dtype == torch.float16 and type(half) is type(cl["ours"])
    full = cl["ours"].state_dict()
    assert all(torch.equal(v, full[k].half()) for k, v in half.state_dict().items())


@pytest.mark.parametrize("guess", [False, True])
def test_model_matches_diffusers(cl, guess):
    assert_same_outputs(cl["ref"], cl["ours"], guess)


def test_text2img_matches_diffusers(cl):
    pipe = diffusers.StableDiffusionXLControlNetPipeline(**cl["pipe"].components, controlnet=cl["ref"])
    kw = dict(prompt="a cat", num_inference_steps=4, image=smooth_image(1), controlnet_conditioning_scale=0.8)
    _close(*_run(pipe, lambda m, **k: minsdxl.text2img(m, **k, controlnet=cl["ours"]), cl["model"], **kw))


def _without(*prefixes):
    return lambda sd: {k: v for k, v in sd.items() if not k.startswith(prefixes)}


def _made_for(cl):
    return cl["model"].unet


_KOHYA = "lora_unet_input_blocks_1_0_in_layers_2.lora_"
# case: (the file changed, the UNet passed, the message)
ERRORS = {
    "no_unet": (dict, lambda cl: None, r"is a Control-LoRA .* pass that UNet: load_controlnet\(path, unet=model.unet"),
    "not_a_unet": (dict, lambda cl: cl["model"], r"unet=model.unet\), not a SDXL"),
    "other_topology": (  # the refiner's: 4 levels, one transformer layer per block, 32-wide text
        dict,
        lambda cl: UNet2DConditionModel(TINY_REFINER),
        "does not fit this UNet: the ControlNet copied from it has no down_blocks.2.attentions.0.transformer_blocks.1.",
    ),
    "other_widths": (
        dict,
        lambda cl: UNet2DConditionModel(replace(TINY_UNET, cross_attention_dim=32)),
        r"does not fit this UNet: down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.weight is \(64, 32\) "
        r"in the ControlNet copied from it but \(64, \d\) @ \(\d, 48\) in the file",
    ),
    "sd15": (_without("label_emb."), _made_for, "a Stable Diffusion 1.x/2.x Control-LoRA"),
    "no_hint_block": (
        _without("input_hint_block."),
        _made_for,
        "has the lora_controlnet key of a Control-LoRA but no control image encoder",
    ),
    "lora_file": (
        lambda sd: {f"{_KOHYA}{p}.weight": sd[f"input_blocks.1.0.in_layers.2.{p}"] for p in ("up", "down")},
        _made_for,
        "is not a ControlNet .* for a LoRA minsdxl.load_lora_weights",
    ),
    "lonely_up": (
        _without("input_blocks.1.0.in_layers.2.down"),
        _made_for,
        "down_blocks.0.resnets.0.conv1 has a LoRA up but no partner",
    ),
    "full_and_pair": (
        lambda sd: sd | {"input_blocks.1.0.in_layers.2.weight": torch.zeros(32, 32, 3, 3)},
        _made_for,
        "down_blocks.0.resnets.0.conv1.weight is in it both as a full tensor and as a LoRA pair",
    ),
    "no_zero_conv": (
        _without("zero_convs.3."),
        _made_for,
        r"missing 2 keys \(controlnet_down_blocks.3.weight, controlnet_down_blocks.3.bias\)",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors(cl, tmp_path, case):
    edit, unet, match = ERRORS[case]
    save_safetensors(edit(cl["sai"]), tmp_path / "cl.safetensors")
    with pytest.raises(CheckpointError, match=match):
        minsdxl.load_controlnet(tmp_path / "cl.safetensors", unet=unet(cl))
