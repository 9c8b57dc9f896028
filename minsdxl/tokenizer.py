"""CLIP byte-level BPE tokenizer: the ids of transformers' CLIPTokenizer as diffusers calls it.

The pipeline is transformers 5.x `CLIPTokenizer` (a `tokenizers` backend; no ftfy, no html unescaping):
  1. split off added tokens matched in the raw text (SDXL's `tokenizer_2` pad "!": the "!" quirk,
     diffusers#4153: every "!" in a prompt becomes id 0 there, never a BPE merge like "!!</w>"),
  2. normalise: NFC, whitespace runs -> " ", lowercase, character by character,
  3. split off added tokens matched in the normalised text (BOS/EOS, textual-inversion tokens),
  4. split the rest into words with CLIP's pattern and BPE-encode each word over GPT-2's byte alphabet,
     with "</w>" on its last symbol.
diffusers' encode_prompt pads to 77 and truncates keeping BOS/EOS: [BOS] + ids[:75] + [EOS] + pads.

The vocabulary bundled in data/ is open_clip's bpe_simple_vocab_16e6.txt.gz, from OpenAI CLIP, MIT license
(data/LICENSE-bpe_simple_vocab_16e6.txt): single-file checkpoints carry no tokenizer files.
"""

import functools
import gzip
import json
import re
import unicodedata
import warnings
from pathlib import Path

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BUNDLED_BPE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
# `\s` in the Oniguruma regexes of `tokenizers` is Unicode White_Space. Python's str.isspace() is not: it
# also takes U+001C..U+001F, which CLIP keeps as symbols.
WHITESPACE = "\t\n\v\f\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
_WHITESPACE_RUN = re.compile(f"[{WHITESPACE}]+")
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters: the BPE alphabet."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # control characters, space, NBSP, soft hyphen: moved past 255
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def normalize(text: str) -> str:
    """transformers' CLIP normalizer: NFC, whitespace runs -> " ", lowercase."""
    text = _WHITESPACE_RUN.sub(" ", unicodedata.normalize("NFC", text))
    # Per character like Rust's char::to_lowercase: str.lower() would turn a word-final "Σ" into "ς".
    return "".join(c.lower() for c in text)


def _kind(c: str) -> str:
    if c in WHITESPACE:
        return " "
    cat = unicodedata.category(c)[0]
    return cat if cat in "LN" else "P"


def split_words(text: str) -> list[str]:
    r"""CLIP's pre-tokenizer  's|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+  without the `regex`
    module: letters run together, each digit stands alone, other non-space characters run together.
    (The pattern's <|startoftext|>/<|endoftext|> alternatives change nothing: the ByteLevel step re-splits
    such a word into "<|", "endoftext", "|>", as here.)"""
    words, i = [], 0
    while i < len(text):
        c = next((c for c in CONTRACTIONS if text.startswith(c, i)), None)
        if c:
            words.append(c)
            i += len(c)
            continue
        kind, j = _kind(text[i]), i + 1
        if kind != "N":
            while j < len(text) and _kind(text[j]) == kind:
                j += 1
        if kind != " ":
            words.append(text[i:j])
        i = j
    return words


def _special_flags(named: dict, decoder: dict) -> dict[str, bool]:
    """{token: normalized} for the special tokens, resolved as transformers 5 does (TokenizersBackend.__init__):
    the added tokens a folder lists (tokenizer_config.json's added_tokens_decoder, else tokenizer.json's
    added_tokens), then the named bos, eos, unk, pad tokens not among them; of two different entries for
    the same text the later wins. A token given as a plain string is matched in the raw text
    (normalized=False), so the config files decide whether "<|ENDOFTEXT|>" reads as EOS."""
    specs = [
        (t["content"], t.get("normalized", not t.get("special", False)))
        for _, t in sorted(decoder.items(), key=lambda kv: int(kv[0]))
    ]
    in_decoder = {content for content, _ in specs}
    for v in named.values():
        spec = (v["content"], v.get("normalized", False)) if isinstance(v, dict) else (str(v), False)
        if spec[0] not in in_decoder and spec not in specs:
            specs.append(spec)
    return dict(specs)


