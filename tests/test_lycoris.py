"""LyCORIS adapters (LoHa, LoKr, LoCon with a Tucker middle, full diffs) against peft, fp32 on CPU, the tiny
SDXL with random weights.

peft's LoHa and LoKr (an independent implementation of the same math) are injected with random factors
into copies of the diffusers pipeline's UNet and text encoders; their parameters, under kohya names with an
alpha per module, are the LyCORIS file A1111 / ComfyUI read. minsdxl merges the file. Measured per adapted
layer: rel_err of minsdxl's weight delta (W - W0) against peft's get_delta_weight, <= 1e-5 (the deltas are
>= 5 % of the weights, so a wrong factor, alpha or scale cannot hide under the bound).
"""

import copy
import math

import diffusers
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from peft import LoHaConfig, LoHaModel, LoKrConfig, LoKrModel
from peft.tuners.lycoris_utils import LycorisLayer
from sdxl_testing import KOHYA_TE, _sgm_module_names, kohya_lora, lora_layers, minsdxl_from_pipe, rel_err

import minsdxl
from minsdxl.checkpoint import CheckpointError
from minsdxl.lora import Full, Hadamard, Kronecker, Pair

TOL = 1e-5
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TO_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # a Linear without bias
CONV = "down_blocks.1.resnets.0.conv1"  # 3x3, 32 -> 64


def pipe_layers(pipe, only=None):
    """[(component, module name, module)] of every Linear and Conv2d of the pipeline's UNet and text encoders
    (those only(component, name) keeps)."""
    return [(c, n, m) for c in COMPONENTS for n, m in getattr(pipe, c).named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and (only is None or only(c, n))]  # fmt: skip


def some(comp, name):
    """A few layers of each kind: conv_in (3x3, in 4), a UNet level's attention Linears and 1x1 / 3x3 convs,
    CLIP's first layer."""
    return name == "conv_in" or "down_blocks.1." in name or ".layers.0." in name


def kohya_names(pipe, sgm=True) -> dict:
    """(component, module) -> kohya's flat name: the UNet's sgm or diffusers spelling, CLIP's HF names
    (lora_te1_text_model_encoder_...; transformers 5's CLIP-L modules have no text_model.)."""
    sgm_names = _sgm_module_names(pipe) if sgm else {}
    out = {}
    for comp, name, _ in pipe_layers(pipe):
        if comp == "unet":
            out[(comp, name)] = "lora_unet_" + sgm_names.get(name, name).replace(".", "_")
        else:
            hf = name if name.startswith("text_model.") or name == "text_projection" else "text_model." + name
            out[(comp, name)] = KOHYA_TE[comp] + hf.replace(".", "_")
    return out


def peft_adapter(pipe, config, seed=0, sgm=True, half=False, only=None):
    """peft's LoHa / LoKr `config` (random factors) on every Linear and Conv2d (those `only` keeps) of the
    pipeline's UNet and text encoders -> (the LyCORIS file with kohya names, {(component, module): (peft's
    delta, its LycorisLayer)}, {component: a copy with peft's merge_and_unload() weights}). half: factors
    rounded to fp16 (the file is fp16; peft's fp32 delta of the same values stays the reference)."""
    torch.manual_seed(seed)  # peft's reset_adapter_parameters_random
    tuner = {LoHaConfig: LoHaModel, LoKrConfig: LoKrModel}[type(config)]
    names, targets = kohya_names(pipe, sgm), {}
    for comp, name, _ in pipe_layers(pipe, only):
        targets.setdefault(comp, []).append(name)
    sd, deltas, merged = {}, {}, {}
    for comp in targets:
        config = copy.copy(config)
        config.target_modules = targets[comp]
        model = tuner(copy.deepcopy(getattr(pipe, comp)), config, "default")
        for name, layer in model.model.named_modules():
            if not isinstance(layer, LycorisLayer):
                continue
            parts = {
                n: getattr(layer, n)["default"] for n in layer.adapter_layer_names if "default" in getattr(layer, n)
            }
            # peft's random factors give deltas of ~1e-4 of a weight (a 3x3 Tucker's): grow the first factor
            # (the delta is linear in it) to a delta of 30 % of the weight, well above fp32's rounding of W0
            first = next(iter(parts.values()))
            first.data *= (
                0.3 * layer.get_base_layer().weight.abs().max() / layer.get_delta_weight("default").abs().max()
            )
            for part, p in parts.items():
                p.data = p.data.half().float() if half else p.data
                sd[f"{names[(comp, name)]}.{part}"] = p.detach().clone().to(torch.float16 if half else torch.float32)
            sd[f"{names[(comp, name)]}.alpha"] = torch.tensor(float(layer.alpha["default"]))
            deltas[(comp, name)] = (layer.get_delta_weight("default").detach().clone(), layer)
        merged[comp] = model.merge_and_unload()
    return sd, deltas, merged


