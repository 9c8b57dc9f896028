"""Prompts to SDXL conditioning: `encode_prompt` (= diffusers StableDiffusionXLPipeline.encode_prompt)
and SDXL textual-inversion embeddings (`load_textual_inversion`: one tensor per text encoder).

The base conditions on both encoders: CLIP-L's and bigG's penultimate hidden states side by side
(768 + 1280 = 2048 wide) and bigG's pooled, projected output (1280). The refiner has no CLIP-L: its
embeddings are bigG's alone (1280 wide). Everything here works on a minsdxl.checkpoint.SDXL `model`.
"""

import re
import warnings

import torch

from . import lora
from .checkpoint import require_model

# ------------------------------------------------------------------------------------------------
# checks (all before any tokenizing or encoding)


def _prompt_list(name: str, value, batch: int | None = None) -> list[str] | None:
    """None, a str or a list of str -> None or a list; a list must have `batch` entries when given."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value] if batch is None else [value] * batch
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        kind = type(value).__name__ if not isinstance(value, list) else "a list holding non-strings"
        raise TypeError(f"`{name}` must be a str or a list of str, got {kind}")
    if not value:
        raise ValueError(f"`{name}` is an empty list: pass at least one prompt")
    if batch is not None and len(value) != batch:
        raise ValueError(
            f"`{name}` has {len(value)} prompts but `prompt` has {batch}: pass one per prompt, or a single str for all"
        )
    return value


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_embeds(positive: tuple, negative: tuple):
    prompt, prompt_2, prompt_embeds, pooled = positive
    negative_prompt, negative_prompt_2, negative_embeds, negative_pooled = negative
    # = the prompt checks of diffusers' StableDiffusionXLPipeline.check_inputs
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("pass either `prompt` or `prompt_embeds`, not both")
    if prompt_2 is not None and prompt_embeds is not None:
        raise ValueError("pass either `prompt_2` or `prompt_embeds`, not both")
    if prompt is None and prompt_embeds is None:
        raise ValueError("pass a `prompt` (or precomputed `prompt_embeds` with `pooled_prompt_embeds`)")
    if prompt_embeds is not None and pooled is None:
        raise ValueError("`prompt_embeds` were given without `pooled_prompt_embeds`: pass both (from the same encoder)")
    for name, t, ndim in (
        ("prompt_embeds", prompt_embeds, 3),
        ("pooled_prompt_embeds", pooled, 2),
        ("negative_prompt_embeds", negative_embeds, 3),
        ("negative_pooled_prompt_embeds", negative_pooled, 2),
    ):
        if t is not None and not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim == ndim):
            form = "[batch, tokens, width]" if ndim == 3 else "[batch, width]"
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"`{name}` must be a floating-point torch.Tensor {form} (as encode_prompt returns), got {got}"
            )
    for embeds, pooled_ in ((prompt_embeds, pooled), (negative_embeds, negative_pooled)):
        if embeds is not None and pooled_ is not None and len(embeds) != len(pooled_):
            raise ValueError(f"prompt embeddings for {len(embeds)} prompts but pooled ones for {len(pooled_)}")
    if negative_embeds is not None:
        if negative_prompt is not None or negative_prompt_2 is not None:
            raise ValueError("pass either `negative_prompt(_2)` or `negative_prompt_embeds`, not both")
        if negative_pooled is None:
            raise ValueError("`negative_prompt_embeds` were given without `negative_pooled_prompt_embeds`: pass both")
        if prompt_embeds is not None and negative_embeds.shape != prompt_embeds.shape:
            raise ValueError(
                f"`negative_prompt_embeds` {tuple(negative_embeds.shape)} and `prompt_embeds` "
                f"{tuple(prompt_embeds.shape)} must have the same shape"
            )


def _encoders(model):
    """[(tokenizer, encoder)] in diffusers' order: [CLIP-L, bigG], or [bigG] for the refiner."""
    require_model(model, "encode_prompt")
    if model.text_encoder_2 is None or model.tokenizer_2 is None:
        raise ValueError("this model has no bigG text encoder/tokenizer_2: SDXL base and refiner both need one")
    if model.text_encoder is None:
        return [(model.tokenizer_2, model.text_encoder_2)]
    if model.tokenizer is None:
        raise ValueError("the model has a CLIP-L text_encoder but no tokenizer for it")
    return [(model.tokenizer, model.text_encoder), (model.tokenizer_2, model.text_encoder_2)]


