"""LoRA against diffusers' load_lora_weights (PEFT backend), fp32 on CPU, tiny SDXL with random weights.

diffusers keeps each LoRA as a side branch (W x + s B(A x)); minsdxl merges it into W. The two differ
by fp32 rounding only, so final latents are held to test_pipelines' bound (1e-4 relative); a LoRA
here moves them by ~10-30 %, so a wrong module, alpha or scale cannot hide under it.
"""

import json
import warnings

import diffusers
import pytest
import safetensors.torch
import torch
from sdxl_testing import kohya_lora, lora_layers, old_diffusers_lora, peft_lora, random_lora_pairs, rel_err

import minsdxl
from minsdxl.checkpoint import CheckpointError

LATENT_TOL = 1e-4  # = test_pipelines.LATENT_TOL
KW = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=3, height=64, width=64)
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def both(tiny_base):
    """A fresh diffusers pipeline (LoRAs are loaded into it; the session's tiny_base stays clean) and
    a minsdxl model from the same folder."""
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_base[1])
    pipe.set_progress_bar_config(disable=True)
    return pipe, minsdxl.load(tiny_base[1])


@pytest.fixture
def clean(both):
    yield both
    pipe, model = both
    pipe.unload_lora_weights()
    minsdxl.unload_lora_weights(model)
    # diffusers' encode_prompt(lora_scale=s) leaves pipe._lora_scale = s, and every later load_lora_weights
    # scales text-encoder LoRAs by it (lora_pipeline.py: lora_scale=self.lora_scale); minsdxl keeps no such
    # state. Reset it so one test's call does not change the next test's reference
    pipe.__dict__.pop("_lora_scale", None)


def _run(pipe, model, seed=0, **kw):
    kw = {**KW, **kw}
    ref = pipe(**kw, generator=torch.Generator().manual_seed(seed), output_type="latent").images
    got = minsdxl.text2img(model, **kw, generator=torch.Generator().manual_seed(seed), output_type="latent",
                           progress=False)  # fmt: skip
    return ref, got


def _weights(model):
    return {(c, k): p for c in COMPONENTS for k, p in getattr(model, c).state_dict().items()}


def test_kohya_every_layer_matches_diffusers(clean, tmp_path):
    # a kohya (sd-scripts) SDXL LoRA on every Linear and Conv2d of the UNet (sgm names: input_blocks_4_1_...,
    # time_embed, label_emb, in_layers/out_layers/skip_connection convs) and both text encoders
    pipe, model = clean
    base, _ = _run(pipe, model)
    path = tmp_path / "kohya.safetensors"
    safetensors.torch.save_file(kohya_lora(model, random_lora_pairs(lora_layers(model)), alpha=3.0), path)
    pipe.load_lora_weights(path)
    assert minsdxl.load_lora_weights(model, path) == "default_0" == pipe.get_active_adapters()[0]
    ref, got = _run(pipe, model)
    assert rel_err(ref, base) > 0.05  # the LoRA matters
    assert rel_err(got, ref) <= LATENT_TOL