def weight(model, comp, name) -> torch.Tensor:
    return getattr(model, comp).get_submodule(name).weight  # minsdxl's modules have diffusers' / transformers' names


def delta_errors(model, pipe, expected: dict) -> dict:
    """{(component, module): rel_err of minsdxl's W - W0 against the expected delta}."""
    out = {}
    for (comp, name), d in expected.items():
        w0 = getattr(pipe, comp).get_submodule(name).weight
        w = weight(model, comp, name)
        assert rel_err(w0 + d.reshape(w0.shape), w0) > 0.05  # the adapter matters
        out[(comp, name)] = rel_err(w.float() - w0, d.reshape(w0.shape))
    return out


def _weights(model):
    return {(c, k): p for c in COMPONENTS for k, p in getattr(model, c).state_dict().items()}


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match")
@pytest.mark.parametrize("tucker,sgm", [(True, True), (False, False)], ids=["tucker-sgm", "flat-diffusers"])
def test_loha_matches_peft(tiny_base, tmp_path, tucker, sgm):
    # every Linear and Conv2d of the UNet and both text encoders; 3x3 convs with Tucker cores (hada_t1/t2,
    # peft's use_effective_conv2d; 1x1 convs stay flat there too) or flat [r, in * 9]; per-module r and alpha
    pipe, folder = tiny_base
    config = LoHaConfig(
        r=4,
        alpha=12,
        rank_pattern={"to_k": 2, "fc1": 6},
        alpha_pattern={"to_v": 20},
        use_effective_conv2d=tucker,
        init_weights=False,
    )
    sd, deltas, _ = peft_adapter(pipe, config, sgm=sgm)
    path = tmp_path / "loha.safetensors"
    safetensors.torch.save_file(sd, path)
    model = minsdxl.load(folder)
    minsdxl.load_lora_weights(model, path, adapter_name="loha")
    pairs = model.lora.adapters["loha"].pairs
    assert set(pairs) == {(c, n.removeprefix("text_model.")) for c, n in deltas} and len(pairs) > 300
    assert all(isinstance(p, Hadamard) for p in pairs.values())
    assert any(len(p.w1) == 3 for p in pairs.values()) == tucker
    assert {p.rank for p in pairs.values()} == {2, 4, 6}
    errors = delta_errors(model, pipe, {k: d for k, (d, _) in deltas.items()})
    assert max(errors.values()) <= TOL, max(errors.items(), key=lambda kv: kv[1])


LOKR = {
    # small rank: w1 and w2 decomposed where the factor is large enough (peft's update_layer: r < max / 2),
    # 3x3 convs' w2 as a Tucker core (lokr_t2)
    "decomposed-tucker": dict(r=1, alpha=2, decompose_both=True, use_effective_conv2d=True),
    # w1 whole, w2 decomposed; 3x3 convs' w2 flat [r, d * 9]
    "w2-flat": dict(r=1, alpha=3, decompose_both=False, decompose_factor=4),
    # a rank above every factor's: w1 and w2 whole. LyCORIS / A1111 scale those by 1 (the file's alpha
    # ignored); peft by alpha / r
    "whole": dict(r=64, alpha=16, decompose_both=True, decompose_factor=4),
}


@pytest.mark.parametrize("case", list(LOKR))
def test_lokr_matches_peft(tiny_base, case):
    pipe, folder = tiny_base
    sd, deltas, _ = peft_adapter(pipe, LoKrConfig(init_weights=False, **LOKR[case]), seed=1, sgm=case != "w2-flat")
    model = minsdxl.load(folder)
    minsdxl.load_lora_weights(model, sd)
    pairs = model.lora.adapters["default_0"].pairs
    assert all(isinstance(p, Kronecker) for p in pairs.values()) and len(pairs) == len(deltas)
    forms = {(len(p.w1), len(p.w2)) for p in pairs.values()}
    expected = {}
    for (comp, name), (d, layer) in deltas.items():
        whole = "default" in layer.lokr_w1 and "default" in layer.lokr_w2
        assert (pairs[(comp, name.removeprefix("text_model."))].rank is None) == whole
        expected[(comp, name)] = d / layer.scaling["default"] if whole else d
    assert forms == {"decomposed-tucker": {(2, 2), (2, 3)},
                     "w2-flat": {(1, 2)}, "whole": {(1, 1)}}[case]  # fmt: skip
    errors = delta_errors(model, pipe, expected)
    assert max(errors.values()) <= TOL, max(errors.items(), key=lambda kv: kv[1])


