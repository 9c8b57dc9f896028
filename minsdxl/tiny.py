"""The bundled tiny SDXL (`minsdxl.load("tiny")`) and the little world it was trained on.

The model has SDXL's layout (three levels, its block types, two text encoders, micro-conditioning) at a tiny width
and depth and was trained here on 64x64 pictures of one
coloured shape at a named position on a plain background, captioned like
"a red circle at the top left on a white background" (scripts/train_tiny.py). This module holds that
world: the words it knows, their colours and places, the caption template and the renderer, so the
training script, the tests and a curious user all read one definition.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PATH = Path(__file__).parent / "data" / "tiny"
NAME = "tiny"  # minsdxl.load("tiny") and the CLI's default --model
SIZE = 64  # training and default image size (8 x 8 latents)

COLORS = {  # foreground colours, RGB
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "diamond")
POSITIONS = {  # centre of the shape, as fractions of (x, y)
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}


def caption(color: str, shape: str, position: str | None = None, background: str | None = None) -> str:
    """The training captions: "a red circle[ at the top left][ on a white background]"."""
    text = f"a {color} {shape}"
    if position:
        text += f" at the {position}" if position != "center" else " in the center"
    if background:
        text += f" on a {background} background"
    return text


def render(
    color: str, shape: str, position: str, background: str, size: int = SIZE, rng: np.random.Generator | None = None
) -> Image.Image:
    """One picture of the world: drawn 4x larger and box-downsampled (anti-aliased edges). With `rng`,
    the centre moves by up to 4 % of the side and the radius varies in 15-20 %, as in training."""
    jitter = rng.uniform(-0.04, 0.04, 2) if rng is not None else np.zeros(2)
    radius = rng.uniform(0.15, 0.2) if rng is not None else 0.175
    s = 4 * size
    cx, cy = (np.array(POSITIONS[position]) + jitter) * s
    r = radius * s
    img = Image.new("RGB", (s, s), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        q = r * 0.85
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; the tiny model knows {', '.join(SHAPES)}")
    return img.resize((size, size), Image.BOX)


def foreground(image, background: str, threshold: float = 80.0) -> np.ndarray:
    """Boolean mask of the pixels farther than `threshold` (RGB distance) from the background colour."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    return np.linalg.norm(rgb - np.array(BACKGROUNDS[background], np.float32), axis=-1) > threshold


def describe(image, background: str) -> dict:
    """Plain pixel statistics of a picture on a known background: the foreground's share of pixels, its
    dominant colour (the most common nearest palette colour over foreground pixels), its centroid and
    its position (the named position nearest that centroid). What the tests measure generations with."""
    mask = foreground(image, background)
    out = {"area": float(mask.mean()), "color": None, "position": None, "centroid": None}
    if mask.sum() == 0:
        return out
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)[mask]
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], np.float32)
    nearest = np.linalg.norm(rgb[:, None] - palette[None], axis=-1).argmin(1)
    out["color"] = names[np.bincount(nearest, minlength=len(names)).argmax()]
    ys, xs = np.nonzero(mask)
    centroid = np.array([xs.mean() + 0.5, ys.mean() + 0.5]) / mask.shape[1]
    out["position"] = min(POSITIONS, key=lambda p: np.linalg.norm(centroid - np.array(POSITIONS[p])))
    out["centroid"] = tuple(float(v) for v in centroid)  # (x, y) as fractions of the side
    return out
