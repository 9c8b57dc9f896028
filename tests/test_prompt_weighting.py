"""A1111 prompt weighting (encode_prompt(..., prompt_weighting="a1111")): the parser against the examples
A1111 documents for its parse_prompt_attention, the 75-token windows against A1111's cutting rules, and
the embeddings against the A1111 recipe computed here on diffusers' own tokenizers and transformers text
encoders (tiny SDXL, random weights). diffusers has no prompt weighting: the last check is that
diffusers' pipeline, given our long weighted embeddings as prompt_embeds, samples what minsdxl samples."""

import pytest
import torch
from sdxl_testing import rel_err
from test_text_encoder import TOL

import minsdxl
from minsdxl.prompt import CHUNK, parse_prompt_attention, weighted_chunks

# ------------------------------------------------------------------------------------------------
# the parser: A1111's documented examples (modules/prompt_parser.py, parse_prompt_attention's docstring)

A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.1 * 1.1 * 1.3),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.1**4),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize("text,expected", A1111_EXAMPLES, ids=[t for t, _ in A1111_EXAMPLES])
def test_parser_gives_a1111s_documented_results(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_parser_rules_beyond_the_examples():
    assert parse_prompt_attention("(a : 1.5 ) b") == [("a ", 1.5), (" b", 1.0)]  # spaces after ":" and before ")"
    assert parse_prompt_attention("[a]") == [("a", pytest.approx(1 / 1.1))]
    assert parse_prompt_attention("a:1.2) b") == [("a:1.2) b", 1.0)]  # nothing open: all literal
    assert parse_prompt_attention("") == [("", 1.0)]
    assert parse_prompt_attention("a BREAK b") == [("a", 1.0), (None, 1.0), ("b", 1.0)]
    assert parse_prompt_attention("aBREAK b") == [("aBREAK b", 1.0)]  # a word, not a BREAK
    with pytest.raises(ValueError, match=r"prompt weight '1\.2\.3' .* is not a number"):
        parse_prompt_attention("(a:1.2.3)")


# ------------------------------------------------------------------------------------------------
# windows: A1111's tokenize_line (75 tokens each, cut at a comma <= 20 tokens back, BREAK, empty prompt)


@pytest.fixture(scope="module")
def models(tiny_base):
    pipe, folder = tiny_base
    return pipe, minsdxl.load(folder)


def lengths(prompt, tokenizer):
    return [len(ids) for ids, _ in weighted_chunks(prompt, tokenizer)]


def test_windows_follow_a1111s_cuts(models):
    tok = models[1].tokenizer
    assert len(tok.encode("cat")) == 3 and len(tok.encode("cat ,")) == 4  # one token a word, one a comma
    assert lengths("cat " * 100, tok) == [75, 25]
    assert lengths("cat " * 150, tok) == [75, 75]
    assert lengths("cat " * 151, tok) == [75, 75, 1]
    # a comma 15 tokens before the window is full: the window ends at the comma, the 15 move on
    assert lengths("cat " * 59 + ", " + "cat " * 40, tok) == [60, 40]
    # 25 tokens back is too far: the window is cut at 75
    assert lengths("cat " * 49 + ", " + "cat " * 40, tok) == [75, 15]
    assert lengths("cat BREAK cat cat", tok) == [1, 2]
    assert lengths("BREAK cat", tok) == [0, 1]
    assert lengths("", tok) == [0]
    ids, weights = weighted_chunks("a (cat:1.5) [dog]", tok)[0]
    assert ids == tok.encode("a cat dog")[1:-1]
    assert weights == pytest.approx([1.0, 1.5, 1 / 1.1])


# ------------------------------------------------------------------------------------------------
# embeddings against the A1111 recipe on diffusers' tokenizers and transformers encoders


def a1111_reference(pipe, fragments, windows, clip_skip=None):
    """The A1111 recipe written out for [(text, weight)] fragments with transformers' CLIP: each fragment
    tokenized alone; windows = lists of token positions (the cuts); each window [BOS] + ids + [EOS] +
    pads; hidden states scaled by the weights, then by old mean / new mean per window; the windows side by
    side; pooled from the first window."""
    hidden, pooled = [], None
    for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids, weights = [], []
        for text, w in fragments:
            t = tok(text, add_special_tokens=False).input_ids
            ids, weights = ids + t, weights + [w] * len(t)
        rows, mults = [], []
        for cut in windows:
            row = [tok.bos_token_id, *[ids[i] for i in cut], tok.eos_token_id]
            rows.append(row + [tok.pad_token_id] * (CHUNK + 2 - len(row)))
            mults.append([1.0, *[weights[i] for i in cut]] + [1.0] * (CHUNK + 1 - len(cut)))
        out = enc(torch.tensor(rows), output_hidden_states=True)
        z = out.hidden_states[-2 if clip_skip is None else -(clip_skip + 2)]
        m = torch.tensor(mults)[..., None]
        mean = z.mean(dim=(1, 2), keepdim=True)
        z = z * m
        z = z * (mean / z.mean(dim=(1, 2), keepdim=True))
        hidden.append(z.reshape(1, -1, z.shape[-1]))
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds[:1]
    return torch.cat(hidden, dim=-1), pooled


def token_count(pipe, text):
    return len(pipe.tokenizer(text, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_weighted_embeddings_match_the_a1111_recipe(models, clip_skip):
    pipe, model = models
    fragments = [("a photo of a ", 1.0), ("red", 1.5), (" cat on a ", 1.0), ("blue", 1 / 1.1), (" sofa", 1.0)]
    prompt = "a photo of a (red:1.5) cat on a [blue] sofa"
    n = sum(token_count(pipe, t) for t, _ in fragments)
    embeds, _, pooled, _ = minsdxl.encode_prompt(
        model, prompt, do_classifier_free_guidance=False, clip_skip=clip_skip, prompt_weighting="a1111"
    )
    ref, ref_pooled = a1111_reference(pipe, fragments, [range(n)], clip_skip)
    assert embeds.shape == ref.shape == (1, 77, ref.shape[-1])
    assert rel_err(embeds, ref) <= TOL and rel_err(pooled, ref_pooled) <= TOL
    plain = minsdxl.encode_prompt(model, "a photo of a red cat on a blue sofa", do_classifier_free_guidance=False)
    assert rel_err(embeds, plain[0]) > 1e-3  # the weights change the embeddings


def test_no_norm_emphasis_leaves_out_the_rescaling(models):
    """A1111's "No norm": the hidden states times the weights, nothing more."""
    pipe, model = models
    fragments = [("a ", 1.0), ("red", 1.5), (" cat", 1.0)]
    embeds = minsdxl.encode_prompt(model, "a (red:1.5) cat", do_classifier_free_guidance=False,
                                   prompt_weighting="a1111_no_norm")[0]  # fmt: skip
    plain = minsdxl.encode_prompt(model, "a red cat", do_classifier_free_guidance=False)[0]
    n = sum(token_count(pipe, t) for t, _ in fragments)
    weights = torch.ones(77)
    weights[1 + token_count(pipe, "a ")] = 1.5  # BOS, "a", then "red"
    assert n == 3 and rel_err(embeds, plain * weights[None, :, None]) <= TOL


def test_long_prompts_take_several_windows(models):
    pipe, model = models
    long = "a cat sitting on a red sofa in a sunny room " * 11  # 11 * 11 = 121 tokens
    n = token_count(pipe, long)
    assert n == 121
    embeds, negative, pooled, negative_pooled = minsdxl.encode_prompt(
        model, long, negative_prompt="blurry", prompt_weighting="a1111"
    )
    ref, ref_pooled = a1111_reference(pipe, [(long, 1.0)], [range(75), range(75, n)])
    assert embeds.shape[1] == 154 and rel_err(embeds, ref) <= TOL and rel_err(pooled, ref_pooled) <= TOL
    # the negative gets as many windows: "blurry", then an empty one (A1111's pad_cond_uncond)
    ref_neg, ref_neg_pooled = a1111_reference(pipe, [("blurry", 1.0)], [range(1), range(0)])
    assert negative.shape == embeds.shape and rel_err(negative, ref_neg) <= TOL
    assert rel_err(negative_pooled, ref_neg_pooled) <= TOL
    # and without weighting the prompt is cut to 77 tokens, as diffusers does
    with pytest.warns(UserWarning, match="truncated"):
        assert minsdxl.encode_prompt(model, long)[0].shape[1] == 77


def test_a_long_negative_lengthens_the_prompt(models):
    _, model = models
    long = "ugly, blurry, " * 30
    embeds, negative, _, _ = minsdxl.encode_prompt(model, "a cat", negative_prompt=long, prompt_weighting="a1111")
    assert embeds.shape[1] == negative.shape[1] == 77 * len(weighted_chunks(long, model.tokenizer)) > 77
    zeros = minsdxl.encode_prompt(model, "a cat " * 40, prompt_weighting="a1111")[1]  # force_zeros negatives
    assert zeros.shape[1] == 154 and not zeros.any()


BASE_CASES = {
    "prompt": dict(prompt="a photo of an astronaut riding a horse on mars", negative_prompt="blurry"),
    "prompt_2": dict(prompt="a cat", prompt_2="oil painting, impasto", negative_prompt="", negative_prompt_2="bad"),
    "batch_x2": dict(prompt=["a cat", "a dog on the beach!"], negative_prompt=["ugly", ""], num_images_per_prompt=2),
    "clip_skip": dict(prompt="a cat", negative_prompt="ugly", clip_skip=1),
    "bang_pads": dict(prompt="wow!!! a cat! !", negative_prompt="!"),
    "empty_prompt": dict(prompt=""),
}


@pytest.mark.parametrize("case", list(BASE_CASES))
def test_plain_short_prompts_are_unchanged_bit_for_bit(models, case):
    """No syntax and <= 75 tokens: weighting changes nothing (so diffusers' values, tests/test_prompt.py)."""
    _, model = models
    plain = minsdxl.encode_prompt(model, **BASE_CASES[case])
    weighted = minsdxl.encode_prompt(model, **BASE_CASES[case], prompt_weighting="a1111")
    for a, b in zip(plain, weighted):
        assert torch.equal(a, b)


def test_refiner_has_one_encoder(tiny_refiner):
    pipe, folder = tiny_refiner
    model = minsdxl.load(folder)
    plain = minsdxl.encode_prompt(model, "a cat", negative_prompt="ugly")
    weighted = minsdxl.encode_prompt(model, "a cat", negative_prompt="ugly", prompt_weighting="a1111")
    assert all(torch.equal(a, b) for a, b in zip(plain, weighted))
    long = minsdxl.encode_prompt(model, "a (cat:1.2) " * 40, prompt_weighting="a1111")
    assert long[0].shape == long[1].shape == (1, 154, plain[0].shape[2])  # bigG's width alone


def test_errors_name_the_problem(models):
    _, model = models
    with pytest.raises(ValueError, match="prompt_weighting must be None, 'a1111' .* or 'a1111_no_norm'"):
        minsdxl.encode_prompt(model, "a cat", prompt_weighting="compel")
    embeds, _, pooled, _ = minsdxl.encode_prompt(model, "a cat", prompt_weighting="a1111")
    with pytest.raises(ValueError, match="needs 2 windows of 77 tokens .* pass `negative_prompt_embeds`"):
        minsdxl.encode_prompt(
            model,
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            negative_prompt="bad " * 80,
            prompt_weighting="a1111",
        )


# ------------------------------------------------------------------------------------------------
# sampling with long weighted embeddings: diffusers' pipeline given them as prompt_embeds


def test_text2img_with_weighted_long_prompts_matches_diffusers_given_the_embeddings(models):
    pipe, model = models
    kw = dict(
        prompt="a (cat:1.3) on a [red] sofa, " * 12,
        negative_prompt="(blurry:1.2), ugly",
        num_inference_steps=3,
        guidance_scale=6.0,
        height=64,
        width=64,
    )
    ours = minsdxl.text2img(model, **kw, prompt_weighting="a1111", seed=4, output_type="latent", progress=False)
    embeds = minsdxl.encode_prompt(model, kw.pop("prompt"), negative_prompt=kw.pop("negative_prompt"),
                                   prompt_weighting="a1111")  # fmt: skip
    assert embeds[0].shape[1] == 154
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    ref = pipe(**kw, **dict(zip(names, embeds)), generator=torch.Generator().manual_seed(4), output_type="latent")
    assert rel_err(ours, ref.images) <= 1e-4
