"""A1111's prompt editing with prompt_weighting: "[from:to:when]", "[to:when]", "[from::when]", alternation
"[a|b]". The schedules are checked against the examples A1111 documents in its own parser's doctests
(modules/prompt_parser.py, get_learned_conditioning_prompt_schedules, 10 steps); the sampling against
diffusers' pipeline given the same per-step embeddings through its step callback (the texts encoded by
encode_prompt, itself checked in test_prompt_weighting.py)."""

import warnings

import pytest
import torch
from sdxl_testing import rel_err

import minsdxl
from minsdxl.prompt import hires_prompt, prompt_schedule, schedules

# A1111's doctest examples: prompt -> its schedule over 10 steps
A1111_EXAMPLES = {
    "test": [(10, "test")],
    "a [b:3]": [(3, "a "), (10, "a b")],
    "a [b: 3]": [(3, "a "), (10, "a b")],
    "a [[[b]]:2]": [(2, "a "), (10, "a [[b]]")],
    "[(a:2):3]": [(3, ""), (10, "(a:2)")],
    "a [b : c : 1] d": [(1, "a b  d"), (10, "a  c  d")],
    "a[b:[c:d:2]:1]e": [(1, "abe"), (2, "ace"), (10, "ade")],
    "a [unbalanced": [(10, "a [unbalanced")],
    "a [b:.5] c": [(5, "a  c"), (10, "a b c")],
    "((a][:b:c [d:3]": [(3, "((a][:b:c "), (10, "((a][:b:c d")],
    "[a|(b:1.1)]": [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)],
    "[fe|]male": [(i, "female" if i % 2 else "male") for i in range(1, 11)],
    "[fe|||]male": [(i, "female" if i % 4 == 1 else "male") for i in range(1, 11)],
}
# Left out: A1111's "a [{b|d{:.5] c", which its doctest marks "not handling this right now" (its lark parse
# takes "{b|d{" as the scheduled text although its grammar's plain text excludes "|"); here a "|" outside an
# alternation fails the parse as the grammar says, and the prompt is taken as it is.


@pytest.mark.parametrize("prompt", A1111_EXAMPLES)
def test_schedules_are_a1111s(prompt):
    assert prompt_schedule(prompt, 10) == A1111_EXAMPLES[prompt]


def test_a_hires_pass_counts_after_the_first_as_a1111():
    """A1111's doctests with hires_steps (10 first-pass steps, 10 hires steps): "0.5" ends in the first pass,
    "1.5" halfway through the hires pass; hires_prompt rewrites them to the hires pass's own step numbers."""
    assert prompt_schedule(hires_prompt("a [b:.5] c", 10, 10), 10) == [(10, "a b c")]
    assert prompt_schedule(hires_prompt("a [b:1.5] c", 10, 10), 10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedule(hires_prompt("[x:y:14] [u|v]", 10, 6), 6)[:2] == [(1, "x u"), (2, "x v")]
    assert prompt_schedule(hires_prompt("[x:y:14]", 10, 6), 6) == [(4, "x"), (6, "y")]  # step 14 = hires step 4


def test_command_line_hires_pass_takes_the_edited_prompt(tmp_path):
    """--hires-scale with A1111 prompt editing: "[red:blue:0.5]" ends in the first pass, so the hires pass
    runs "blue" throughout (A1111's offsets), the same image as an img2img of the plain text."""
    import numpy as np
    import PIL.Image

    from minsdxl.cli import main, read_png_metadata

    out = tmp_path / "h.png"
    argv = ["-p", "a [red:blue:0.5] circle", "--prompt-weighting", "a1111", "--steps", "2", "-W", "64", "-H", "64"]
    argv += ["-s", "5", "-q", "--no-watermark", "--hires-scale", "1.5", "--hires-upscaler", "Lanczos"]
    assert main([*argv, "--hires-steps", "2", "--hires-strength", "0.5", "-o", str(out)]) == 0
    model = minsdxl.load("tiny")
    kw = dict(seed=5, prompt_weighting="a1111", progress=False)
    first = minsdxl.text2img(model, "a [red:blue:0.5] circle", num_inference_steps=2, width=64, height=64, **kw)[0]
    big = first.resize((96, 96), PIL.Image.LANCZOS)
    made = minsdxl.img2img(model, "a blue circle", image=big, strength=0.5, num_inference_steps=4, **kw)[0]
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(made))
    assert (
        read_png_metadata(out)["minsdxl"]["calls"][1]["kwargs"]["prompt"] == "a [red:blue:-1] circle"
    )  # (0.5 - 1) x 2 hires steps


def test_malformed_and_deep_prompts_are_text():
    for prompt in ("a | b [c:d:2]", "[a:b]", "a [b:c:x]", "trailing \\", "[" * 5000 + "a", "(" * 5000):
        assert prompt_schedule(prompt, 10) == [(10, prompt)]  # (5000 levels: deeper than Python's stack)


def test_several_prompts_merge_their_steps():
    got = schedules({"prompt": "a [red:blue:0.5] box", "negative_prompt": "[dark|dull]", "prompt_2": None}, 4)
    assert got == [
        (1, {"prompt": "a red box", "negative_prompt": "dark"}),
        (2, {"prompt": "a red box", "negative_prompt": "dull"}),
        (3, {"prompt": "a blue box", "negative_prompt": "dark"}),
        (4, {"prompt": "a blue box", "negative_prompt": "dull"}),
    ]
    assert schedules({"prompt": ["a [b:c:2]", "plain"]}, 4) == [
        (2, {"prompt": ["a b", "plain"]}),
        (4, {"prompt": ["a c", "plain"]}),
    ]
    assert schedules({"prompt": "no editing (here:1.2)"}, 4) is None
    assert schedules({"prompt": ["a [b:c:2]", 3]}, 4) is None  # not texts: encode_prompt's type error says so
    assert schedules({"prompt": "a [red:blue:0]"}, 4) == [(4, {"prompt": "a blue"})]  # one entry, edited all along