def test_weights_scales_unload_and_a_plain_lora_beside(tiny_base):
    pipe, folder = tiny_base
    model = minsdxl.load(folder)
    original = {k: (v.data_ptr(), v.clone()) for k, v in _weights(model).items()}
    config = LoHaConfig(r=4, alpha=8, use_effective_conv2d=True, init_weights=False)
    sd, deltas, _ = peft_adapter(pipe, config, only=some)
    layers = lora_layers(model, only=lambda n: "down_blocks.1.attentions" in n or n == "conv_in")
    plain = {(c, n): (torch.randn(3, *s[1:]) * 0.1, torch.randn(s[0], 3, *(1,) * (len(s) - 2)) * 0.1)
             for c, n, s in layers}  # fmt: skip
    minsdxl.load_lora_weights(model, sd, adapter_name="loha")
    minsdxl.load_lora_weights(model, kohya_lora(model, plain, alpha=2.0), adapter_name="plain")
    assert minsdxl.get_active_adapters(model) == ["plain"]  # as diffusers: the one loaded last
    d_loha = {k: d for k, (d, _) in deltas.items()}
    d_plain = {(c, n.removeprefix("text_model.")): 2.0 / 3 * (up.flatten(1) @ down.flatten(1))
               for (c, n), (down, up) in plain.items()}  # fmt: skip

    def check(a, b):  # W = W0 + a * LoHa + b * LoRA, every layer
        for (comp, name), d in d_loha.items():
            w0 = getattr(pipe, comp).get_submodule(name).weight
            lora = d_plain.get((comp, name.removeprefix("text_model.")), torch.zeros(w0.shape))
            want = w0 + a * d.reshape(w0.shape) + b * lora.reshape(w0.shape)
            assert rel_err(weight(model, comp, name), want) <= TOL, (comp, name)

    check(0.0, 1.0)
    minsdxl.set_adapters(model, ["loha", "plain"], [0.5, -0.3])
    check(0.5, -0.3)
    with minsdxl.lora.scaled(model, 0.4):  # what a call's cross_attention_kwargs={"scale": 0.4} does
        check(0.2, -0.12)
    check(0.5, -0.3)
    minsdxl.delete_adapters(model, "plain")
    errors = delta_errors(model, pipe, {k: 0.5 * d for k, d in d_loha.items()})
    assert max(errors.values()) <= TOL
    minsdxl.unload_lora_weights(model)
    # the very tensors loaded, never written to
    assert all(v.data_ptr() == original[k][0] and torch.equal(v, original[k][1]) for k, v in _weights(model).items())
    assert model.lora.originals == {}


def test_half_precision_merges_in_fp32_without_drift(tiny_base):
    pipe, folder = tiny_base
    model = minsdxl.load(folder, dtype=torch.float16)
    before = {k: v.clone() for k, v in _weights(model).items()}
    config = LoHaConfig(r=4, alpha=8, use_effective_conv2d=True, init_weights=False)
    loha, d_loha, _ = peft_adapter(pipe, config, half=True, only=some)
    lokr, d_lokr, _ = peft_adapter(pipe, LoKrConfig(r=1, alpha=2, init_weights=False), seed=1, half=True, only=some)
    assert {t.dtype for t in loha.values() if t.ndim} == {torch.float16}
    minsdxl.load_lora_weights(model, loha, adapter_name="h")
    minsdxl.load_lora_weights(model, lokr, adapter_name="k")
    minsdxl.set_adapters(model, ["h", "k"], [0.8, 0.6])
    once = {k: v.clone() for k, v in _weights(model).items()}
    for (comp, name), (dh, _) in d_loha.items():
        # one rounding of the fp32 sum: within an fp16 ulp of fp16(W0 + 0.8 dh + 0.6 dk) (ties may round apart)
        w0 = getattr(pipe, comp).get_submodule(name).weight.half().float()
        want = (w0 + 0.8 * dh.reshape(w0.shape) + 0.6 * d_lokr[(comp, name)][0].reshape(w0.shape)).half().float()
        got = weight(model, comp, name)
        assert got.dtype == torch.float16
        assert ((got.float() - want).abs() <= want.abs() * 2**-10 + 2**-24).all(), (comp, name)
    for i in range(3):  # a merge from the kept originals each time: nothing accumulates
        minsdxl.set_adapters(model, ["h"], [0.1 * i])
        minsdxl.set_adapters(model, ["h", "k"], [0.8, 0.6])
    assert all(torch.equal(v, once[k]) for k, v in _weights(model).items())
    minsdxl.unload_lora_weights(model)
    assert all(torch.equal(v, before[k]) for k, v in _weights(model).items())