def test_peft_format_and_metadata_alphas_match_diffusers(clean, tmp_path):
    # diffusers' own format (what its training scripts save): lora_A / lora_B, alphas in the header's
    # lora_adapter_metadata (lora_alpha, one alpha_pattern entry), attention + feed-forward layers only;
    # CLIP-L's with a lora_B bias (lora_bias=True: every CLIP layer has a bias to merge it into), bigG's rsLoRA
    pipe, model = clean
    pairs = random_lora_pairs(lora_layers(model, only=lambda n: "attn" in n or ".ff." in n or "mlp" in n))
    q = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    meta = {"unet.alpha_pattern": {q: 2}}
    for c, alpha in (("unet", 8), ("text_encoder", 6), ("text_encoder_2", 6)):
        # as diffusers saves it (LoraConfig.to_dict()): the common rank, the others in rank_pattern. PEFT
        # matches these names as suffixes of module names, which have no text_model. in transformers 5's CLIP-L
        mine = {n.removeprefix("text_model."): d.shape[0] for (cc, n), (d, _) in pairs.items() if cc == c}
        targets = sorted({".".join(n.split(".")[-2:]) for n in mine})
        meta |= {f"{c}.r": 4, f"{c}.lora_alpha": alpha, f"{c}.target_modules": targets}
        meta[f"{c}.rank_pattern"] = {n: r for n, r in mine.items() if r != 4}
    meta["text_encoder.lora_bias"] = True
    meta["text_encoder_2.use_rslora"] = True  # scale alpha / sqrt(r)
    sd = peft_lora(pairs)
    g = torch.Generator().manual_seed(3)
    for (c, n), (_, up) in pairs.items():
        if c == "text_encoder":
            sd[f"{c}.{n}.lora_B.bias"] = torch.randn(up.shape[0], generator=g) * 0.1
    path = tmp_path / "peft.safetensors"
    safetensors.torch.save_file(sd, path, metadata={"lora_adapter_metadata": json.dumps(meta)})
    pipe.load_lora_weights(path)
    minsdxl.load_lora_weights(model, path)
    ref, got = _run(pipe, model)
    assert rel_err(got, ref) <= LATENT_TOL
    a = model.lora.adapters["default_0"].pairs
    assert a[("unet", q)].alpha == 2
    assert a[("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")].alpha == 8
    assert a[("text_encoder", "encoder.layers.0.mlp.fc1")].bias is not None


def test_formats_merge_identically(tiny_base):
    # the same pairs as kohya (sgm or diffusers module names), PEFT, and diffusers' older spellings:
    # bit-identical merged weights (alpha = rank throughout: PEFT without metadata means scale 1)
    model = minsdxl.load(tiny_base[1])
    pairs = random_lora_pairs(lora_layers(model), rank=4)
    pairs = {k: v for k, v in pairs.items() if v[0].shape[0] == 4}
    merged = []
    for sd in (
        kohya_lora(model, pairs),
        kohya_lora(model, pairs, sgm=False),
        peft_lora(pairs),
        old_diffusers_lora(pairs),
    ):
        minsdxl.load_lora_weights(model, sd)
        merged.append({k: v.clone() for k, v in _weights(model).items()})
        minsdxl.unload_lora_weights(model)
    changed = [k for k in merged[0] if not torch.equal(merged[0][k], _weights(model)[k])]
    assert len(changed) == len(pairs)  # every layer's weight, nothing else
    for other in merged[1:]:
        assert all(torch.equal(merged[0][k], other[k]) for k in merged[0])


def test_adapters_scales_and_unload_match_diffusers(clean, tmp_path):
    pipe, model = clean
    original = {k: (v.data_ptr(), v.clone()) for k, v in _weights(model).items()}
    layers = lora_layers(model)
    for name, seed in (("a", 1), ("b", 2)):  # "b" as diffusers saves one: a folder, its default file name
        path = tmp_path / f"{name}.safetensors" if name == "a" else tmp_path / "b" / "pytorch_lora_weights.safetensors"
        path.parent.mkdir(exist_ok=True)
        safetensors.torch.save_file(kohya_lora(model, random_lora_pairs(layers, seed=seed), alpha=2.0), path)
        pipe.load_lora_weights(path.parent if name == "b" else path, adapter_name=name)
        minsdxl.load_lora_weights(model, path.parent if name == "b" else path, adapter_name=name)
    # diffusers: the adapter loaded last is the only active one
    assert minsdxl.get_active_adapters(model) == pipe.get_active_adapters() == ["b"]
    ref, got = _run(pipe, model)
    assert rel_err(got, ref) <= LATENT_TOL
    pipe.set_adapters(["a", "b"], [0.5, -0.3])
    minsdxl.set_adapters(model, ["a", "b"], [0.5, -0.3])
    ref2, got2 = _run(pipe, model, seed=1)
    assert rel_err(got2, ref2) <= LATENT_TOL
    # a call's cross_attention_kwargs scale (UNet and text encoders), then encode_prompt's lora_scale
    ref3, got3 = _run(pipe, model, seed=1, cross_attention_kwargs={"scale": 0.4})
    assert rel_err(got3, ref3) <= LATENT_TOL and rel_err(ref3, ref2) > 0.01
    ref_e = pipe.encode_prompt("a cat", negative_prompt="dog", lora_scale=0.4)
    got_e = minsdxl.encode_prompt(model, "a cat", negative_prompt="dog", lora_scale=0.4)
    assert all(rel_err(g, r) <= 1e-5 for g, r in zip(got_e, ref_e))
    _, after = _run(pipe, model, seed=1)
    assert torch.equal(after, got2)  # the scale lasted one call
    minsdxl.delete_adapters(model, "a")
    pipe.delete_adapters("a")
    pipe.set_adapters(["b"], [0.7])
    minsdxl.set_adapters(model, "b", 0.7)
    ref4, got4 = _run(pipe, model)
    assert rel_err(got4, ref4) <= LATENT_TOL
    pipe.disable_lora()
    minsdxl.disable_lora(model)
    ref5, got5 = _run(pipe, model)
    assert rel_err(got5, ref5) <= LATENT_TOL and rel_err(ref5, ref4) > 0.01
    assert all(torch.equal(v, original[k][1]) for k, v in _weights(model).items())  # the weights as loaded
    pipe.enable_lora()
    minsdxl.enable_lora(model)
    assert torch.equal(_run(pipe, model)[1], got4)
    minsdxl.unload_lora_weights(model)
    # exactly as loaded: the very tensors (memory-mapped from the checkpoint) are back, never written to
    assert all(v.data_ptr() == original[k][0] and torch.equal(v, original[k][1]) for k, v in _weights(model).items())
    assert model.lora.adapters == {} and model.lora.originals == {}