def _alternation(tokens) -> re.Pattern | None:
    """One capturing group matching any of `tokens`, longest first: the leftmost-longest match of the
    Aho-Corasick automaton `tokenizers` uses for added tokens."""
    keys = sorted(tokens, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, keys)) + ")") if keys else None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class CLIPTokenizer:
    """`tok(prompts)` -> LongTensor [B, 77]; `encode(prompt)` -> untruncated ids; `decode(ids)` -> text."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS, added=None):
        """`added`: {token: normalized} matched before BPE (special tokens first); tokens not in `vocab` get
        the next ids. normalized=False: matched in the raw text, True: in the normalised text."""
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise ValueError("vocab ids must be 0..len(vocab)-1 without gaps; is vocab.json corrupted?")
        added = added if added is not None else {BOS: True, EOS: True, pad_token: False}
        for name, token in (("bos", BOS), ("eos", EOS), ("pad", pad_token)):
            if token not in vocab:
                raise ValueError(f"{name} token {token!r} is not in the vocabulary; CLIP's pads are {EOS!r} or '!'")
        self.encoder = dict(vocab)  # token -> id, added tokens included (transformers' get_vocab())
        self.decoder = {i: t for t, i in vocab.items()}
        self.vocab_size = len(vocab)  # without added tokens, as transformers' `vocab_size`
        self.ranks = {tuple(m): r for r, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bos_token_id, self.eos_token_id = vocab[BOS], vocab[EOS]
        self.pad_token, self.pad_token_id, self.unk_token_id = pad_token, vocab[pad_token], vocab[EOS]
        self.model_max_length = 77
        self._raw, self._normalized = {}, {}  # text matched before BPE -> id, on raw / normalised text
        for token, normalized in added.items():
            self._add(token, normalized)
        self._bpe = functools.lru_cache(maxsize=1 << 16)(self._bpe)

    @classmethod
    def from_folder(cls, path, pad_token: str | None = None) -> "CLIPTokenizer":
        """A diffusers `tokenizer/` or `tokenizer_2/` folder: vocab.json + merges.txt, or the tokenizer.json
        that transformers 5 save_pretrained writes instead. `pad_token` overrides the folder's config
        (diffusers' single-file loaders pass pad_token="!" for OpenCLIP bigG)."""
        folder = Path(path)
        fast = _read_json(folder / "tokenizer.json")
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = _read_json(folder / "vocab.json")
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        elif fast.get("model", {}).get("type") == "BPE":
            vocab = fast["model"]["vocab"]
            merges = [tuple(m.split() if isinstance(m, str) else m) for m in fast["model"]["merges"]]
        else:
            raise ValueError(
                f"{folder} has neither vocab.json + merges.txt nor a BPE tokenizer.json: pass a diffusers"
                " tokenizer/ or tokenizer_2/ folder, or use CLIPTokenizer.bundled() (the vocabulary minsdxl ships)"
            )
        config = _read_json(folder / "tokenizer_config.json")
        decoder = config.get("added_tokens_decoder")
        if decoder is None:  # legacy: special_tokens_map.json overrides, tokenizer.json lists the added tokens
            config |= _read_json(folder / "special_tokens_map.json")
            decoder = {t["id"]: t for t in fast.get("added_tokens", [])}
        named = {
            k: config.get(f"{k}_token") or default
            for k, default in (("bos", BOS), ("eos", EOS), ("unk", EOS), ("pad", EOS))
        }
        if pad_token is not None:
            named["pad"] = pad_token
        pad = named["pad"]["content"] if isinstance(named["pad"], dict) else str(named["pad"])
        tok = cls(vocab, merges, pad, _special_flags(named, decoder))
        for i, t in decoder.items():
            if tok.encoder[t["content"]] != int(i):
                raise ValueError(
                    f"{folder} gives the added token {t['content']!r} id {i}, but its vocabulary and the tokens"
                    f" before it give {tok.encoder[t['content']]}: the folder's files do not belong together"
                )
        return tok

    @classmethod
    def bundled(cls, pad_token: str = EOS) -> "CLIPTokenizer":
        """The CLIP vocabulary shipped in minsdxl/data, read like SDXL's published tokenizer folders
        (bos/eos/unk saved as normalized AddedTokens, the pad token as a plain string)."""
        merges = gzip.open(BUNDLED_BPE).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]  # open_clip's SimpleTokenizer keeps the first 48,894
        symbols = list(bytes_to_unicode().values())
        tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
        named = {k: {"content": t, "normalized": True} for k, t in (("bos", BOS), ("eos", EOS), ("unk", EOS))}
        flags = _special_flags({**named, "pad": pad_token}, {})
        return cls({t: i for i, t in enumerate(tokens)}, merges, pad_token, flags)

    def __len__(self) -> int:
        return len(self.decoder)

    def save(self, folder) -> Path:
        """Write a tokenizer folder like SDXL's published ones (vocab.json, merges.txt, tokenizer_config.json,
        special_tokens_map.json) that from_folder and transformers' CLIPTokenizer.from_pretrained read."""
        if len(self) != self.vocab_size:
            raise ValueError(
                "this tokenizer has added (textual-inversion) tokens; save the model without them, then load the "
                "embeddings again with minsdxl.load_textual_inversion"
            )
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab = {t: i for t, i in self.encoder.items() if i < self.vocab_size}
        merges = sorted(self.ranks, key=self.ranks.get)
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2", *(" ".join(m) for m in merges)]
        (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        # bos/eos/unk as normalized AddedTokens and the pad token a plain string: the published SDXL files
        added = {"content": None, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS}
        special = {k: dict(added, content=v) for k, v in special.items()} | {"pad_token": self.pad_token}
        config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77}
        config |= {"tokenizer_class": "CLIPTokenizer", "clean_up_tokenization_spaces": True}
        config |= {k: v if isinstance(v, str) else {"__type": "AddedToken", **v} for k, v in special.items()}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
        return folder

    def _add(self, token: str, normalized: bool) -> int:
        i = self.encoder.setdefault(token, len(self.decoder))
        # transformers decodes a normalized added token as its normalised text ("<Cat-Toy>" -> "<cat-toy>")
        self.decoder.setdefault(i, normalize(token) if normalized else token)
        (self._normalized if normalized else self._raw)[normalize(token) if normalized else token] = i
        self._raw_re, self._normalized_re = _alternation(self._raw), _alternation(self._normalized)
        return i

    def add_tokens(self, tokens: str | list[str]) -> list[int]:
        """New single tokens (textual inversion) with ids len(self), len(self) + 1, ...; like transformers'
        `add_tokens` they are matched (case-insensitively: in the normalised text) before BPE."""
        tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        for t in tokens:
            if not isinstance(t, str):
                raise TypeError(f"add_tokens takes strings, got {type(t).__name__} {t!r}")
            if not normalize(t).strip(" "):
                raise ValueError(f"add_tokens got a blank token {t!r}; textual-inversion tokens look like '<name>'")
            if t in self.encoder:
                raise ValueError(
                    f"{t!r} is already in the vocabulary (id {self.encoder[t]}); choose another token name"
                )
            if normalize(t) in self._normalized:
                other = self.decoder[self._normalized[normalize(t)]]
                raise ValueError(f"{t!r} reads as the added token {other!r}; choose another token name")
        if len(set(map(normalize, tokens))) < len(tokens):
            raise ValueError(f"add_tokens got the same token twice: {tokens}")
        return [self._add(t, normalized=True) for t in tokens]

    def _bpe(self, word: str) -> tuple[int, ...]:
        parts = [self.byte_encoder[b] for b in word.encode("utf-8")]
        parts[-1] += "</w>"
        never = len(self.ranks)  # the rank of a pair that is not a merge
        while len(parts) > 1:  # merge the lowest-ranked adjacent pair, leftmost first, as tokenizers' BPE
            rank, i = min((self.ranks.get(pair, never), i) for i, pair in enumerate(zip(parts, parts[1:])))
            if rank == never:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return tuple(self.encoder.get(p, self.unk_token_id) for p in parts)

    def _ids(self, text: str) -> list[int]:
        ids = []
        # re.split with one group returns [text, match, text, match, ...]: odd entries are added tokens
        for k, raw in enumerate(self._raw_re.split(text) if self._raw_re else [text]):
            if k % 2:
                ids.append(self._raw[raw])
                continue
            norm = normalize(raw)
            for m, piece in enumerate(self._normalized_re.split(norm) if self._normalized_re else [norm]):
                if m % 2:
                    ids.append(self._normalized[piece])
                else:
                    ids.extend(i for word in split_words(piece) for i in self._bpe(word))
        return ids

    def tokenize(self, text: str) -> list[str]:
        """Token strings without BOS/EOS, as transformers' `tokenize` (diffusers' maybe_convert_prompt uses it)."""
        return [self.decoder[i] for i in self._ids(text)]

    def encode(self, text: str) -> list[int]:
        """[BOS] + ids + [EOS], untruncated and unpadded: diffusers' `untruncated_ids`."""
        if not isinstance(text, str):
            raise TypeError(f"a prompt must be a str, got {type(text).__name__}")
        return [self.bos_token_id, *self._ids(text), self.eos_token_id]

    def decode(self, ids) -> str:
        """transformers' CLIPTokenizer.decode: bytes back to text, "</w>" -> " ", stripped."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        tokens = [self.decoder[int(i)] for i in ids]
        # the ByteLevel decoder keeps a token's own UTF-8 when it is not all byte symbols ("my token")
        data = b"".join(
            bytes(self.byte_decoder[c] for c in t) if all(c in self.byte_decoder for c in t) else t.encode()
            for t in tokens
        )
        # str.strip(), not WHITESPACE: transformers strips in Python (_wrap_decode_method_backend_tokenizer)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, prompts: str | list[str], max_length: int = 77, truncate: bool = True) -> torch.Tensor:
        """LongTensor [B, max_length]: tokenizer(prompts, padding="max_length", max_length=77, truncation=True).
        Over-long prompts keep BOS and EOS and warn once, quoting what was dropped, as encode_prompt does.
        truncate=False pads to max(max_length, longest prompt) instead and never cuts."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for BOS and EOS; use 77")
        rows = [self.encode(p) for p in prompts]
        width = max([max_length, *map(len, rows)]) if not truncate else max_length
        removed = [self.decode(r[max_length - 1 : -1]) for r in rows if len(r) > width]
        if removed:  # the decode of diffusers' encode_prompt: untruncated_ids[:, 76:-1]
            warnings.warn(
                "The following part of your input was truncated because CLIP can only handle sequences up to"
                f" {max_length} tokens: {removed}",
                stacklevel=2,
            )
        out = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        for b, r in enumerate(rows):
            r = r if len(r) <= width else [*r[: width - 1], self.eos_token_id]
            out[b, : len(r)] = torch.tensor(r)
        return out