def test_full_diffs(tiny_base):
    # LyCORIS 'full': the whole delta of every layer (a conv's also flat, [out, in * 9]: A1111 reshapes any
    # diff of the weight's size) and of every bias; scale 1 whatever alpha the file holds
    pipe, folder = tiny_base
    model = minsdxl.load(folder)
    g = torch.Generator().manual_seed(4)
    sd, want, names = {}, {}, kohya_names(pipe)
    for i, (comp, name, layer) in enumerate(pipe_layers(pipe)):
        flat = names[(comp, name)]
        diff = torch.randn(layer.weight.shape, generator=g) * 0.1
        sd[f"{flat}.diff"] = diff.flatten(1) if i % 2 else diff
        want[(comp, name, "weight")] = layer.weight + 0.5 * diff
        if layer.bias is not None:
            sd[f"{flat}.diff_b"] = torch.randn(layer.bias.shape, generator=g)
            want[(comp, name, "bias")] = layer.bias + 0.5 * sd[f"{flat}.diff_b"]
        if i % 3 == 0:
            sd[f"{flat}.alpha"] = torch.tensor(7.0)
    minsdxl.load_lora_weights(model, sd, weight=0.5)
    assert all(isinstance(p, Full) and p.scale == 1 for p in model.lora.adapters["default_0"].pairs.values())
    assert any(kind == "bias" for _, _, kind in want)
    for (comp, name, kind), w in want.items():
        m = getattr(model, comp).get_submodule(name)
        assert rel_err(getattr(m, kind), w) <= 1e-6, (comp, name, kind)
    minsdxl.unload_lora_weights(model)


def test_locon_tucker_middle_runs_as_three_convs(tiny_base):
    # LyCORIS LoCon with use_tucker: lora_down (1x1), lora_mid (the kernel), lora_up (1x1), run by LyCORIS
    # as up(mid(down(x))). The merged conv must give the same output (no formula shared with minsdxl)
    pipe, folder = tiny_base
    model = minsdxl.load(folder)
    g = torch.Generator().manual_seed(5)
    sd, factors, names = {}, {}, kohya_names(pipe)
    for comp, name, conv in pipe_layers(pipe):
        if conv.weight.shape[2:] != (3, 3):
            continue
        (out, inp, kh, kw), r = conv.weight.shape, 3
        down, mid = torch.randn(r, inp, 1, 1, generator=g) * 0.3, torch.randn(r, r, kh, kw, generator=g) * 0.3
        up = torch.randn(out, r, 1, 1, generator=g) * 0.3
        flat = names[(comp, name)]
        sd |= {f"{flat}.lora_down.weight": down, f"{flat}.lora_mid.weight": mid, f"{flat}.lora_up.weight": up}
        sd[f"{flat}.alpha"] = torch.tensor(2.0)
        factors[name] = (down, mid, up)
    minsdxl.load_lora_weights(model, sd)
    assert len(factors) > 10 and all(p.mid is not None for p in model.lora.adapters["default_0"].pairs.values())
    for name, (down, mid, up) in factors.items():
        conv, merged = pipe.unet.get_submodule(name), model.unet.get_submodule(name)
        x = torch.randn(1, conv.in_channels, 9, 9, generator=g)
        branch = F.conv2d(F.conv2d(x, down), mid, stride=conv.stride, padding=conv.padding)
        ref = conv(x) + 2.0 / 3 * F.conv2d(branch, up)
        assert rel_err(ref, conv(x)) > 0.05
        assert rel_err(merged(x), ref) <= TOL, name


