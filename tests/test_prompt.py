"""minsdxl.prompt.encode_prompt against diffusers' StableDiffusionXL(Img2Img)Pipeline.encode_prompt, and
SDXL textual inversion against diffusers' load_textual_inversion, fp32 on CPU: tiny SDXL pipelines and
real-shape CLIP-L + bigG encoders (random weights; transformers CLIPTokenizer and minsdxl's CLIPTokenizer
read from the same fixture folders)."""

import diffusers
import pytest
import safetensors.torch
import torch
import transformers
from sdxl_testing import (
    TINY_REFINER,
    TINY_UNET,
    TINY_VAE,
    diffusers_unet_config,
    diffusers_vae_config,
    hf_config,
    rel_err,
)
from test_text_encoder import TINY_G, TINY_L, TOL, fill_random_, hf_class
from tokenizer_fixtures import write_sdxl_tokenizers

import minsdxl
from minsdxl.checkpoint import SDXL
from minsdxl.config import TEXT_PRESETS
from minsdxl.prompt import encode_prompt, load_textual_inversion
from minsdxl.text_encoder import build_text_encoder
from minsdxl.tokenizer import CLIPTokenizer

OUTPUTS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


def assert_same(ours, ref):
    """The 4 outputs: both None, or same shape and dtype and max |diff| <= TOL * max |ref| (TOL: see
    test_text_encoder; embeddings are the encoders' outputs concatenated and repeated, nothing more)."""
    for name, a, b in zip(OUTPUTS, ours, ref):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape)
        if b.abs().max() == 0:
            assert torch.equal(a, b), name  # the zeroed negatives
        else:
            assert rel_err(a, b) <= TOL, (name, rel_err(a, b))


def both(pipe, model, **kwargs):
    ref = pipe.encode_prompt(device=torch.device("cpu"), **{"prompt": None, **kwargs})
    return encode_prompt(model, **kwargs), ref


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    return write_sdxl_tokenizers(tmp_path_factory.mktemp("tokenizers"))


def make_pair(kind, tok_dirs, cfg_l, cfg_g, seed=0, text_encoder_2=None):
    """(diffusers pipeline with transformers encoders and tokenizers, minsdxl SDXL) sharing the encoder
    tensors (assign=True). The encoders use SDXL's shipped eos_token_id=2 (argmax pooling). UNet and VAE
    are tiny: encode_prompt never runs them. `text_encoder_2`: an (hf, ours) bigG pair to reuse."""
    pairs = {}
    for name, cfg in (("text_encoder", cfg_l), ("text_encoder_2", cfg_g)):
        if cfg is None:
            continue
        if name == "text_encoder_2" and text_encoder_2 is not None:
            pairs[name] = text_encoder_2
            continue
        with torch.device("meta"):
            ref, ours = hf_class(cfg)(hf_config(cfg)), build_text_encoder(cfg)
        sd = {k: torch.empty(v.shape) for k, v in ref.state_dict().items()}
        fill_random_(sd, seed + len(pairs))
        ref.load_state_dict(sd, assign=True)
        body = ref.text_model if cfg.projection_dim else ref
        body.embeddings.position_ids = torch.arange(cfg.max_position_embeddings).expand(1, -1)  # left on meta
        ours.load_state_dict(sd, assign=True)
        pairs[name] = (ref.eval(), ours.eval())
    refiner = kind == "refiner"
    unet = diffusers.UNet2DConditionModel(**diffusers_unet_config(TINY_REFINER if refiner else TINY_UNET))
    common = dict(
        vae=diffusers.AutoencoderKL(**diffusers_vae_config(TINY_VAE)), unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(), text_encoder_2=pairs["text_encoder_2"][0],
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(tok_dirs[1]), add_watermarker=False,
    )  # fmt: skip
    model = SDXL(
        text_encoder_2=pairs["text_encoder_2"][1], tokenizer_2=CLIPTokenizer.from_folder(tok_dirs[1]),
        kind=kind, force_zeros_for_empty_prompt=not refiner, requires_aesthetics_score=refiner,
    )  # fmt: skip
    if refiner:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            text_encoder=None, tokenizer=None, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
            **common,
        )  # fmt: skip
        return pipe, model
    pipe = diffusers.StableDiffusionXLPipeline(
        text_encoder=pairs["text_encoder"][0], tokenizer=transformers.CLIPTokenizer.from_pretrained(tok_dirs[0]),
        **common,
    )  # fmt: skip
    model.text_encoder, model.tokenizer = pairs["text_encoder"][1], CLIPTokenizer.from_folder(tok_dirs[0])
    return pipe, model