# ------------------------------------------------------------------------------------------------
# encoding


def _added_tokens(tokenizer) -> set[str]:
    return {t for t, i in tokenizer.encoder.items() if i >= tokenizer.vocab_size}


def expand_textual_inversion(prompt: str, tokenizer) -> str:
    """A multi-vector textual-inversion token "<t>" -> "<t> <t>_1 <t>_2 ..." in the prompt text.
    = diffusers TextualInversionLoaderMixin._maybe_convert_prompt, quirks included: a token is looked
    up by its *tokenized* (lowercased) spelling, so a token added as "<Cat>" is never expanded, and
    the replacement is a plain substring replace."""
    added = _added_tokens(tokenizer)
    if not added:
        return prompt
    for token in set(tokenizer.tokenize(prompt)):
        if token in added:
            replacement, i = token, 1
            while f"{token}_{i}" in added:
                replacement += f" {token}_{i}"
                i += 1
            prompt = prompt.replace(token, replacement)
    return prompt


# ------------------------------------------------------------------------------------------------
# A1111 prompt weighting: "(word:1.3)", "(word)", "[word]", "BREAK" and prompts of any length. The rules
# are AUTOMATIC1111 webui's (modules/prompt_parser.py parse_prompt_attention, sd_hijack_clip.py), its
# default "Original" emphasis and comma_padding_backtrack 20; diffusers itself has no prompt weighting

# escaped \( \) \[ \] \\, a lone \, ( [, ":weight)", ) ], text, a lone ":"
_ATTENTION = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
CHUNK = 75  # prompt tokens per 77-token CLIP window (BOS + 75 + EOS)
COMMA_BACKTRACK = 20  # a full window ending at most this many tokens after a comma is cut after it


def parse_prompt_attention(text: str) -> list[tuple[str | None, float]]:
    """A1111's prompt syntax -> [(text, weight)], runs of one weight merged, None for a BREAK:
    "(x)" multiplies x's weight by 1.1, "[x]" divides it by 1.1, "(x:1.3)" multiplies it by 1.3 (nesting
    multiplies), "\\(" etc. are literal brackets; unclosed brackets still apply (to the end)."""
    out: list[list] = []
    rounds, squares = [], []

    def scale(start, factor):
        for part in out[start:]:
            part[1] *= factor

    for m in _ATTENTION.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            out.append([tok[1:], 1.0])
        elif tok in "([":
            (rounds if tok == "(" else squares).append(len(out))
        elif weight is not None and rounds:
            try:
                scale(rounds.pop(), float(weight))
            except ValueError:
                raise ValueError(
                    f"prompt weight {weight!r} in {text!r} is not a number: write e.g. (word:1.2)"
                ) from None
        elif tok == ")" and rounds:
            scale(rounds.pop(), 1.1)
        elif tok == "]" and squares:
            scale(squares.pop(), 1 / 1.1)
        else:  # text, or a bracket / ":w)" with nothing open: literal
            for i, part in enumerate(_BREAK.split(tok)):
                if i:
                    out.append([None, 1.0])
                out.append([part, 1.0])
    for start in rounds:
        scale(start, 1.1)
    for start in squares:
        scale(start, 1 / 1.1)
    merged: list[list] = []
    for part in out or [["", 1.0]]:
        if merged and part[0] is not None and merged[-1][0] is not None and merged[-1][1] == part[1]:
            merged[-1][0] += part[0]  # merged before tokenizing, as A1111 does: "(x)" tokenizes with its neighbours
        else:
            merged.append(part)
    return [(t, w) for t, w in merged]


