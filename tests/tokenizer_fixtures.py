"""Diffusers-style tokenizer folders built from minsdxl's bundled CLIP vocabulary (tests only, offline).

`write_tokenizer_folder(path, pad_token)` writes vocab.json + merges.txt + tokenizer_config.json +
special_tokens_map.json that transformers' CLIPTokenizer.from_pretrained loads without the hub;
`write_sdxl_tokenizers(root)` writes SDXL's pair: root/tokenizer (pad "<|endoftext|>") and
root/tokenizer_2 (pad "!"). The vocabulary is rebuilt here the way open_clip's SimpleTokenizer does,
independently of minsdxl.tokenizer.
"""

import gzip
import json
from pathlib import Path

BUNDLED_BPE = Path(__file__).resolve().parents[1] / "minsdxl" / "data" / "bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
STYLES = ("hub", "saved", "plain")


def clip_vocab_and_merges(bpe_path=BUNDLED_BPE) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) as open_clip.tokenizer.SimpleTokenizer builds them: 256 byte symbols, the same with
    "</w>", one token per merge of the first 48,894, then BOS and EOS (49,408 tokens)."""
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = [chr(b) for b in bs] + [chr(256 + n) for n in range(256 - len(bs))]
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def _added_token(content: str, normalized: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


def write_tokenizer_folder(folder, pad_token: str = EOS, style: str = "hub", vocab_and_merges=None) -> Path:
    """style "hub": the legacy files of SDXL's published folders (bos/eos/unk as AddedToken dicts with
    normalized=true, the pad token a plain string); "saved": what a newer transformers save_pretrained
    writes (an added_tokens_decoder, plain-string names); "plain": plain strings only, no special_tokens_map."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges or clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    names = {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS}
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77}
    config |= {"tokenizer_class": "CLIPTokenizer", "clean_up_tokenization_spaces": True}
    if style == "hub":
        special = {k: v if k == "pad_token" else _added_token(v, True) for k, v in names.items()}
        tc = {k: v if isinstance(v, str) else {"__type": "AddedToken", **v} for k, v in special.items()}
        (folder / "tokenizer_config.json").write_text(json.dumps(config | tc, indent=2), encoding="utf-8")
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    elif style == "saved":
        decoder = {vocab[pad_token]: (pad_token, False)} if pad_token not in (BOS, EOS) else {}
        decoder |= {vocab[BOS]: (BOS, True), vocab[EOS]: (EOS, True)}
        config["added_tokens_decoder"] = {
            str(i): {**_added_token(c, n), "special": True} for i, (c, n) in sorted(decoder.items())
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config | names, indent=2), encoding="utf-8")
        (folder / "special_tokens_map.json").write_text(json.dumps(names, indent=2), encoding="utf-8")
    else:
        (folder / "tokenizer_config.json").write_text(json.dumps(config | names, indent=2), encoding="utf-8")
    return folder


def write_sdxl_tokenizers(root, style: str = "hub") -> tuple[Path, Path]:
    """root/tokenizer (CLIP-L, pads with "<|endoftext|>") and root/tokenizer_2 (bigG, pads with "!")."""
    vm = clip_vocab_and_merges()
    return (
        write_tokenizer_folder(Path(root) / "tokenizer", EOS, style, vm),
        write_tokenizer_folder(Path(root) / "tokenizer_2", "!", style, vm),
    )
