"""What the CLI writes into and reads out of its PNGs, and the file hashes it records.

Two text chunks per image: `parameters`, A1111's infotext (modules/processing.py create_infotext:
prompt, "Negative prompt: ...", then one line of "Key: value" pairs, values with , : or newline
JSON-quoted as in infotext_utils.quote), which PNG-info readers and Civitai parse; and `minsdxl`, a
JSON object with everything needed to make the image again (`minsdxl generate --from-png`).
Model hashes are SHA-256 of the weights file; A1111's short "Model hash" is its first 10 hex digits.
"""

import hashlib
import json
import os
import re
from pathlib import Path

import PIL.Image
import PIL.PngImagePlugin

SCHEMA = 1  # version of the `minsdxl` JSON chunk; bump when a field changes meaning


# ------------------------------------------------------------------------------------------------
# A1111 infotext


def quote(value) -> str:
    """= A1111 infotext_utils.quote: plain unless it holds a comma, colon or newline, then JSON."""
    text = str(value)
    return text if not any(c in text for c in ",:\n") else json.dumps(text, ensure_ascii=False)


def infotext(prompt: str, negative_prompt: str | None, params: dict) -> str:
    """A1111's `parameters` text; keys whose value is None are left out (= create_infotext)."""
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt or ''}{negative}\n{line}"


# = A1111 infotext_utils.re_param_code: `Key: value` or `Key: "quoted, value"`, comma separated
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict:
    """A1111 infotext -> {"Prompt": ..., "Negative prompt": ..., "Steps": "30", ...} (values as text;
    = parse_generation_parameters without its type guessing)."""
    lines = text.strip().split("\n")
    last = lines[-1]
    if len(_PARAM.findall(last)) < 3:  # no parameter line: everything is prompt
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines[:-1]:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        if len(value) > 1 and value[0] == value[-1] == '"':
            value = json.loads(value)
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------------
# PNG files


def save_png(image: PIL.Image.Image, path, text: dict, overwrite: bool = False) -> None:
    """Write `image` with tEXt chunks `text` (iTXt where a value is not Latin-1, as PIL decides) to a
    temporary name in the same folder, then rename it into place: an interrupted run leaves no half
    image. Without `overwrite`, an existing `path` is an error and is left untouched."""
    path = Path(path)
    info = PIL.PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(tmp, "xb") as f:
            image.save(f, format="PNG", pnginfo=info)
        if not overwrite and path.exists():  # someone else wrote it while we were generating
            raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_png_metadata(path) -> dict:
    """{"parameters": A1111 text or None, "infotext": that text parsed (see parse_infotext) or {},
    "minsdxl": the minsdxl JSON chunk or None} of a PNG."""
    try:
        with PIL.Image.open(path) as im:
            chunks = dict(getattr(im, "text", {}) or {})
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise OSError(f"cannot read PNG metadata from {path}: {e}") from None
    params, ours = chunks.get("parameters"), chunks.get("minsdxl")
    if ours is not None:
        try:
            ours = json.loads(ours)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: the minsdxl metadata chunk is not valid JSON ({e})") from None
    return {"parameters": params, "infotext": parse_infotext(params) if params else {}, "minsdxl": ours}


# ------------------------------------------------------------------------------------------------
# Hashes


def _cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minsdxl" / "sha256.json"


def sha256(path) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) in ~/.cache/minsdxl/sha256.json: hashing a
    7 GB checkpoint takes seconds, and the CLI records the hash of every image's model."""
    path = Path(path).resolve()
    st = path.stat()
    key, stamp = str(path), [st.st_size, st.st_mtime_ns]
    cache_file = _cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), dict) and cache[key].get("stamp") == stamp:
        return cache[key]["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    digest = h.hexdigest()
    cache[key] = {"stamp": stamp, "sha256": digest}
    try:  # a cache we cannot write only costs time
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.part")
        tmp.write_text(json.dumps(cache, indent=0))
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return digest


def short_hash(digest: str) -> str:
    """A1111's "Model hash" (its newer sha256 form): the first 10 hex digits."""
    return digest[:10]
