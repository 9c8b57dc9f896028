"""Images in and out: PIL / numpy / torch conversion and mask processing, as diffusers'
VaeImageProcessor does for SDXL (image: resize, [0,1] -> [-1,1]; mask: grayscale, binarise)."""

import math

import numpy as np
import PIL.Image
import PIL.ImageFilter
import PIL.ImageOps
import torch
import torch.nn.functional as F


def _size(image, height, width, multiple: int = 8):
    """= VaeImageProcessor.get_default_height_width: the image's own size, rounded down to a multiple of 8."""
    if isinstance(image, PIL.Image.Image):
        h, w = image.height, image.width
    else:
        h, w = image.shape[-2:]
    height, width = height or h, width or w
    return height - height % multiple, width - width % multiple


def _check_pixels(x, mask: bool, kind: str) -> None:
    """An array / tensor of pixels ([B, H, W, C] numpy or [B, C, H, W] torch): of that layout, at least 8x8,
    floats in [0, 1] ([-1, 1] for tensors, as diffusers takes them); masks may hold 0/255 integers."""
    hw = x.shape[1:3] if kind == "numpy" else x.shape[-2:]
    layout = "[H, W, C] / [B, H, W, C]" if kind == "numpy" else "[C, H, W] / [B, C, H, W]"
    if x.ndim != 4 or min(hw) < 8 or x.shape[0] == 0:
        raise ValueError(
            f"a {kind} image must be {layout} (channels {'last' if kind == 'numpy' else 'first'}) and at least "
            f"8x8 pixels; got the shape {tuple(x.shape)} (as a batch)"
        )
    if mask:
        return
    if not (x.dtype.kind == "f" if kind == "numpy" else x.is_floating_point()):
        raise ValueError(f"a {kind} image of {x.dtype} values: pass floats in [0, 1] (e.g. the array / 255)")
    if float(x.max()) > 1.001:
        raise ValueError(f"a {kind} image's values must be in [0, 1], its largest is {float(x.max()):g} (/ 255?)")


def _as_list(image):
    return list(image) if isinstance(image, (list, tuple)) else [image]


def to_tensor(
    image, height=None, width=None, mask: bool = False, latent_channels: int = 4, crop=None, normalize: bool = True
) -> torch.Tensor:
    """PIL image(s), numpy [H,W,C]/[B,H,W,C] in [0,1], or torch [C,H,W]/[B,C,H,W] in [0,1] -> float32
    [B, C, H, W]: in [-1, 1] for images, binarised {0, 1} single-channel for masks. A torch tensor
    with `latent_channels` channels is returned unchanged (latents). = VaeImageProcessor.preprocess;
    crop=(x1, y1, x2, y2) (PIL only): that box, resized keeping its aspect ratio (resize_mode "fill").
    normalize=False: a ControlNet's control image, kept in [0, 1] whatever its channels (diffusers'
    control_image_processor: do_normalize=False)."""
    images = _as_list(image)
    if not images:
        raise ValueError("got an empty list of images")
    first = images[0]
    if isinstance(first, PIL.Image.Image):
        if not all(isinstance(i, PIL.Image.Image) for i in images):
            raise TypeError("a list of images must hold only PIL images")
        images = [i.crop(crop) for i in images] if crop is not None else images
        if min(images[0].size) < 8:
            raise ValueError(f"the image is {images[0].width}x{images[0].height}; it must be at least 8x8 pixels")
        height, width = _size(images[0], height, width)
        if crop is not None:
            images = [resize_fill(i, width, height) for i in images]
        else:  # diffusers resizes with Lanczos; PIL returns an exact copy when the size already matches
            images = [i.resize((width, height), resample=PIL.Image.LANCZOS) for i in images]
        # (diffusers would read an RGBA image as 4-channel "latents"; we convert it, as users expect)
        images = [i.convert("L" if mask else "RGB") for i in images]
        x = torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images]))
        x = x[..., None] if mask else x
        x = x.permute(0, 3, 1, 2)
    elif isinstance(first, np.ndarray):
        if any(not isinstance(i, np.ndarray) or i.shape != first.shape for i in images):
            raise ValueError("a list of numpy images must hold arrays of one shape (resize them to one size)")
        x = np.concatenate(images) if first.ndim == 4 else np.stack(images)
        if x.ndim == 3 and mask:  # [B, H, W] masks
            x = x[..., None]
        _check_pixels(x, mask, "numpy")
        x = torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)
        x = _resize_tensor(x, height, width)
    elif isinstance(first, torch.Tensor):
        x = torch.cat(images) if first.ndim == 4 else torch.stack(images)
        if mask and x.ndim == 3:
            x = x.unsqueeze(1)
        if not mask and normalize and x.ndim == 4 and x.shape[1] == latent_channels:
            return x  # latents: no preprocessing
        _check_pixels(x, mask, "torch")
        x = _resize_tensor(x.float(), height, width)
    else:
        raise TypeError(
            f"unsupported image type {type(first).__name__}: pass a PIL image, a numpy array [H, W, C] in [0, 1] "
            "or a torch tensor [B, C, H, W] in [0, 1] (or latents with 4 channels)"
        )
    if mask:
        if x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True) if x.shape[1] == 3 else x[:, :1]
        return (x >= 0.5).to(x.dtype)  # = VaeImageProcessor.binarize
    if not normalize:
        return x
    if x.shape[1] != 3:
        raise ValueError(f"an image needs 3 channels (RGB), got {x.shape[1]}")
    # = VaeImageProcessor.preprocess: a tensor already in [-1, 1] is not normalised again
    return x if x.min() < 0 else 2.0 * x - 1.0