# ------------------------------------------------------------------------------------------------
# tiny SDXL pipelines (tests/conftest.py), loaded by minsdxl.load from their saved diffusers folders


@pytest.fixture(scope="module")
def base(tiny_base):
    pipe, folder = tiny_base
    return pipe, minsdxl.load(folder)


@pytest.fixture(scope="module")
def refiner(tiny_refiner):
    pipe, folder = tiny_refiner
    return pipe, minsdxl.load(folder)


BASE_CASES = {
    "prompt": dict(prompt="a photo of an astronaut riding a horse on mars"),
    "prompt_2": dict(prompt="a cat", prompt_2="an oil painting, impasto"),
    "negative_empty_is_encoded": dict(prompt="a cat", negative_prompt=""),
    "negative_2": dict(prompt="a cat", negative_prompt="blurry", negative_prompt_2="low quality, jpeg artifacts"),
    "batch_3_x2": dict(
        prompt=["a cat", "a dog on the beach!", "Zebra"],
        prompt_2=["one", "two", "three"],
        negative_prompt=["ugly", "", "bad hands"],
        negative_prompt_2="watermark",
        num_images_per_prompt=2,
    ),  # fmt: skip
    "batch_str_negative": dict(prompt=["a cat", "a dog"], negative_prompt="ugly", num_images_per_prompt=3),
    "clip_skip_1": dict(prompt="a cat", negative_prompt="ugly", clip_skip=1),  # negatives ignore clip_skip
    "clip_skip_2": dict(prompt=["a cat", "a dog"], clip_skip=2),
    "clip_skip_0": dict(prompt="a cat", clip_skip=0),
    "no_cfg": dict(prompt="a cat", negative_prompt="ugly", do_classifier_free_guidance=False),
    "empty_prompt_2_falls_back": dict(prompt="a cat", prompt_2=""),  # diffusers' `prompt_2 or prompt`
    "bang_pads": dict(prompt="wow!!! a cat! !", negative_prompt="!"),  # "!" is tokenizer_2's pad, id 0
    "empty_prompt": dict(prompt=""),
}


@pytest.mark.parametrize("case", BASE_CASES)
def test_base_matches_diffusers(base, case):
    ours, ref = both(*base, **BASE_CASES[case])
    assert_same(ours, ref)
    assert ours[0].shape[-1] == 16 + 32  # tiny CLIP-L + tiny bigG widths side by side


REFINER_CASES = {
    "prompt": dict(prompt="a photo of a cat"),  # force_zeros_for_empty_prompt=False: "" is encoded
    "negative": dict(prompt="a cat", negative_prompt="blurry"),
    "batch_x2": dict(prompt=["a cat", "a dog"], negative_prompt=["x", "y"], num_images_per_prompt=2),
    "clip_skip_1": dict(prompt="a cat", clip_skip=1),
    "no_cfg": dict(prompt="a cat", do_classifier_free_guidance=False),
}


@pytest.mark.parametrize("case", REFINER_CASES)
def test_refiner_matches_diffusers(refiner, case):
    ours, ref = both(*refiner, **REFINER_CASES[case])
    assert_same(ours, ref)
    assert ours[0].shape[-1] == 32  # bigG only
    if "negative_prompt" not in REFINER_CASES[case] and ours[1] is not None:
        assert ours[1].abs().max() > 0  # the refiner encodes "" instead of zeroing