def test_scale_zero_is_the_base_model(clean):
    _, model = clean
    kw = dict(**KW, output_type="latent", progress=False)
    base = minsdxl.text2img(model, **kw, seed=0)
    before = {k: v.clone() for k, v in _weights(model).items()}
    minsdxl.load_lora_weights(model, kohya_lora(model, random_lora_pairs(lora_layers(model)), alpha=1.0))
    merged = {k: v.clone() for k, v in _weights(model).items()}
    seen = []

    def weights_now(m, i, t, tensors):
        seen.append(all(torch.equal(v, before[k]) for k, v in _weights(m).items()))
        return {}

    zero = minsdxl.text2img(
        model, **kw, seed=0, cross_attention_kwargs={"scale": 0.0}, callback_on_step_end=weights_now
    )
    assert seen == [True] * 3  # W0 + 0 * delta in fp32 is W0 bit for bit, during the call
    assert all(torch.equal(v, merged[k]) for k, v in _weights(model).items())  # and the LoRA is back after it
    # 1e-5, not bit-equal: the merged weights live in fresh (64-byte aligned) tensors, the loaded ones in
    # the memory-mapped file (8-byte aligned), and oneDNN/MKL pick other kernels by alignment; cloning the
    # plain model's weights moves its latents by the same ~2e-6 relative
    assert rel_err(zero, base) <= 1e-5


def test_half_precision_merges_in_fp32_without_drift(tiny_base):
    model = minsdxl.load(tiny_base[1], dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in _weights(model).items()}
    pairs = random_lora_pairs(lora_layers(model))
    pairs_y = random_lora_pairs(lora_layers(model), seed=5)
    minsdxl.load_lora_weights(model, kohya_lora(model, pairs, alpha=2.0), adapter_name="x")
    minsdxl.load_lora_weights(model, kohya_lora(model, pairs_y), adapter_name="y")
    minsdxl.set_adapters(model, ["x", "y"], [0.8, 0.6])
    once = {k: v.clone() for k, v in _weights(model).items()}
    (comp, name), (down, up) = next(iter(pairs.items()))
    assert once[(comp, f"{name}.weight")].dtype == torch.bfloat16
    x = model.lora.adapters["x"].pairs[(comp, name)]
    assert x.alpha == 2.0

    def delta(pair, shape):
        down, up = pair
        return (up.reshape(up.shape[0], -1) @ down.flatten(1)).reshape(shape)

    # one rounding: bf16(W0 + 0.8 * 2/r * up @ down + 0.6 * delta_y) (y has no alpha: scale 1), not a rounding per
    # adapter. Up to fp32 summation order at rounding ties: <= 2.4e-4 of a layer's elements measured, where rounding
    # after each adapter changes ~28 %
    worst = 0.0
    for key in [k for k in pairs if k[0] == "unet"]:
        w = before[("unet", f"{key[1]}.weight")].float()
        r = pairs[key][0].shape[0]
        want = (w + 0.8 * 2.0 / r * delta(pairs[key], w.shape) + 0.6 * delta(pairs_y[key], w.shape)).bfloat16()
        worst = max(worst, (once[("unet", f"{key[1]}.weight")] != want).float().mean().item())
    assert worst <= 1e-3
    for i in range(10):  # diffusers' fuse/unfuse would add and subtract in bf16 ten times
        minsdxl.set_adapters(model, ["x"], [0.1 * i])
        minsdxl.set_adapters(model, ["x", "y"], [0.8, 0.6])
    assert all(torch.equal(v, once[k]) for k, v in _weights(model).items())
    minsdxl.unload_lora_weights(model)
    assert all(torch.equal(v, before[k]) for k, v in _weights(model).items())