def blur_mask(mask: PIL.Image.Image, blur_factor: float = 4) -> PIL.Image.Image:
    """A soft-edged mask (= diffusers' VaeImageProcessor.blur: PIL's GaussianBlur of radius blur_factor), for
    an inpainted region that fades into the picture."""
    if not isinstance(mask, PIL.Image.Image):
        raise TypeError(f"blur_mask takes a PIL image, got {type(mask).__name__}")
    if blur_factor < 0:
        raise ValueError(f"blur_factor must be 0 or more (pixels), got {blur_factor}")
    return mask.filter(PIL.ImageFilter.GaussianBlur(blur_factor))


_TG22 = round(0.4142135623730950488016887242097 * (1 << 15))  # tan(22.5°) in OpenCV's 15-bit fixed point


def canny(image: PIL.Image.Image, low: float = 100, high: float = 200) -> PIL.Image.Image:
    """Canny edges of a picture as the white-on-black RGB image an SDXL canny ControlNet / T2I-Adapter reads:
    = cv2.Canny(np.array(image), low, high) stacked to 3 channels, as diffusers' ControlNet docs make it, bit for
    bit (OpenCV's rules: 3x3 Sobel with replicated borders; per pixel the channel of the largest |dx| + |dy|;
    non-maximum suppression by its fixed-point 22.5° / 67.5° tests, strict on the diagonals; hysteresis over
    8-connected neighbours). No OpenCV needed."""
    img = np.asarray(image.convert("RGB")).astype(np.int32)
    low, high = sorted((math.floor(low), math.floor(high)))
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    dx = p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:] - p[:-2, :-2] - 2 * p[1:-1, :-2] - p[2:, :-2]
    dy = p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:] - p[:-2, :-2] - 2 * p[:-2, 1:-1] - p[:-2, 2:]
    mag = np.abs(dx) + np.abs(dy)
    c = mag.argmax(axis=2)[..., None]  # the first channel on ties, as OpenCV's loop keeps the first
    dx, dy, mag = (np.take_along_axis(a, c, 2)[..., 0] for a in (dx, dy, mag))
    h, w = mag.shape
    m = np.pad(mag, 1)  # the magnitude is 0 outside the picture
    x, y = np.abs(dx).astype(np.int64), np.abs(dy).astype(np.int64) << 15
    tg22x = x * _TG22
    s = np.where((dx ^ dy) < 0, -1, 1)
    rows, cols = np.indices((h, w))
    here = m[1:-1, 1:-1]
    keep = np.where(
        y < tg22x,  # near horizontal gradient: compare left and right
        (here > m[1:-1, :-2]) & (here >= m[1:-1, 2:]),
        np.where(
            y > tg22x + (x << 16),  # near vertical: above and below
            (here > m[:-2, 1:-1]) & (here >= m[2:, 1:-1]),
            (here > m[rows, cols + 1 - s]) & (here > m[rows + 2, cols + 1 + s]),
        ),
    )
    weak = (mag > low) & keep
    edge = weak & (mag > high)
    stack = list(zip(*np.nonzero(edge)))
    while stack:  # hysteresis: the weak ones connected to a strong one
        i, j = stack.pop()
        for a in range(max(i - 1, 0), min(i + 2, h)):
            for b in range(max(j - 1, 0), min(j + 2, w)):
                if weak[a, b] and not edge[a, b]:
                    edge[a, b] = True
                    stack.append((a, b))
    return PIL.Image.fromarray(np.repeat(edge[..., None] * np.uint8(255), 3, axis=2))