def test_encode_prompt_says_it_takes_edited_text_as_written():
    model = minsdxl.load("tiny")
    with pytest.warns(UserWarning, match="encodes the text as written"):
        minsdxl.encode_prompt(model, "a [red:blue:0.5] box", prompt_weighting="a1111")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plain weighting syntax: no warning
        minsdxl.encode_prompt(model, "a (red:1.2) [box]", negative_prompt="[dark]", prompt_weighting="a1111")


@pytest.fixture(scope="module")
def models(tiny_base):
    pipe = tiny_base[0]
    pipe.set_progress_bar_config(disable=True)
    return pipe, minsdxl.load(tiny_base[1])


def _reference(pipe, model, schedule, steps, seed, negative=None):
    """diffusers' pipeline with embeddings swapped by its step callback: the callback after step i sets what
    step i + 1 uses, which is the entry of the first last-step >= i + 1."""
    enc = {}
    for _, text in schedule:
        if text not in enc:
            enc[text] = minsdxl.encode_prompt(model, text, negative_prompt=negative, prompt_weighting="a1111")
    rows = lambda e: (torch.cat([e[1], e[0]]), torch.cat([e[3], e[2]]))  # noqa: E731 (CFG: negative first)

    def at(i):
        return enc[next(text for end, text in schedule if i <= end)]

    def swap(p, i, t, kw):
        embeds, pooled = rows(at(i + 1)) if i + 1 < steps else (kw["prompt_embeds"], kw["add_text_embeds"])
        return {"prompt_embeds": embeds, "add_text_embeds": pooled}

    pe, npe, ppe, nppe = at(0)
    return pipe(
        prompt_embeds=pe,
        negative_prompt_embeds=npe,
        pooled_prompt_embeds=ppe,
        negative_pooled_prompt_embeds=nppe,
        num_inference_steps=steps,
        height=64,
        width=64,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        callback_on_step_end=swap,
        callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds"],
    ).images


@pytest.mark.parametrize(
    "prompt", ["a [red:blue:0.5] circle", "a [red|blue|green] circle", "a [(red:1.3):blue:2] [circle::3]"]
)
def test_text2img_swaps_the_prompt_as_a1111(models, prompt):
    pipe, model = models
    steps = 5
    kw = dict(num_inference_steps=steps, height=64, width=64, guidance_scale=5.0, output_type="latent")
    got = minsdxl.text2img(model, prompt, **kw, seed=3, prompt_weighting="a1111", progress=False)
    expected = _reference(pipe, model, prompt_schedule(prompt, steps), steps, seed=3)
    assert rel_err(got, expected) <= 1e-4
    first = prompt_schedule(prompt, steps)[0][1]
    fixed = minsdxl.text2img(model, first, **kw, seed=3, prompt_weighting="a1111", progress=False)
    assert rel_err(got, fixed) > 1e-3  # the later texts took part


def test_the_negative_prompt_is_edited_too_and_without_weighting_brackets_are_text(models):
    _, model = models
    kw = dict(num_inference_steps=4, height=64, width=64, output_type="latent", progress=False, seed=1)
    seen = []
    spy = lambda p, i, t, k: seen.append(k["prompt_embeds"][0].clone()) or {}  # noqa: E731 (row 0: the negative)
    minsdxl.text2img(model, "a circle", negative_prompt="[dark|dull]", prompt_weighting="a1111", **kw,
                     callback_on_step_end=spy, callback_on_step_end_tensor_inputs=["prompt_embeds"])  # fmt: skip
    dark = minsdxl.encode_prompt(model, "a circle", negative_prompt="dark", prompt_weighting="a1111")[1][0]
    dull = minsdxl.encode_prompt(model, "a circle", negative_prompt="dull", prompt_weighting="a1111")[1][0]
    # the callback after step i sees step i's embeddings: steps 0, 1 dark, 2 dull, 3 dark
    assert [torch.equal(e, dark) for e in seen] == [True, True, False, True] and torch.equal(seen[2], dull)
    # without prompt_weighting the brackets are text, as in diffusers: one prompt for every step
    rows = []
    keep = lambda p, i, t, k: rows.append(k["prompt_embeds"][1].clone()) or {}  # noqa: E731 (row 1: the prompt)
    minsdxl.text2img(model, "a [red:blue:0.5] circle", **kw, callback_on_step_end=keep,
                     callback_on_step_end_tensor_inputs=["prompt_embeds"])  # fmt: skip
    literal = minsdxl.encode_prompt(model, "a [red:blue:0.5] circle")[0][0]
    assert len(rows) == 4 and all(torch.equal(r, literal) for r in rows)


def test_the_cfg_cutoff_cuts_the_schedule_too(models):
    _, model = models
    steps, seen = 4, []

    def cutoff(pipe, i, t, kw):  # diffusers' SDXLCFGCutoffCallback at step 1: guidance ends, rows are cut
        seen.append(kw["prompt_embeds"].shape[0])
        if i == 1:
            pipe._guidance_scale = 0.0
        return {}

    kw = dict(num_inference_steps=steps, height=64, width=64, output_type="latent", progress=False, seed=2)
    out = minsdxl.text2img(
        model,
        "a [red:blue:0.5] circle",
        prompt_weighting="a1111",
        **kw,
        callback_on_step_end=cutoff,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    )
    assert seen == [2, 2, 1, 1] and out.isfinite().all()  # the blue entry (from step 3) was cut as well