def test_text2img_equals_peft_merged_weights(tiny_base):
    # a LoHa and a LoKr adapter at once, against a minsdxl model built from peft's merge_and_unload weights
    pipe, folder = tiny_base
    loha, _, merged = peft_adapter(pipe, LoHaConfig(r=4, alpha=8, use_effective_conv2d=True, init_weights=False))
    on_top = diffusers.StableDiffusionXLPipeline(**{**pipe.components, **merged})
    lokr, _, merged = peft_adapter(on_top, LoKrConfig(r=1, alpha=2, init_weights=False), seed=1)
    reference = minsdxl_from_pipe(diffusers.StableDiffusionXLPipeline(**{**pipe.components, **merged}))
    model = minsdxl.load(folder)
    kw = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=3, height=64, width=64,
              output_type="latent", progress=False)  # fmt: skip
    base = minsdxl.text2img(model, **kw, seed=0)
    minsdxl.load_lora_weights(model, loha, adapter_name="loha")
    minsdxl.load_lora_weights(model, lokr, adapter_name="lokr")
    minsdxl.set_adapters(model, ["loha", "lokr"], [1.0, 1.0])
    got, ref = minsdxl.text2img(model, **kw, seed=0), minsdxl.text2img(reference, **kw, seed=0)
    assert rel_err(ref, base) > 0.05  # the adapters matter
    assert rel_err(got, ref) <= TOL


def test_dora_scale_is_dropped_for_lycoris(tiny_base):
    pipe, folder = tiny_base
    model = minsdxl.load(folder)
    sd, _, _ = peft_adapter(pipe, LoHaConfig(r=2, alpha=2, init_weights=False), only=some)
    minsdxl.load_lora_weights(model, sd)
    ref = {k: v.clone() for k, v in _weights(model).items()}
    minsdxl.unload_lora_weights(model)
    dora = sd | {k.replace("alpha", "dora_scale"): torch.ones(1) for k in sd if k.endswith(".alpha")}
    with pytest.warns(UserWarning, match="DoRA .* applied as a plain LoRA / LoHa / LoKr"):
        minsdxl.load_lora_weights(model, dora)
    assert all(torch.equal(v, ref[k]) for k, v in _weights(model).items())