def weighted_chunks(prompt: str, tokenizer) -> list[tuple[list[int], list[float]]]:
    """A prompt -> its 75-token windows [(ids, weights)], as A1111's tokenize_line cuts them: a window is
    closed when full (at its last comma when that is at most 20 tokens back, the rest moving on) or at a
    BREAK; an empty prompt is one empty window."""
    chunks, ids, weights, comma = [], [], [], -1
    comma_id = tokenizer.encoder.get(",</w>")

    def close():
        nonlocal ids, weights, comma
        chunks.append((ids, weights))
        ids, weights, comma = [], [], -1

    for text, w in parse_prompt_attention(expand_textual_inversion(prompt, tokenizer)):
        if text is None:
            close()
            continue
        for token in tokenizer.encode(text)[1:-1]:
            if token == comma_id:
                comma = len(ids)
            elif len(ids) == CHUNK and comma != -1 and len(ids) - comma <= COMMA_BACKTRACK:
                rest = ids[comma + 1 :], weights[comma + 1 :]
                ids, weights = ids[: comma + 1], weights[: comma + 1]
                close()
                ids, weights = rest
            if len(ids) == CHUNK:
                close()
            ids.append(token)
            weights.append(w)
    if ids or not chunks:
        close()
    return chunks


def _windows(chunks, count, tokenizer):
    """[(ids, weights)] -> ids [count, 77] (BOS, ids, EOS, pads; missing windows empty) and weights [count, 77]."""
    chunks = chunks + [([], [])] * (count - len(chunks))
    ids = torch.full((count, CHUNK + 2), tokenizer.pad_token_id, dtype=torch.long)
    weights = torch.ones(count, CHUNK + 2)
    for i, (c, w) in enumerate(chunks):
        ids[i, : len(c) + 2] = torch.tensor([tokenizer.bos_token_id, *c, tokenizer.eos_token_id])
        weights[i, 1 : len(c) + 1] = torch.tensor(w)
    return ids, weights


WEIGHTINGS = ("a1111", "a1111_no_norm")  # A1111's emphasis modes "Original" and "No norm"


# ------------------------------------------------------------------------------------------------
# A1111 prompt editing: "[from:to:when]", "[to:when]", "[from::when]" and alternation "[a|b]", by the grammar
# of A1111's modules/prompt_parser.py (schedule_parser, a lark grammar; parsed by hand here) and its
# get_learned_conditioning_prompt_schedules: `when` with a "." is a fraction of the steps, else a step number;
# the text at loop step i is the schedule's first entry whose end step is >= i (reconstruct_cond_batch)

_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")  # lark's SIGNED_NUMBER, then "]"
_STRAY = "[]():"  # what the grammar's start rule lets stand alone (as text) outside any construct


class _Fail(Exception):
    pass


def _parse_prompt(s: str, i: int, top: bool) -> tuple[list, int]:
    """A1111's `prompt` rule from s[i]: [node] up to a character it cannot take (or, at the top, the end).
    Nodes: str, ("sched", before, after, when), ("alt", [options]), ("emph", [nodes]) (its brackets kept)."""
    nodes: list = []
    while i < len(s):
        c = s[i]
        if c == "\\":
            if i + 1 == len(s):
                raise _Fail  # a lone trailing backslash: the grammar has no token for it
            nodes.append(s[i : i + 2])
            i += 2
        elif c in "[(":
            try:
                node, i = (_parse_square if c == "[" else _parse_round)(s, i)
                nodes.append(node)
            except _Fail:
                if not top:
                    raise
                nodes.append(c)  # = the start rule's stray bracket: the construct was not one
                i += 1
        elif c in _STRAY or c == "|":
            if not top:
                return nodes, i  # the enclosing construct decides
            if c == "|":
                raise _Fail  # not a stray character: A1111's parse fails and the prompt is taken as it is
            nodes.append(c)
            i += 1
        else:
            j = i
            while j < len(s) and s[j] not in "\\[]():|":
                j += 1
            nodes.append(s[i:j])
            i = j
    return nodes, i


def _parse_round(s, i):
    """ "(" prompt ")" | "(" prompt ":" prompt ")" (A1111's emphasis, kept as text around its parts)."""
    first, i = _parse_prompt(s, i + 1, top=False)
    parts = ["(", *first]
    if i < len(s) and s[i] == ":":
        second, i = _parse_prompt(s, i + 1, top=False)
        parts += [":", *second]
    if i >= len(s) or s[i] != ")":
        raise _Fail
    return ("emph", [*parts, ")"]), i + 1


