"""Images in and out: PIL / numpy / torch conversion and mask processing, as diffusers'
VaeImageProcessor does for SDXL (image: resize, [0,1] -> [-1,1]; mask: grayscale, binarise)."""

import numpy as np
import PIL.Image
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


def _as_list(image):
    return list(image) if isinstance(image, (list, tuple)) else [image]


def to_tensor(image, height=None, width=None, mask: bool = False, latent_channels: int = 4) -> torch.Tensor:
    """PIL image(s), numpy [H,W,C]/[B,H,W,C] in [0,1], or torch [C,H,W]/[B,C,H,W] in [0,1] -> float32
    [B, C, H, W]: in [-1, 1] for images, binarised {0, 1} single-channel for masks. A torch tensor
    with `latent_channels` channels is returned unchanged (latents). = VaeImageProcessor.preprocess."""
    images = _as_list(image)
    if not images:
        raise ValueError("got an empty list of images")
    first = images[0]
    if isinstance(first, PIL.Image.Image):
        if not all(isinstance(i, PIL.Image.Image) for i in images):
            raise TypeError("a list of images must hold only PIL images")
        height, width = _size(first, height, width)
        # diffusers resizes with Lanczos; PIL returns an exact copy when the size already matches
        images = [i.resize((width, height), resample=PIL.Image.LANCZOS) for i in images]
        # (diffusers would read an RGBA image as 4-channel "latents"; we convert it, as users expect)
        images = [i.convert("L" if mask else "RGB") for i in images]
        x = torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images]))
        x = x[..., None] if mask else x
        x = x.permute(0, 3, 1, 2)
    elif isinstance(first, np.ndarray):
        x = np.concatenate(images) if first.ndim == 4 else np.stack(images)
        if x.ndim == 3:  # [B, H, W] masks
            x = x[..., None]
        x = torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)
        x = _resize_tensor(x, height, width)
    elif isinstance(first, torch.Tensor):
        x = torch.cat(images) if first.ndim == 4 else torch.stack(images)
        if mask and x.ndim == 3:
            x = x.unsqueeze(1)
        if not mask and x.shape[1] == latent_channels:
            return x  # latents: no preprocessing
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
    if x.shape[1] != 3:
        raise ValueError(f"an image needs 3 channels (RGB), got {x.shape[1]}")
    # = VaeImageProcessor.preprocess: a tensor already in [-1, 1] is not normalised again
    return x if x.min() < 0 else 2.0 * x - 1.0


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