def test_precomputed_embeds_pass_through(base):
    pipe, model = base
    pe, _, pooled, _ = pipe.encode_prompt("a cat", device=torch.device("cpu"), do_classifier_free_guidance=False)
    kwargs = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, negative_prompt="ugly", num_images_per_prompt=2)
    assert_same(*both(pipe, model, **kwargs))
    kwargs = dict(prompt="a cat", negative_prompt_embeds=pe, negative_pooled_prompt_embeds=pooled)
    assert_same(*both(pipe, model, **kwargs))


def test_str_prompt_2_applies_to_every_prompt(base):
    """A str prompt_2 with a list prompt: diffusers fails in torch.concat (batch 1 vs 3); we broadcast it,
    as diffusers does for a str negative_prompt_2."""
    prompts = ["a cat", "a dog", "a bird"]
    ours = encode_prompt(base[1], prompts, prompt_2="oil painting")
    want = encode_prompt(base[1], prompts, prompt_2=["oil painting"] * 3)
    assert all(torch.equal(a, b) for a, b in zip(ours, want))


def test_long_prompt_is_truncated_with_a_warning(base):
    pipe, model = base
    prompt = " ".join(f"word{i}" for i in range(60))  # 2 tokens per word: well past 77
    full = pipe.tokenizer(prompt, return_tensors="pt").input_ids
    removed = pipe.tokenizer.batch_decode(full[:, 76:-1])  # diffusers' warning text
    with pytest.warns(UserWarning, match="truncated") as record:
        ours = encode_prompt(model, prompt)
    assert any(str(removed) in str(w.message) for w in record)
    assert_same(ours, pipe.encode_prompt(prompt, device=torch.device("cpu")))


def test_ignored_negative_prompt_2_warns(base):
    with pytest.warns(UserWarning, match="negative_prompt_2 is ignored"):
        ours = encode_prompt(base[1], "a cat", negative_prompt_2="blurry")
    assert ours[1].abs().max() == 0  # zeros, as diffusers


def _embeds(b=1, n=77, w=48):
    return torch.zeros(b, n, w), torch.zeros(b, 32)