def _parse_square(s, i):
    """ "[" prompt "]" (emphasis) | scheduled "[" [prompt ":"] prompt ":" NUMBER "]" | alternate "[" prompt
    ("|" prompt)+ "]"."""
    first, i = _parse_prompt(s, i + 1, top=False)
    if i < len(s) and s[i] == "]":
        return ("emph", ["[", *first, "]"]), i + 1
    if i < len(s) and s[i] == "|":
        options = [first]
        while i < len(s) and s[i] == "|":
            option, i = _parse_prompt(s, i + 1, top=False)
            options.append(option)
        if i >= len(s) or s[i] != "]":
            raise _Fail
        return ("alt", options), i + 1
    if i >= len(s) or s[i] != ":":
        raise _Fail
    if m := _NUMBER.match(s, i + 1):  # [to:when]
        return ("sched", None, first, m.group(1)), m.end()
    second, i = _parse_prompt(s, i + 1, top=False)
    if i < len(s) and s[i] == ":" and (m := _NUMBER.match(s, i + 1)):  # [from:to:when]
        return ("sched", first, second, m.group(1)), m.end()
    raise _Fail


def _parsed(prompt: str) -> list | None:
    """A prompt's nodes, or None where A1111's parse fails (a "|" outside brackets, a lone trailing backslash,
    brackets nested deeper than Python's stack): A1111 then takes the prompt as it is."""
    try:
        return _parse_prompt(prompt, 0, top=True)[0]
    except (_Fail, RecursionError):
        return None


def _when(number: str, steps: int) -> int:
    # = CollectSteps.scheduled (hires_steps None): "0.25" is a fraction of the steps, "10" a step
    v = float(number) * steps if "." in number else float(number)
    return min(steps, int(v))


def _steps_of(nodes, steps: int, out: set):
    for n in nodes:
        if isinstance(n, str):
            continue
        if n[0] == "sched":
            _steps_of(n[1] or [], steps, out)
            _steps_of(n[2], steps, out)
            if (when := _when(n[3], steps)) >= 1:
                out.add(when)
        elif n[0] == "alt":
            for option in n[1]:
                _steps_of(option, steps, out)
            out.update(range(1, steps + 1))
        else:
            _steps_of(n[1], steps, out)


def _text_at(nodes, step: int, steps: int) -> str:
    out = []
    for n in nodes:
        if isinstance(n, str):
            out.append(n)
        elif n[0] == "sched":  # = AtStep.scheduled: before (or nothing) up to `when`, after it after
            out.append(_text_at((n[1] or []) if step <= _when(n[3], steps) else n[2], step, steps))
        elif n[0] == "alt":  # = AtStep.alternate: the options in turn, one a step
            out.append(_text_at(n[1][(step - 1) % len(n[1])], step, steps))
        else:
            out.append(_text_at(n[1], step, steps))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """A1111's prompt editing: [(end step, the prompt text up to it)] for `steps` steps, e.g.
    "a [dog:cat:0.5]" over 10 steps -> [(5, "a dog"), (10, "a cat")]. A prompt A1111 cannot parse (a "|" outside
    brackets, a lone trailing backslash) is one entry, as it is."""
    nodes = _parsed(prompt)
    if nodes is None:
        return [(steps, prompt)]
    ends = {steps}
    _steps_of(nodes, steps, ends)
    return [(t, _text_at(nodes, t, steps)) for t in sorted(ends)]


def _text_of(nodes, whens) -> str:
    """The prompt text of parsed nodes, each scheduled node's `when` as whens(number) gives it."""
    out = []
    for n in nodes:
        if isinstance(n, str):
            out.append(n)
        elif n[0] == "sched":
            before = "" if n[1] is None else _text_of(n[1], whens) + ":"
            out.append(f"[{before}{_text_of(n[2], whens)}:{whens(n[3])}]")
        elif n[0] == "alt":
            out.append("[" + "|".join(_text_of(o, whens) for o in n[1]) + "]")
        else:
            out.append(_text_of(n[1], whens))
    return "".join(out)