def test_refiner_skips_clip_l_and_shared_encoder_is_guarded(tiny_base, tiny_refiner):
    base = minsdxl.load(tiny_base[1])
    refiner = minsdxl.load(tiny_refiner[1], share=base)
    te2 = {k: v.clone() for k, v in refiner.text_encoder_2.state_dict().items()}
    # a refiner LoRA (its UNet and bigG) that also carries a CLIP-L part
    clip_l = [x for x in lora_layers(base) if x[0] == "text_encoder"]
    lora = kohya_lora(refiner, random_lora_pairs(lora_layers(refiner) + clip_l))
    with pytest.warns(UserWarning, match=r"also adapts \['text_encoder'\], which this model does not have"):
        minsdxl.load_lora_weights(refiner, lora)
    assert not torch.equal(refiner.text_encoder_2.state_dict()["text_model.encoder.layers.0.mlp.fc1.weight"],
                           te2["text_model.encoder.layers.0.mlp.fc1.weight"])  # fmt: skip
    # text_encoder_2 is the base's own module: a second model's adapters on it would fight
    base_lora = kohya_lora(base, random_lora_pairs(lora_layers(base)))
    with pytest.raises(ValueError, match="text_encoder_2 is shared with another loaded model"):
        minsdxl.load_lora_weights(base, base_lora)
    unet_only = {k: v for k, v in base_lora.items() if k.startswith("lora_unet_")}
    minsdxl.load_lora_weights(base, unet_only)  # the UNets are not shared
    minsdxl.unload_lora_weights(refiner)
    assert all(torch.equal(v, te2[k]) for k, v in refiner.text_encoder_2.state_dict().items())
    minsdxl.load_lora_weights(base, base_lora, adapter_name="now")  # te2 is free again


def test_kohya_dora_is_applied_as_plain_lora_like_diffusers(tiny_base):
    model = minsdxl.load(tiny_base[1])
    pairs = random_lora_pairs(lora_layers(model, only=lambda n: "attn" in n))
    plain = kohya_lora(model, pairs, alpha=2.0)
    dora = {**plain, **{k.replace("lora_down.weight", "dora_scale"): torch.ones(1) for k in plain if "down" in k}}
    minsdxl.load_lora_weights(model, plain)
    ref = {k: v.clone() for k, v in _weights(model).items()}
    minsdxl.unload_lora_weights(model)
    with pytest.warns(UserWarning, match="DoRA .* applied as a plain LoRA"):
        minsdxl.load_lora_weights(model, dora)
    assert all(torch.equal(v, ref[k]) for k, v in _weights(model).items())