ERRORS = {
    "prompt_not_str": (dict(prompt=5), TypeError, "`prompt` must be a str or a list"),
    "prompt_list_of_int": (dict(prompt=["a", 3]), TypeError, "`prompt` must be a str or a list"),
    "prompt_tuple": (dict(prompt=("a", "b")), TypeError, "`prompt`"),
    "prompt_empty_list": (dict(prompt=[]), ValueError, "empty list"),
    "no_prompt": (dict(), ValueError, "pass a `prompt`"),
    "negative_len": (dict(prompt=["a", "b"], negative_prompt=["x"]), ValueError, "`negative_prompt` has 1 prompts"),
    "negative_type": (dict(prompt="a", negative_prompt=3), TypeError, "`negative_prompt`"),
    "negative_2_len": (dict(prompt="a", negative_prompt="x", negative_prompt_2=["y", "z"]), ValueError, "has 2"),
    "prompt_2_len": (dict(prompt="a", prompt_2=["x", "y"]), ValueError, "`prompt_2` has 2 prompts"),
    "prompt_and_embeds": (dict(prompt="a", prompt_embeds=_embeds()[0]), ValueError, "not both"),
    "embeds_no_pooled": (dict(prompt_embeds=_embeds()[0]), ValueError, "pooled_prompt_embeds"),
    "neg_embeds_no_pooled": (dict(prompt="a", negative_prompt_embeds=_embeds()[0]), ValueError, "negative_pooled"),
    "neg_embeds_shape": (
        dict(
            prompt_embeds=_embeds()[0],
            pooled_prompt_embeds=_embeds()[1],
            negative_prompt_embeds=_embeds(2)[0],
            negative_pooled_prompt_embeds=_embeds(2)[1],
        ),
        ValueError,
        "same shape",
    ),  # fmt: skip
    "clip_skip_too_big": (dict(prompt="a", clip_skip=10), ValueError, "clip_skip"),  # tiny encoders: 10 layers
    "clip_skip_negative": (dict(prompt="a", clip_skip=-1), ValueError, "clip_skip"),
    "clip_skip_float": (dict(prompt="a", clip_skip=1.0), ValueError, "clip_skip"),
    "num_images_0": (dict(prompt="a", num_images_per_prompt=0), ValueError, "num_images_per_prompt"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_clear_errors_before_any_encoding(base, case, monkeypatch):
    kwargs, error, match = ERRORS[case]
    model = base[1]
    for enc in (model.text_encoder, model.text_encoder_2):
        monkeypatch.setattr(enc, "forward", lambda *a, **k: pytest.fail("encoded before checking the inputs"))
    with pytest.raises(error, match=match):
        encode_prompt(model, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(prompt="a", prompt_2="b"), dict(prompt="a", negative_prompt_2="b")])
def test_refiner_rejects_second_prompts(refiner, kwargs):
    with pytest.raises(ValueError, match="refiner has one text encoder"):
        encode_prompt(refiner[1], **kwargs)


def test_model_without_bigg_is_an_error(base):
    model = SDXL(text_encoder=base[1].text_encoder, tokenizer=base[1].tokenizer)
    with pytest.raises(ValueError, match="bigG"):
        encode_prompt(model, "a cat")


# ------------------------------------------------------------------------------------------------
# textual inversion


def _embedding(n, seed=0, widths=(TINY_L.hidden_size, TINY_G.hidden_size)):
    g = torch.Generator().manual_seed(seed)
    return {"clip_l": torch.randn(n, widths[0], generator=g), "clip_g": torch.randn(n, widths[1], generator=g)}


TI_CASES = [
    dict(prompt="a photo of <sks> on a beach", negative_prompt="<sks>, blurry"),
    dict(
        prompt=["<sks>", "plain", "<sks> and <sks>"],
        prompt_2=["a", "in the style of <sks>", "b"],
        num_images_per_prompt=2,
    ),
]


@pytest.mark.parametrize("n", [1, 3])
def test_textual_inversion_matches_diffusers(tok_dirs, tmp_path, n):
    pipe, model = make_pair("base", tok_dirs, TINY_L, TINY_G, seed=7)
    path = tmp_path / "emb.safetensors"
    safetensors.torch.save_file(_embedding(n), path)
    # diffusers' SDXL recipe: one call per encoder, with that encoder's tensor
    state = safetensors.torch.load_file(path)
    pipe.load_textual_inversion(state["clip_g"], token="<sks>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)  # fmt: skip
    pipe.load_textual_inversion(
        state["clip_l"], token="<sks>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    tokens = load_textual_inversion(model, path, "<sks>")
    assert tokens == ["<sks>"] + [f"<sks>_{i}" for i in range(1, n)]
    for tok, ref_tok, enc, ref_enc in (
        (model.tokenizer, pipe.tokenizer, model.text_encoder, pipe.text_encoder),
        (model.tokenizer_2, pipe.tokenizer_2, model.text_encoder_2, pipe.text_encoder_2),
    ):
        assert len(tok) == len(ref_tok) and [tok.encoder[t] for t in tokens] == ref_tok.convert_tokens_to_ids(tokens)
        assert torch.equal(enc.token_embedding.weight, ref_enc.get_input_embeddings().weight)
    for kwargs in TI_CASES:
        assert_same(*both(pipe, model, **kwargs))


def test_textual_inversion_refiner_matches_diffusers(tok_dirs, tmp_path):
    pipe, model = make_pair("refiner", tok_dirs, None, TINY_G, seed=8)
    path = tmp_path / "emb.safetensors"
    safetensors.torch.save_file(_embedding(2, seed=1), path)
    pipe.load_textual_inversion(safetensors.torch.load_file(path)["clip_g"], token="<sks>",
                                text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)  # fmt: skip
    load_textual_inversion(model, path, "<sks>")
    assert_same(*both(pipe, model, prompt="a <sks> cat", negative_prompt="<sks>"))


def test_textual_inversion_errors_leave_the_model_unchanged(tok_dirs, tmp_path):
    _, model = make_pair("base", tok_dirs, TINY_L, TINY_G, seed=9)
    load_textual_inversion(model, _embedding(2), "<sks>")
    before = [len(model.tokenizer), len(model.tokenizer_2), model.text_encoder.token_embedding.weight.clone(),
              model.text_encoder_2.token_embedding.weight.clone()]  # fmt: skip
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    bad = {
        "already loaded": (_embedding(1), "<sks>", "already in the tokenizer"),
        "loaded, other case": (_embedding(1), "<SKS>", "already in the tokenizer"),
        "a vocabulary word": (_embedding(1), "<|endoftext|>", "already in the tokenizer"),
        "a loaded vector's name": (_embedding(1), "<sks>_1", "already in the tokenizer"),
        "wrong width": (_embedding(1, widths=(TINY_G.hidden_size, TINY_G.hidden_size)), "<new>", "`clip_l` has shape"),
        "only clip_g": ({"clip_g": torch.zeros(1, TINY_G.hidden_size)}, "<new>", "no clip_l"),
        "sd15 file": ({"emb_params": torch.zeros(1, 768)}, "<new>", "no clip_l or clip_g"),
        "counts differ": (
            {"clip_l": torch.zeros(2, TINY_L.hidden_size), "clip_g": torch.zeros(3, TINY_G.hidden_size)},
            "<new>",
            "different numbers of vectors",
        ),  # fmt: skip
        "3-d tensor": (
            {"clip_l": torch.zeros(1, 1, TINY_L.hidden_size), "clip_g": torch.zeros(1, TINY_G.hidden_size)},
            "<new>",
            "`clip_l` has shape",
        ),  # fmt: skip
        "blank token": (_embedding(1), " ", "non-blank"),
        "not safetensors": (garbage, "<new>", "safetensors"),
    }
    for name, (emb, token, match) in bad.items():
        with pytest.raises(ValueError, match=match):
            load_textual_inversion(model, emb, token)
        after = [len(model.tokenizer), len(model.tokenizer_2), model.text_encoder.token_embedding.weight,
                 model.text_encoder_2.token_embedding.weight]  # fmt: skip
        assert after[:2] == before[:2] and all(torch.equal(a, b) for a, b in zip(after[2:], before[2:])), name


# ------------------------------------------------------------------------------------------------
# real-shape encoders (CLIP-L 123M + bigG 695M parameters; bigG is shared by base and refiner)


@pytest.fixture(scope="module")
def real(tok_dirs):
    base_pair = make_pair("base", tok_dirs, TEXT_PRESETS["clip_l"], TEXT_PRESETS["bigg"], seed=11)
    shared = (base_pair[0].text_encoder_2, base_pair[1].text_encoder_2)
    refiner_pair = make_pair("refiner", tok_dirs, None, TEXT_PRESETS["bigg"], text_encoder_2=shared)
    return base_pair, refiner_pair


REAL_CASES = {
    # few calls, many features each: every bigG sequence costs about a second per side
    "base_batch_3x2_prompt_2_negatives_clip_skip_1": (
        "base",
        dict(
            prompt=["a cat", "an astronaut riding a horse", "Zebra!"],
            prompt_2=["oil painting", "photo", "sketch"],
            negative_prompt=["ugly", "", "blurry"],
            negative_prompt_2="watermark",
            num_images_per_prompt=2,
            clip_skip=1,
        ),
    ),  # fmt: skip
    "base_zero_negative_clip_skip_2": ("base", dict(prompt="a photo of a cat", clip_skip=2)),
    "refiner": ("refiner", dict(prompt="a photo of a cat")),
}


@pytest.mark.parametrize("case", REAL_CASES)
def test_real_shapes_match_diffusers(real, case):
    kind, kwargs = REAL_CASES[case]
    pipe, model = real[0] if kind == "base" else real[1]
    ours, ref = both(pipe, model, **kwargs)
    assert_same(ours, ref)
    assert ours[0].shape[-1] == (2048 if kind == "base" else 1280) and ours[2].shape[-1] == 1280