def outpaint_canvas(
    image: PIL.Image.Image, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0, overlap: int = 0
) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """(canvas, mask) to extend a picture by inpainting: the image with `left`/`top`/`right`/`bottom` px added,
    filled by repeating its edge pixels (colours the model can continue, not black it must paint over), and a
    mask white on the added area and `overlap` px into the picture along those sides (so the seam is redrawn)."""
    sides = (left, top, right, bottom)
    if not all(isinstance(v, int) and v >= 0 for v in (*sides, overlap)) or not any(sides):
        raise ValueError(f"outpaint sizes must be whole pixels >= 0, at least one side > 0; got {sides}, {overlap=}")
    rgb = np.asarray(image.convert("RGB"))
    canvas = PIL.Image.fromarray(np.pad(rgb, ((top, bottom), (left, right), (0, 0)), mode="edge"))
    mask = np.full(canvas.size[::-1], 255, np.uint8)
    h, w = rgb.shape[:2]
    y0, x0 = top + overlap * (top > 0), left + overlap * (left > 0)  # the kept picture, less the overlap
    y1, x1 = top + h - overlap * (bottom > 0), left + w - overlap * (right > 0)
    mask[y0 : max(y1, y0), x0 : max(x1, x0)] = 0  # nothing kept where the overlaps meet
    return canvas, PIL.Image.fromarray(mask)