def test_bad_loras_are_refused_before_any_change(tiny_base, tmp_path):
    model = minsdxl.load(tiny_base[1])
    before = {k: v.clone() for k, v in _weights(model).items()}
    good = kohya_lora(model, random_lora_pairs(lora_layers(model, only=lambda n: "attn1" in n)))
    k0 = next(k for k in good if "down" in k)
    to_q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # a Linear without bias
    biased = peft_lora(random_lora_pairs(lora_layers(model, only=lambda n: n == to_q)))
    biased[f"unet.{to_q}.lora_B.bias"] = torch.zeros(model.unet.get_submodule(to_q).out_features)
    cases = [
        (biased, "has a lora_B bias .* but the layer's bias is None"),
        ({**good, k0: good[k0][:, :-1]}, "do not fit its weight .*made for a different model"),
        ({**good, "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)},
         "name no layer of this SDXL base model"),
        ({k: v for k, v in good.items() if k != k0.replace("down", "up")}, "needs both down and up"),
        ({"lora_unet_input_blocks_4_1_proj_in.hada_w1_a": torch.zeros(4, 4)}, "LoHa"),
        ({"unet.conv_in.lora_magnitude_vector": torch.zeros(4)}, "DoRA"),
        ({"something.else": torch.zeros(1)}, "name no layer"),
        ({}, "holds no LoRA weights"),
        ({**good, k0: torch.tensor(1.0)}, "do not fit its weight"),  # 0-dim
        ({**good, k0: good[k0].tolist()}, r"non-tensor values \{'down': 'list'\}"),
        ({**good, k0.replace("lora_down.weight", "alpha"): torch.ones(2)}, r"an alpha of shape \(2,\)"),
    ]  # fmt: skip
    for sd, message in cases:
        with pytest.raises(CheckpointError, match=message):
            minsdxl.load_lora_weights(model, sd)
    with pytest.raises(CheckpointError, match="no LoRA file at"):
        minsdxl.load_lora_weights(model, tmp_path / "missing.safetensors")
    # folders as diffusers reads them: its one .safetensors, whatever its name; weight_name picks among several
    folder = tmp_path / "lora_folder"
    folder.mkdir()
    safetensors.torch.save_file(good, folder / "my_style.safetensors")
    assert set(minsdxl.lora.read_lora(model, folder)) == set(minsdxl.lora.read_lora(model, good))
    assert minsdxl.lora.read_lora(model, folder / "my_style.safetensors", weight_name="unused.safetensors")
    safetensors.torch.save_file(good, folder / "other.safetensors")
    with pytest.raises(
        CheckpointError, match=r"several .safetensors files \['my_style.safetensors', 'other.safetensors'\]"
    ):
        minsdxl.load_lora_weights(model, folder)
    with pytest.raises(CheckpointError, match="no missing.safetensors in"):
        minsdxl.load_lora_weights(model, folder, weight_name="missing.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in _weights(model).items())
    assert minsdxl.get_active_adapters(model) == []
    minsdxl.load_lora_weights(model, good, adapter_name="s")
    with pytest.raises(ValueError, match="an adapter named 's' is already loaded"):
        minsdxl.load_lora_weights(model, good, adapter_name="s")
    with pytest.raises(ValueError, match=r"no adapter named 'z'; loaded: \['s'\]"):
        minsdxl.set_adapters(model, ["s", "z"])
    with pytest.raises(ValueError, match="2 adapter names but 1 weights"):
        minsdxl.set_adapters(model, ["s", "s"], [1.0])
    with pytest.raises(TypeError, match="per-component / per-block adapter weights are not supported"):
        minsdxl.set_adapters(model, "s", {"unet": 0.5})
    with pytest.raises(ValueError, match=r"cross_attention_kwargs \['gligen'\] are not supported"):
        minsdxl.text2img(model, **KW, cross_attention_kwargs={"gligen": None})
    with pytest.raises(TypeError, match="a LoRA scale must be a number"):
        minsdxl.text2img(model, **KW, cross_attention_kwargs={"scale": "0.5"})


def test_lora_on_a_compiled_model(tiny_base):
    # weights change in place of the compiled graphs' inputs: no recompile, same output as eager
    import torch._dynamo

    kw = dict(prompt="a red circle", height=64, width=64, output_type="pt", progress=False, num_inference_steps=2)
    eager = minsdxl.load(tiny_base[1])
    lora = kohya_lora(eager, random_lora_pairs(lora_layers(eager)), alpha=2.0)
    model = minsdxl.compile(minsdxl.load(tiny_base[1]))
    torch._dynamo.reset()
    try:
        minsdxl.text2img(model, **kw, seed=0)  # compiles
        minsdxl.load_lora_weights(model, lora)
        minsdxl.load_lora_weights(eager, lora)
        with torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings():
            got = minsdxl.text2img(model, **kw, seed=0)
            got_scaled = minsdxl.text2img(model, **kw, seed=0, cross_attention_kwargs={"scale": 0.5})
        assert rel_err(got, minsdxl.text2img(eager, **kw, seed=0)) <= 1e-5  # inductor's fp32 reordering
        ref_scaled = minsdxl.text2img(eager, **kw, seed=0, cross_attention_kwargs={"scale": 0.5})
        assert rel_err(got_scaled, ref_scaled) <= 1e-5
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_kohya_names_at_sdxl_shapes_agree_with_diffusers_converter(kind):
    # the real SDXL topology (10-deep transformers, 3 levels; the refiner's 4 levels), names only: every
    # layer's kohya key, put through diffusers' own converter, names the layer minsdxl adapts
    from types import SimpleNamespace

    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    from minsdxl.cli import meta_sdxl
    from minsdxl.config import UNET_PRESETS
    from minsdxl.lora import _kohya_names, _layers, _split

    model = meta_sdxl(kind)
    one = torch.zeros(1)
    sd = kohya_lora(model, {(c, n): (one, one) for c, n, _ in lora_layers(model)}, alpha=1.0)
    ours = _kohya_names(model, _layers(model))
    config = SimpleNamespace(layers_per_block=UNET_PRESETS[kind].layers_per_block)
    flats = sorted({k.partition(".")[0] for k in sd})
    assert len(flats) == len(_layers(model)) == len({ours[f] for f in flats})  # one name per layer, all known
    wrong = {}
    for flat in flats:
        one_layer = _maybe_map_sgm_blocks_to_diffusers(
            {k: v for k, v in sd.items() if k.startswith(flat + ".")}, config
        )
        theirs = {_split(k)[:2] for k in _convert_non_diffusers_lora_to_diffusers(one_layer)[0]}
        if theirs != {ours[flat]}:
            wrong[flat] = (theirs.pop(), ours[flat])
    # except one diffusers bug: _maybe_map_sgm_blocks_to_diffusers reads slot 1 of an output block as
    # "attentions" also in a level without attention (the refiner's first), where sgm has the upsampler;
    # minsdxl follows the checkpoint table (held against from_single_file): up_blocks.0.upsamplers.0.conv
    assert list(wrong) == (["lora_unet_output_blocks_2_1_conv"] if kind == "refiner" else []), wrong
    assert all(
        t[1].endswith("attentions.2.conv") and m[1] == "up_blocks.0.upsamplers.0.conv" for t, m in wrong.values()
    )


def test_model_moved_to_another_dtype_after_loading(tiny_base):
    # originals stay as loaded (fp32); a re-merge and the unload write into the bf16 weights in place
    model = minsdxl.load(tiny_base[1])
    before = {k: v.clone() for k, v in _weights(model).items()}
    pairs = random_lora_pairs(lora_layers(model))
    minsdxl.load_lora_weights(model, kohya_lora(model, pairs, alpha=2.0))
    merged = {k: v.clone() for k, v in _weights(model).items()}
    model.to(dtype=torch.bfloat16)
    minsdxl.set_adapters(model, "default_0", 1.0)
    assert all(torch.equal(v, merged[k].to(torch.bfloat16)) for k, v in _weights(model).items())
    minsdxl.unload_lora_weights(model)
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, before[k].to(v.dtype)) for k, v in _weights(model).items())