def hires_prompt(prompt: str, first_steps: int, hires_steps: int) -> str:
    """The prompt for a hires fix's second pass: A1111 counts its `when`s past the first pass (hires_steps given:
    "0.5" is the first pass's, "1.5" half the hires pass, an integer N step N - first_steps), so each becomes
    the integer step of the hires pass it names (<= 0: the "to" text throughout)."""

    def hires_when(number):  # = CollectSteps.scheduled with int_offset = first_steps, flt_offset = 1
        v = float(number)
        v = (v - 1.0) * hires_steps if "." in number else v - first_steps
        return str(min(hires_steps, int(v)))

    nodes = _parsed(prompt)
    return prompt if nodes is None else _text_of(nodes, hires_when)


def schedules(prompts: dict, steps: int) -> list[tuple[int, dict]] | None:
    """Several prompts' schedules (each a str, a list of them, or None) merged: [(end step, {name: text(s)})],
    runs of the same texts joined; None when no prompt has prompt editing (one entry of the texts as given)."""
    lists = {k: v if isinstance(v, list) else [v] for k, v in prompts.items() if isinstance(v, (str, list))}
    if any(not isinstance(p, str) for v in lists.values() for p in v):
        return None  # (encode_prompt says what is wrong with them)
    per = {k: [prompt_schedule(p, steps) for p in v] for k, v in lists.items()}
    ends = sorted({end for scheds in per.values() for sched in scheds for end, _ in sched})
    out = []
    for t in ends:
        texts = {k: [next(text for end, text in sched if t <= end) for sched in v] for k, v in per.items()}
        texts = {k: v if isinstance(prompts[k], list) else v[0] for k, v in texts.items()}
        if out and out[-1][1] == texts:
            out[-1] = (t, texts)
        else:
            out.append((t, texts))
    given = {k: v for k, v in prompts.items() if k in per}
    return None if len(out) == 1 and out[0][1] == given else out  # ("[a:b:0]" is one entry, but "b", not the text)


def _emphasis(hidden, weights, weighting):
    """A1111's emphasis, per 77-token window: each token's hidden state times its weight; "Original" (its default)
    then scales the window by old mean / new mean (A1111 takes the means over its whole batch; here over the
    window), "No norm" does not."""
    mean = hidden.mean(dim=(1, 2), keepdim=True)
    hidden = hidden * weights[..., None].to(hidden)
    return hidden if weighting == "a1111_no_norm" else hidden * (mean / hidden.mean(dim=(1, 2), keepdim=True))


def _windows_needed(groups, pairs) -> int:
    """The most 77-token windows any prompt of `groups` ([prompts, prompts_2] lists) needs with weighting."""
    return max(len(weighted_chunks(p, tok)) for g in groups for ps, (tok, _) in zip(g, pairs) for p in ps)


def _encode(pairs, prompt_lists, clip_skip, max_length=77, cuda_graphs=False, weighting=None):
    """Concatenated hidden states of every encoder [B, 77, sum of widths] and bigG's pooled output.
    weighting="a1111": A1111's weights and windows, max_length // 77 of them (pooled: the first window's).
    cuda_graphs: the encoders were compiled with CUDA graphs (minsdxl.compile), whose outputs live in
    buffers the next replay overwrites: each call starts a new graph step and its outputs are copied."""
    hidden, pooled = [], None
    for prompts, (tokenizer, encoder) in zip(prompt_lists, pairs):
        if weighting:
            count = max_length // (CHUNK + 2)
            rows = [_windows(weighted_chunks(p, tokenizer), count, tokenizer) for p in prompts]
            ids, weights = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
        else:
            ids = tokenizer([expand_textual_inversion(p, tokenizer) for p in prompts], max_length=max_length)
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        h, p = encoder(ids.to(encoder.device), clip_skip=clip_skip)
        if cuda_graphs:
            h, p = h.clone(), None if p is None else p.clone()
        if weighting:  # windows side by side; bigG's pooled output from each prompt's first window, as A1111
            h = _emphasis(h, weights, weighting).reshape(len(prompts), max_length, -1)
            p = None if p is None else p[::count]
        hidden.append(h)
        if p is not None:  # only bigG has a (projected) pooled output: SDXL's "final text encoder"
            pooled = p
    return torch.cat(hidden, dim=-1), pooled


