"""minsdxl.tokenizer against transformers' CLIPTokenizer, called the way diffusers' encode_prompt calls it
(padding="max_length", max_length=77, truncation=True), on tests/prompts.json and a Unicode sweep."""

import importlib.util
import json
import unicodedata
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from tokenizer_fixtures import STYLES, write_sdxl_tokenizers

from minsdxl.tokenizer import BUNDLED_BPE, EOS, CLIPTokenizer

PROMPTS = json.loads((Path(__file__).parent / "prompts.json").read_text(encoding="utf-8"))
# exactly 77 ids with BOS/EOS, one too many, and a cut inside a character's byte tokens
PROMPTS += ["a " * 75, "a " * 76, "猫" * 40 + "🐱" * 30]
NAMES = ("tokenizer", "tokenizer_2")  # CLIP-L pads with "<|endoftext|>", bigG with "!"


def hf_ids(hf, prompts) -> torch.Tensor:
    return hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def assert_same_rows(ours, ref, prompts):
    bad = [(p, a, b) for p, a, b in zip(prompts, ours, ref) if list(a) != list(b)]
    assert not bad, f"{len(bad)} prompts differ, first: {bad[0]}"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{style: {name: folder}}, plus "resaved": the hub folders after transformers' save_pretrained (only
    tokenizer.json + tokenizer_config.json, as in pipelines saved by transformers 5)."""
    out = {}
    for style in STYLES:
        out[style] = dict(zip(NAMES, write_sdxl_tokenizers(tmp_path_factory.mktemp(style), style)))
    out["resaved"] = {}
    for name, folder in out["hub"].items():
        target = tmp_path_factory.mktemp("resaved") / name
        transformers.CLIPTokenizer.from_pretrained(folder).save_pretrained(target)
        for f in ("vocab.json", "merges.txt"):  # make sure the tokenizer.json path is the one tested
            (target / f).unlink(missing_ok=True)
        out["resaved"][name] = target
    return out


def test_bundled_vocabulary_is_open_clips_file():
    open_clip_dir = Path(importlib.util.find_spec("open_clip").origin).parent
    assert BUNDLED_BPE.read_bytes() == (open_clip_dir / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    assert (BUNDLED_BPE.parent / "LICENSE-bpe_simple_vocab_16e6.txt").is_file()
    tok = CLIPTokenizer.bundled()
    assert len(tok) == tok.vocab_size == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert CLIPTokenizer.bundled(pad_token="!").pad_token_id == 0


@pytest.mark.parametrize("style", [*STYLES, "resaved"])
@pytest.mark.parametrize("name", NAMES)
def test_ids_match_transformers(folders, style, name):
    hf = transformers.CLIPTokenizer.from_pretrained(folders[style][name])
    tok = CLIPTokenizer.from_folder(folders[style][name])
    assert (tok.pad_token_id, len(tok), tok.vocab_size) == (hf.pad_token_id, len(hf), hf.vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation warnings: tested below
        ids = tok(PROMPTS)
    assert ids.dtype == torch.long and ids.shape == (len(PROMPTS), 77)
    assert_same_rows(ids, hf_ids(hf, PROMPTS), PROMPTS)
    assert_same_rows([tok.encode(p) for p in PROMPTS], hf(PROMPTS).input_ids, PROMPTS)  # untruncated
    assert_same_rows([tok.tokenize(p) for p in PROMPTS], [hf.tokenize(p) for p in PROMPTS], PROMPTS)


def test_pad_and_exclamation_quirk():
    tok, tok2 = CLIPTokenizer.bundled(), CLIPTokenizer.bundled(pad_token="!")
    assert tok("hello!")[0, :5].tolist() == [49406, 3306, 256, 49407, 49407]  # "!</w>", then EOS pads
    assert tok2("hello!")[0, :5].tolist() == [49406, 3306, 0, 49407, 0]  # "!" is id 0 and pads with 0
    assert tok("!!!")[0, 1].item() != 0 and tok2("!!!")[0, 1:4].tolist() == [0, 0, 0]


@pytest.mark.parametrize("pad", [EOS, "!"])
def test_bundled_equals_folder(folders, pad):
    folder = CLIPTokenizer.from_folder(folders["hub"][NAMES[pad == "!"]])
    bundled = CLIPTokenizer.bundled(pad_token=pad)
    assert bundled.encoder == folder.encoder and bundled.ranks == folder.ranks
    assert (bundled._raw, bundled._normalized) == (folder._raw, folder._normalized)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(bundled(PROMPTS), folder(PROMPTS))


def test_single_file_pad_override(folders):
    """diffusers' single-file loaders pass pad_token="!" for bigG, whatever the folder says."""
    hf = transformers.CLIPTokenizer.from_pretrained(folders["hub"]["tokenizer"], pad_token="!")
    tok = CLIPTokenizer.from_folder(folders["hub"]["tokenizer"], pad_token="!")
    assert tok.pad_token_id == hf.pad_token_id == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same_rows(tok(PROMPTS), hf_ids(hf, PROMPTS), PROMPTS)