def test_bad_lycoris_files_are_refused_before_any_change(tiny_base):
    pipe, folder = tiny_base
    model = minsdxl.load(folder)
    before = {k: v.clone() for k, v in _weights(model).items()}
    names = kohya_names(pipe)
    q, c = names[("unet", TO_Q)], names[("unet", CONV)]
    z = torch.zeros
    loha = {f"{q}.hada_w1_a": z(64, 4), f"{q}.hada_w1_b": z(4, 64), f"{q}.hada_w2_a": z(64, 4),
            f"{q}.hada_w2_b": z(4, 64), f"{q}.alpha": torch.tensor(4.0)}  # fmt: skip
    minsdxl.lora.read_lora(model, loha)  # fits
    lokr = {f"{c}.lokr_w1": z(4, 4), f"{c}.lokr_w2_a": z(16, 2), f"{c}.lokr_w2_b": z(2, 8 * 9)}
    assert minsdxl.lora.read_lora(model, lokr)[("unet", CONV)].rank == 2
    no_w2b = {k: v for k, v in loha.items() if not k.endswith("w2_b")}
    cases = [
        ({**loha, f"{q}.hada_w1_b": z(4, 48)}, r"LoHa \(LyCORIS\) .*hada_w1_b \(4, 48\).* do not fit its weight "
         r"\(64, 64\): this LoRA was made for a different model"),
        ({**loha, f"{q}.hada_w2_a": z(64, 3)}, "do not fit its weight"),  # factors that do not multiply
        ({**loha, f"{q}.hada_w1_a": z(64)}, "do not fit its weight"),  # 1-D
        ({**loha, f"{q}.hada_w1_b": z(0, 64), f"{q}.hada_w1_a": z(64, 0)}, "do not fit its weight"),  # rank 0
        ({**loha, f"{q}.hada_t1": z(4, 4, 3, 3)}, "do not fit its weight"),  # a Tucker core on a Linear
        (no_w2b, r"LoHa \(LyCORIS\) parts \[.*\] but needs hada_w2_a and hada_w2_b \(and an optional hada_t2\)"),
        ({**lokr, f"{c}.lokr_w2_b": z(2, 8)}, r"LoKr \(LyCORIS\) .*which do not fit its weight \(64, 32, 3, 3\)"),
        ({**lokr, f"{c}.lokr_w1_a": z(4, 2)}, "but needs lokr_w1 alone, or lokr_w1_a and lokr_w1_b"),
        ({k: v for k, v in lokr.items() if "w2" not in k}, "but needs lokr_w2 alone, or lokr_w2_a and lokr_w2_b"),
        ({**lokr, f"{c}.lokr_w2": z(16, 8, 3, 3)}, "but needs lokr_w2 alone"),
        ({**loha, f"{q}.lora_down.weight": z(4, 64)}, r"LoRA and LoHa \(LyCORIS\) at once"),
        ({f"{q}.alpha": torch.tensor(1.0)}, r"has \['alpha'\]: no weights"),
        ({f"{q}.diff": z(64, 63)}, r"full diff \(LyCORIS\) diff \(64, 63\), which do not fit its weight \(64, 64\)"),
        ({f"{q}.diff": z(64, 64), f"{q}.diff_b": z(64)}, r"has a diff_b \(64,\), but the layer's bias is None"),
        ({f"{q}.diff_b": z(64)}, "but needs diff"),
        ({f"{c}.lora_down.weight": z(3, 32, 1, 1), f"{c}.lora_mid.weight": z(3, 3, 3, 3),
          f"{c}.lora_up.weight": z(64, 2, 1, 1)},
         r"has LoRA down \(3, 32, 1, 1\), mid \(3, 3, 3, 3\), up \(64, 2, 1, 1\), which do not fit"),
        ({f"unet.{TO_Q}.hada_w1_a": z(64, 4)}, "LyCORIS adapter with diffusers / PEFT module names"),
        ({f"{q}.oft_blocks": z(4, 16, 16)}, "OFT"),
        ({f"{q}.a1.weight": z(4, 64)}, "GLoRA"),
        ({"lora_unet_down_blocks_9_attentions_0_proj_in.hada_w1_a": z(4, 4)}, "name no layer"),
    ]  # fmt: skip
    for sd, message in cases:
        with pytest.raises(CheckpointError, match=message):
            minsdxl.load_lora_weights(model, sd)
    assert all(torch.equal(v, before[k]) for k, v in _weights(model).items())
    assert minsdxl.get_active_adapters(model) == [] and model.lora.originals == {}
    assert isinstance(minsdxl.lora.read_lora(model, {f"{q}.lora_down.weight": z(4, 64), f"{q}.lora_up.weight":
                                                     z(64, 4)})[("unet", TO_Q)], Pair)  # fmt: skip
    assert math.isclose(minsdxl.lora.read_lora(model, loha)[("unet", TO_Q)].scale, 1.0)


def test_info_tells_the_lycoris_kinds(tmp_path):
    """`minsdxl info` on a LyCORIS file: kinds per component, ranks where they have one (full SDXL shapes)."""
    from minsdxl.cli import _format_lora, describe_lora

    g = torch.Generator().manual_seed(0)
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_"  # 640 x 640 projections
    sd = {
        **{
            f"{stem}to_q.hada_{k}": torch.randn(
                640 if k.endswith("a") else 2, 2 if k.endswith("a") else 640, generator=g
            )
            for k in ("w1_a", "w1_b", "w2_a", "w2_b")
        },
        f"{stem}to_q.alpha": torch.tensor(1.0),
        f"{stem}to_k.lokr_w1": torch.randn(4, 4, generator=g),
        f"{stem}to_k.lokr_w2": torch.randn(160, 160, generator=g),
        f"{stem}to_v.diff": torch.randn(640, 640, generator=g),
    }
    path = tmp_path / "lycoris.safetensors"
    safetensors.torch.save_file(sd, path)
    report = describe_lora(path)
    unet = report["models"]["base"]["components"]["unet"]
    assert report["models"]["base"]["fits"] and unet["layers"] == 3
    assert unet["kinds"] == ["LoHa (LyCORIS)", "LoKr (LyCORIS)", "full diff (LyCORIS)"]
    assert unet["ranks"] == [2] and unet["alphas"] == [1.0]  # the LoKr of whole factors and the diff have none
    assert "rank 2, alpha 1 (LoHa (LyCORIS), LoKr (LyCORIS), full diff (LyCORIS))" in _format_lora(report)