def encode_prompt(
    model,
    prompt=None,
    prompt_2=None,
    negative_prompt=None,
    negative_prompt_2=None,
    num_images_per_prompt: int = 1,
    do_classifier_free_guidance: bool = True,
    clip_skip: int | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    pooled_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    device=None,
    lora_scale: float | None = None,
    prompt_weighting: str | None = None,
):
    """-> (prompt_embeds [B*n, 77, 2048], negative_prompt_embeds, pooled_prompt_embeds [B*n, 1280],
    negative_pooled_prompt_embeds), n = num_images_per_prompt, each prompt's copies adjacent
    ([p0, p0, p1, p1]); the refiner's embeddings are 1280 wide. The negatives are None when
    `do_classifier_free_guidance` is False (unless given). Same values as diffusers'
    StableDiffusionXLPipeline.encode_prompt; its rules:
      - `prompt_2` / `negative_prompt_2` (bigG's prompts) default to `prompt` / `negative_prompt`;
      - `negative_prompt=None` gives all-zero negatives when the model's `force_zeros_for_empty_prompt`
        (base: True, refiner: False); otherwise the negative text (None -> "") is encoded;
      - `clip_skip` k reads layer -(k + 2) for the prompt, never for the negative prompt;
      - `lora_scale` multiplies the loaded LoRA adapters' weights in both text encoders for this call.
    Extra (diffusers has no prompt weighting): prompt_weighting="a1111" reads the prompts in A1111's syntax,
    "(word:1.3)", "(word)" = 1.1, "[word]" = 1/1.1, "BREAK" (a new 77-token window), and never truncates: a
    prompt of more than 75 tokens takes several windows side by side ([B, 77 * windows, 2048]; A1111's cuts,
    its "Original" emphasis; pooled from the first window). Prompt and negative get the same number of
    windows (the shorter padded with empty ones, as A1111's pad_cond_uncond); without any syntax and within
    75 tokens the result is the unweighted one, bit for bit; "a1111_no_norm": A1111's "No norm" emphasis (the
    weights without the mean's rescaling)."""
    # ---- checks, before any heavy work
    pairs = _encoders(model)
    refiner = len(pairs) == 1
    if refiner and (prompt_2 is not None or negative_prompt_2 is not None):
        raise ValueError(
            "the refiner has one text encoder (bigG) and reads `prompt` / `negative_prompt` only: drop "
            "`prompt_2` / `negative_prompt_2` (diffusers would silently ignore them)"
        )
    _check_embeds(
        (prompt, prompt_2, prompt_embeds, pooled_prompt_embeds),
        (negative_prompt, negative_prompt_2, negative_prompt_embeds, negative_pooled_prompt_embeds),
    )
    prompt = _prompt_list("prompt", prompt)
    batch = len(prompt) if prompt is not None else prompt_embeds.shape[0]
    # diffusers writes `prompt_2 or prompt`: an empty prompt_2 ("" or []) also falls back to `prompt`
    prompt_2 = _prompt_list("prompt_2", prompt_2 or prompt, batch) if prompt is not None else None
    if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}")
    if clip_skip is not None:
        layers = min(encoder.config.num_hidden_layers for _, encoder in pairs)
        if not _is_int(clip_skip) or not 0 <= clip_skip < layers:
            raise ValueError(f"clip_skip must be None or an int in 0..{layers - 1} (layers skipped), got {clip_skip!r}")
    zero_negative = negative_prompt is None and model.force_zeros_for_empty_prompt
    encode_negative = do_classifier_free_guidance and negative_prompt_embeds is None and not zero_negative
    if encode_negative:
        negative_prompt = negative_prompt or ""  # diffusers' `or`s again: None, "" and [] all mean ""
        negative_prompt_2 = negative_prompt_2 or negative_prompt
        negative_prompt = _prompt_list("negative_prompt", negative_prompt, batch)
        negative_prompt_2 = _prompt_list("negative_prompt_2", negative_prompt_2, batch)
        if prompt_embeds is not None and prompt_embeds.shape[1] > 77 and not prompt_weighting:
            raise ValueError(
                f"`prompt_embeds` are {prompt_embeds.shape[1]} tokens long, but a negative prompt is encoded to"
                " the same length and CLIP has 77 positions: pass `negative_prompt_embeds` as well"
            )
    else:
        for name, value in (("negative_prompt", negative_prompt), ("negative_prompt_2", negative_prompt_2)):
            _prompt_list(name, value, batch)  # type and length errors even when unused
        if do_classifier_free_guidance and zero_negative and negative_prompt_2:
            warnings.warn(
                "negative_prompt_2 is ignored: with negative_prompt=None this model's negative embeddings are zeros"
                " (force_zeros_for_empty_prompt), as in diffusers; pass negative_prompt='' to encode it",
                stacklevel=2,
            )

    length = 77
    if prompt_weighting is not None:
        if prompt_weighting not in WEIGHTINGS:
            raise ValueError(
                f"prompt_weighting must be None, 'a1111' (A1111's syntax and its 'Original' emphasis) or "
                f"'a1111_no_norm' (its 'No norm' emphasis), got {prompt_weighting!r}"
            )
        groups = [[negative_prompt, negative_prompt_2]] if encode_negative else []
        texts = dict(
            prompt=prompt, prompt_2=prompt_2, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2
        )
        # one step is enough to tell: any [..:..] or [..|..] resolves to other text (the sampler's come resolved)
        if schedules(texts, 1) is not None:
            warnings.warn(
                "the prompt has A1111 prompt editing ([from:to:when] or [a|b]), which needs the steps: encode_prompt "
                "encodes the text as written; text2img / img2img / inpaint with prompt_weighting follow it",
                stacklevel=2,
            )
        if prompt_embeds is None:
            length = 77 * _windows_needed([[prompt, prompt_2], *groups], pairs)
        elif groups:
            need = _windows_needed(groups, pairs)  # tokenized once, for the test and the message
            if prompt_embeds.shape[1] % 77 or need > prompt_embeds.shape[1] // 77:
                raise ValueError(
                    f"the negative prompt needs {need} windows of 77 tokens but `prompt_embeds` are "
                    f"{prompt_embeds.shape[1]} tokens long: pass `negative_prompt_embeds` as well"
                )

    # ---- encode (lora_scale = diffusers' scale_lora_layers on both text encoders for this call)
    graphs = getattr(model, "cuda_graphs", False)
    with lora.scaled(model, lora_scale, ("text_encoder", "text_encoder_2")):
        if prompt_embeds is None:
            prompt_embeds, pooled = _encode(
                pairs, [prompt, prompt_2], clip_skip, length, cuda_graphs=graphs, weighting=prompt_weighting
            )
            if pooled_prompt_embeds is None:
                pooled_prompt_embeds = pooled

        if do_classifier_free_guidance and negative_prompt_embeds is None and zero_negative:
            negative_prompt_embeds = torch.zeros_like(prompt_embeds)
            negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
        elif encode_negative:
            # diffusers tokenizes the negative to prompt_embeds' length and reads hidden_states[-2] (no clip_skip)
            negative_prompt_embeds, pooled = _encode(
                pairs, [negative_prompt, negative_prompt_2], None, prompt_embeds.shape[1], graphs, prompt_weighting
            )
            if negative_pooled_prompt_embeds is None:
                negative_pooled_prompt_embeds = pooled

    # ---- dtype, device, copies per prompt
    device = device if device is not None else model.text_encoder_2.device
    dtype = model.text_encoder_2.dtype
    n = num_images_per_prompt
    # = diffusers' x.repeat(1, n, 1).view(B * n, ...): each prompt's n copies are adjacent
    prompt_embeds = prompt_embeds.to(dtype=dtype, device=device).repeat_interleave(n, dim=0)
    pooled_prompt_embeds = pooled_prompt_embeds.to(device).repeat_interleave(n, dim=0)
    if do_classifier_free_guidance:
        negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device).repeat_interleave(n, dim=0)
        negative_pooled_prompt_embeds = negative_pooled_prompt_embeds.to(device).repeat_interleave(n, dim=0)
    return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds


# ------------------------------------------------------------------------------------------------
# textual inversion

SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")  # CLIP-L [n, 768], bigG [n, 1280], as in SDXL embedding files


def _read_embedding(path) -> dict:
    if isinstance(path, dict):
        return path
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"cannot read {path} as a safetensors SDXL embedding ({e}); SDXL embeddings are .safetensors files"
            " holding `clip_l` and `clip_g` tensors"
        ) from e


def load_textual_inversion(model, path, token: str) -> list[str]:
    """Load an SDXL textual-inversion embedding (`path`: a .safetensors file or its dict, holding
    `clip_l` [n, 768] and `clip_g` [n, 1280]) as `token` into both tokenizers and both encoders (the
    refiner: bigG only). n > 1 vectors become tokens token, token_1, ..., token_{n-1}, and a prompt's
    `token` expands to all of them. Returns the tokens added.

    = diffusers' SDXL recipe, two `load_textual_inversion` calls: (clip_g, text_encoder_2, tokenizer_2)
    and (clip_l, text_encoder, tokenizer): the new ids are len(tokenizer), len(tokenizer) + 1, ...
    and the token-embedding matrix grows to match."""
    if not isinstance(token, str) or not token.strip():
        raise ValueError(f"token must be a non-blank str such as '<my-style>', got {token!r}")
    sd = _read_embedding(path)
    pairs = _encoders(model)
    keys = SDXL_EMBEDDING_KEYS[-len(pairs) :]  # the refiner: clip_g only
    missing = [k for k in SDXL_EMBEDDING_KEYS if k not in sd]
    if missing:
        raise ValueError(
            f"{path if not isinstance(path, dict) else 'the embedding'} has tensors {sorted(sd)} but no "
            f"{' or '.join(missing)}: an SDXL embedding carries `clip_l` [n, 768] and `clip_g` [n, 1280], one per "
            "text encoder (SD 1.x embeddings cannot be used with SDXL)"
        )
    vectors = {}
    for key, (_, encoder) in zip(keys, pairs):
        v = sd[key]
        width = encoder.token_embedding.weight.shape[1]
        if not isinstance(v, torch.Tensor) or v.ndim not in (1, 2) or v.shape[-1] != width:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"`{key}` has shape {shape}; this model's encoder takes [n, {width}] vectors")
        vectors[key] = v.reshape(-1, width)
    counts = {k: v.shape[0] for k, v in vectors.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"`clip_l` and `clip_g` hold different numbers of vectors {counts}; the file is damaged")
    n = next(iter(counts.values()))
    tokens = [token] + [f"{token}_{i}" for i in range(1, n)]
    for tokenizer, _ in pairs:  # every check before the first change, so a failure leaves the model as it was
        taken = [t for t in (*tokens, f"{token}_1") if t in tokenizer.encoder]
        # an existing added token matched case-insensitively: the tokenizer would refuse it half-way
        taken += [t for t in tokens if len(ids := tokenizer.encode(t)[1:-1]) == 1 and ids[0] >= tokenizer.vocab_size]
        if taken:
            raise ValueError(
                f"token {sorted(set(taken))[0]!r} is already in the tokenizer's vocabulary; choose another token "
                "name (a textual inversion cannot reuse a word or an already loaded embedding)"
            )
    for key, (tokenizer, encoder) in zip(keys, pairs):
        ids = tokenizer.add_tokens(tokens)
        _set_token_embeddings(encoder.token_embedding, ids, vectors[key])
    return tokens


@torch.no_grad()
def _set_token_embeddings(embedding: torch.nn.Embedding, ids: list[int], vectors: torch.Tensor) -> None:
    """Grow the embedding matrix to cover `ids` and write the vectors there (= diffusers'
    resize_token_embeddings + `input_embeddings.data[token_id] = embedding`). A new matrix: loaded weights,
    possibly memory-mapped from the checkpoint, are never written to."""
    w = embedding.weight
    extra = max(max(ids) + 1 - w.shape[0], 0)
    w = torch.cat([w, w.new_zeros(extra, w.shape[1])])
    w[torch.tensor(ids, device=w.device)] = vectors.to(dtype=w.dtype, device=w.device)
    embedding.weight = torch.nn.Parameter(w, requires_grad=False)
    embedding.num_embeddings = w.shape[0]


__all__ = ["encode_prompt", "load_textual_inversion", "expand_textual_inversion", "parse_prompt_attention"]