def test_info_tells_which_sdxl_a_lora_fits(tmp_path, capsys):
    # `minsdxl info lora.safetensors`: format, layers / ranks / alphas per component, and whether it fits
    # the real SDXL base and refiner (names and shapes checked as load_lora_weights would, on meta models)
    from minsdxl.cli import main, meta_sdxl

    base = meta_sdxl("base")
    layers = lora_layers(base, only=lambda n: "attn" in n)
    path = tmp_path / "sdxl_lora.safetensors"
    safetensors.torch.save_file(kohya_lora(base, random_lora_pairs(layers, rank=1), alpha=0.5), path)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "LoRA, kohya (sgm UNet names) keys" in out and "SDXL base: fits" in out
    n = {c: sum(1 for cc, _, _ in layers if cc == c) for c in ("unet", "text_encoder", "text_encoder_2")}
    assert f"unet              {n['unet']:>3} layers, rank 1, 2, alpha 0.5" in out
    assert f"text_encoder_2    {n['text_encoder_2']:>3} layers" in out
    assert "SDXL refiner: does not fit" in out and "does not fit the refiner" in out
    small = tmp_path / "tiny_lora.safetensors"  # made for another model (the tiny one): fits no SDXL, exit 1
    tiny = minsdxl.load("tiny")
    safetensors.torch.save_file(kohya_lora(tiny, random_lora_pairs(lora_layers(tiny))), small)
    assert main(["info", str(small), "--json"]) == 1
    assert not any(m["fits"] for m in json.loads(capsys.readouterr().out)["models"].values())