def mask_crop_region(mask: PIL.Image.Image, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): the box around the mask's non-zero pixels, `pad` wider on every side, then grown
    to the width:height aspect ratio within the image (= VaeImageProcessor.get_crop_region)."""
    m = np.asarray(mask.convert("L")) != 0
    h, w = m.shape
    cols, rows = np.flatnonzero(m.any(0)), np.flatnonzero(m.any(1))
    if not len(cols):
        raise ValueError("mask_image is all black: padding_mask_crop has no masked region to crop around")
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:  # too wide for width:height: take more rows
        y1, y2 = _grow(y1, y2, h, int((x2 - x1) / ratio - (y2 - y1)))
    else:
        x1, x2 = _grow(x1, x2, w, int((y2 - y1) * ratio - (x2 - x1)))
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, size: int, grow: int) -> tuple[int, int]:
    """[lo, hi) widened by `grow`, centred, then shifted back inside [0, size) (get_crop_region's step 3)."""
    lo, hi = lo - grow // 2, hi + grow - grow // 2
    if hi >= size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def _fit(image, width, height, cover: bool):
    """Resized keeping the aspect ratio to fit inside (cover=False) or cover (True) width x height, and
    pasted centred onto a black RGB canvas of that size (= _resize_and_fill / _resize_and_crop's start)."""
    ratio, src_ratio = width / height, image.width / image.height
    whole_width = ratio > src_ratio if cover else ratio < src_ratio
    src_w = width if whole_width else image.width * height // image.height
    src_h = image.height * width // image.width if whole_width else height
    resized = image.resize((src_w, src_h), resample=PIL.Image.LANCZOS)
    canvas = PIL.Image.new("RGB", (width, height))
    canvas.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return canvas, resized, src_w, src_h


def resize_fill(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """= VaeImageProcessor._resize_and_fill: fit inside, then fill the bars by stretching the edge rows
    (or columns) of the resized image."""
    canvas, resized, src_w, src_h = _fit(image, width, height, cover=False)
    if width / height < image.width / image.height:
        bar = height // 2 - src_h // 2
        if bar > 0:
            canvas.paste(resized.resize((width, bar), box=(0, 0, width, 0)), box=(0, 0))
            canvas.paste(resized.resize((width, bar), box=(0, src_h, width, src_h)), box=(0, bar + src_h))
    elif width / height > image.width / image.height:
        bar = width // 2 - src_w // 2
        if bar > 0:
            canvas.paste(resized.resize((bar, height), box=(0, 0, 0, height)), box=(0, 0))
            canvas.paste(resized.resize((bar, height), box=(src_w, 0, src_w, height)), box=(bar + src_w, 0))
    return canvas


def paste_inpainted(mask: PIL.Image.Image, original: PIL.Image.Image, image: PIL.Image.Image, box) -> PIL.Image.Image:
    """The inpainted crop `image` put back into `original` at `box`, kept only where the mask is white
    (soft mask edges blend) (= VaeImageProcessor.apply_overlay with crop_coords)."""
    w, h = original.size
    keep = PIL.Image.new("RGBa", (w, h))  # premultiplied alpha: the original where the mask is black
    keep.paste(original.convert("RGBA").convert("RGBa"), mask=PIL.ImageOps.invert(mask.convert("L")))
    x1, y1, x2, y2 = box
    out = PIL.Image.new("RGBA", (w, h))
    out.paste(_fit(image, x2 - x1, y2 - y1, cover=True)[0], (x1, y1))
    out = out.convert("RGB").convert("RGBA")
    out.alpha_composite(keep.convert("RGBA"))
    return out.convert("RGB")


def _resize_tensor(x, height, width):
    h, w = _size(x, height, width)
    return x if (h, w) == tuple(x.shape[-2:]) else F.interpolate(x, size=(h, w))


def postprocess(image: torch.Tensor, output_type: str = "pil"):
    """[-1, 1] decoder output -> "pil" (list of PIL images), "np" (float [B,H,W,3] in [0,1]) or "pt"
    (float [B,3,H,W] in [0,1]). = VaeImageProcessor.postprocess + numpy_to_pil ((x * 255).round())."""
    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    image = image.permute(0, 2, 3, 1).float()
    if output_type == "np":
        return image.cpu().numpy()
    # numpy_to_pil's (x * 255).round().astype(uint8), done where the image is (fp32 multiply and
    # round-half-to-even are the same in torch and numpy): a GPU copies back 1 byte per value, not 2 or 4,
    # and the host does no per-pixel work
    return [PIL.Image.fromarray(a) for a in (image * 255).round().to(torch.uint8).cpu().numpy()]


def resize_like_latents(mask: torch.Tensor, latent_hw) -> torch.Tensor:
    """= prepare_mask_latents: nearest-neighbour resize of the mask to the latent grid."""
    return F.interpolate(mask, size=tuple(latent_hw))


# = diffusers StableDiffusionXLWatermarker: Stability's 48-bit message, embedded with dwtDct
WATERMARK_BITS = [int(b) for b in bin(0b101100111110110010010000011110111011000110011110)[2:]]


def watermark_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("imwatermark") is not None


def apply_watermark(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> the same with SDXL's invisible watermark (needs `invisible-watermark`), exactly as
    diffusers' StableDiffusionXLWatermarker.apply_watermark (which skips images narrower than 256)."""
    if images.shape[-1] < 256:
        return images
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bits", WATERMARK_BITS)
    arr = (255 * (images / 2 + 0.5)).cpu().permute(0, 2, 3, 1).float().numpy()[:, :, :, ::-1]  # RGB -> BGR
    arr = np.array([encoder.encode(a, "dwtDct")[:, :, ::-1] for a in arr])
    return torch.clamp(2 * (torch.from_numpy(arr).permute(0, 3, 1, 2) / 255 - 0.5), min=-1.0, max=1.0)