@pytest.mark.parametrize("name", NAMES)
def test_truncation_warns_once_quoting_the_dropped_part(folders, name):
    hf = transformers.CLIPTokenizer.from_pretrained(folders["hub"][name])
    tok = CLIPTokenizer.from_folder(folders["hub"][name])
    long1, long2 = "a red fox jumping over a lazy dog! " * 12, "猫" * 40 + "🐱" * 30
    prompts = [long1, "short", long2]
    with pytest.warns(UserWarning) as record:
        ids = tok(prompts)
    assert len(record) == 1
    # diffusers' encode_prompt: batch_decode(untruncated_ids[:, 76:-1]), per over-long prompt
    removed = [hf.batch_decode(hf([p], padding="longest", return_tensors="pt").input_ids[:, 76:-1])[0] for p in prompts]
    assert str(record[0].message) == (
        "The following part of your input was truncated because CLIP can only handle sequences up to 77 tokens:"
        f" {[removed[0], removed[2]]}"
    )
    assert removed[0] and removed[2]
    assert torch.equal(ids, hf_ids(hf, prompts)) and ids[0, -1] == ids[2, -1] == tok.eos_token_id
    untruncated = hf(prompts, padding="longest", return_tensors="pt").input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning without truncation
        assert torch.equal(tok(prompts, truncate=False), untruncated)
        tok(["short", "a " * 75])


@pytest.mark.parametrize("name", NAMES)
def test_decode_matches_transformers(folders, name):
    hf = transformers.CLIPTokenizer.from_pretrained(folders["hub"][name])
    tok = CLIPTokenizer.from_folder(folders["hub"][name])
    for p in PROMPTS:
        ids = tok.encode(p)
        # whole, without BOS/EOS, and cuts that split multi-byte characters' byte tokens
        for part in (ids, ids[1:-1], ids[2:], ids[: len(ids) // 2], ids[len(ids) // 3 :]):
            assert tok.decode(part) == hf.decode(part), (p, part)
    assert tok.decode(torch.tensor([49406, 320, 0, 256, 1125, 49407, 0])) == hf.decode(
        [49406, 320, 0, 256, 1125, 49407, 0]
    )


NEW_TOKENS = ["<cat-toy>", "<Style_V2>", "two words", "Ünï", "Cat"]
TI_PROMPTS = [
    "a <cat-toy> on a table",
    "A <CAT-TOY> and <cat-toy><cat-toy>!",
    "in <style_v2> style, two   words, TWO WORDS, twowords",
    "ünï ÜNÏ unï <cat-toy!>",
    "cats and a cat, Cat, CAT",
    "<cat-toy>" * 80,
]


@pytest.mark.parametrize("name", NAMES)
def test_add_tokens_matches_transformers(folders, name):
    hf = transformers.CLIPTokenizer.from_pretrained(folders["hub"][name])
    tok = CLIPTokenizer.from_folder(folders["hub"][name])
    ids = tok.add_tokens(NEW_TOKENS)
    assert ids == list(range(49408, 49408 + len(NEW_TOKENS)))
    hf.add_tokens(NEW_TOKENS)
    assert [hf.convert_tokens_to_ids(t) for t in NEW_TOKENS] == ids  # what load_textual_inversion reads
    assert len(tok) == len(hf) and tok.vocab_size == hf.vocab_size == 49408
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same_rows(tok(TI_PROMPTS + PROMPTS), hf_ids(hf, TI_PROMPTS + PROMPTS), TI_PROMPTS + PROMPTS)
    for p in TI_PROMPTS:
        assert tok.tokenize(p) == hf.tokenize(p)
        assert tok.decode(tok.encode(p)) == hf.decode(hf(p).input_ids)


def test_add_tokens_errors():
    tok = CLIPTokenizer.bundled()
    tok.add_tokens("<cat-toy>")
    cases = [
        ("cat", "already in the vocabulary"),
        (EOS, "already in the vocabulary"),
        ("<cat-toy>", "already in the vocabulary"),
        ("<CAT-Toy>", "reads as the added token '<cat-toy>'"),
        (["<a>", "<A>"], "same token twice"),
        ("  ", "blank"),
    ]
    for tokens, message in cases:
        with pytest.raises(ValueError, match=message):
            tok.add_tokens(tokens)
    with pytest.raises(TypeError, match="takes strings"):
        tok.add_tokens(["<ok>", 5])
    assert len(tok) == 49409  # failed calls add nothing


def test_user_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        CLIPTokenizer.bundled(pad_token="<pad>")
    tok = CLIPTokenizer.bundled()
    with pytest.raises(TypeError, match="list of str"):
        tok(5)
    with pytest.raises(TypeError, match="must be a str"):
        tok(["a cat", None])
    with pytest.raises(ValueError, match="max_length"):
        tok("a cat", max_length=1)


def test_unicode_sweep_matches_transformers(folders):
    """Every character of the Latin..CJK-punctuation, full-width, emoji and math-letter blocks between
    letters and digits: whitespace, \\p{L} / \\p{N} classes, lowercase and NFC character by character.
    Characters unassigned in Python's Unicode database are skipped: the Rust crates behind transformers
    may use a newer Unicode version (they would be letters there, symbols here)."""
    hf = transformers.CLIPTokenizer.from_pretrained(folders["hub"]["tokenizer_2"])
    tok = CLIPTokenizer.from_folder(folders["hub"]["tokenizer_2"])
    blocks = [range(0x3400), range(0xFF00, 0xFFF0), range(0x1D400, 0x1D800), range(0x1F300, 0x1FB00)]
    chars = [chr(c) for r in blocks for c in r if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    texts = [f"a{c}b{c}{c}1{c}" for c in chars]
    assert_same_rows([tok.encode(t) for t in texts], hf(texts).input_ids, texts)