def test_deleting_the_active_adapter_and_unloading_a_disabled_lora_match_diffusers(clean, tmp_path):
    pipe, model = clean
    layers = lora_layers(model)
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        safetensors.torch.save_file(
            kohya_lora(model, random_lora_pairs(layers, seed=seed), alpha=2.0), tmp_path / f"{name}.safetensors"
        )
    for name in ("b", "a"):  # "a" is active
        pipe.load_lora_weights(tmp_path / f"{name}.safetensors", adapter_name=name)
        minsdxl.load_lora_weights(model, tmp_path / f"{name}.safetensors", adapter_name=name)
    pipe.delete_adapters("a")  # PEFT: no active adapter left, so the first remaining one by name is
    with pytest.warns(UserWarning, match="'b' is active now"):
        minsdxl.delete_adapters(model, "a")
    assert minsdxl.get_active_adapters(model) == pipe.get_active_adapters() == ["b"]
    ref, got = _run(pipe, model)
    assert rel_err(got, ref) <= LATENT_TOL
    # disable, unload: the next LoRA is on again (diffusers' disabled flag went with the adapter layers)
    pipe.disable_lora()
    minsdxl.disable_lora(model)
    pipe.unload_lora_weights()
    minsdxl.unload_lora_weights(model)
    pipe.load_lora_weights(tmp_path / "c.safetensors", adapter_name="c")
    minsdxl.load_lora_weights(model, tmp_path / "c.safetensors", adapter_name="c")
    ref2, got2 = _run(pipe, model)
    assert rel_err(got2, ref2) <= LATENT_TOL and rel_err(ref2, ref) > 0.05


def test_refiner_lora_scale_reaches_the_text_encoder_it_shares(tiny_base, tiny_refiner):
    # a base LoRA on bigG, which a refiner loaded with share=base runs too: encode_prompt(lora_scale=) on the
    # refiner scales it there as diffusers' scale_lora_layers(self.text_encoder_2) does
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_base[1])
    ref_refiner = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_refiner[1])
    ref_refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        **{**ref_refiner.components, "text_encoder_2": pipe.text_encoder_2}
    )
    base = minsdxl.load(tiny_base[1])
    refiner = minsdxl.load(tiny_refiner[1], share=base)
    lora = kohya_lora(base, random_lora_pairs(lora_layers(base, only=lambda n: "mlp" in n)), alpha=2.0)
    lora = {k: v for k, v in lora.items() if k.startswith("lora_te2_")}
    pipe.load_lora_weights(lora.copy())
    minsdxl.load_lora_weights(base, lora)
    for scale in (None, 0.3):
        ref = ref_refiner.encode_prompt("a cat", negative_prompt="dog", lora_scale=scale)
        got = minsdxl.encode_prompt(refiner, "a cat", negative_prompt="dog", lora_scale=scale)
        assert all(rel_err(g, r) <= 1e-5 for g, r in zip(got, ref) if r is not None)
    full = minsdxl.encode_prompt(refiner, "a cat")[0]
    assert rel_err(minsdxl.encode_prompt(refiner, "a cat", lora_scale=0.3)[0], full) > 1e-3
