"""T2I-Adapter for SDXL (arXiv:2302.08453; TencentARC/t2i-adapter-*-sdxl-1.0): a small convnet (77 M
parameters) that turns a control image into one feature map per UNet encoder level, added inside the
UNet's down blocks (and the middle block) at every step, instead of a ControlNet's UNet-sized copy.

= diffusers T2IAdapter(adapter_type="full_adapter_xl"); attribute names are diffusers', so its
state dict loads by identity. The sampler side (text2img's adapter=, image=) is in minsdxl.sampler.
"""

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, _build, component_file, read_state_dict
from .config import T2IAdapterConfig, t2i_adapter_config_from_state_dict
from .layerwise import compute_dtype


class AdapterResnetBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.block2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return self.block2(torch.relu(self.block1(x))) + x


class AdapterBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_res_blocks: int, down: bool):
        super().__init__()
        self.downsample = nn.AvgPool2d(2, stride=2, ceil_mode=True) if down else None
        self.in_conv = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.resnets = nn.Sequential(*(AdapterResnetBlock(cout) for _ in range(num_res_blocks)))

    def forward(self, x):
        if self.downsample is not None:
            x = self.downsample(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return self.resnets(x)


class FullAdapterXL(nn.Module):
    def __init__(self, cfg: T2IAdapterConfig):
        super().__init__()
        ch = cfg.channels
        self.unshuffle = nn.PixelUnshuffle(cfg.downscale_factor)
        self.conv_in = nn.Conv2d(cfg.in_channels * cfg.downscale_factor**2, ch[0], 3, padding=1)
        # = diffusers FullAdapterXL: the second block widens, the third halves the size, the others keep both
        self.body = nn.ModuleList(
            AdapterBlock(ch[max(i - 1, 0)] if i in (1, 2) else ch[i], ch[i], cfg.num_res_blocks, down=i == 2)
            for i in range(len(ch))
        )

    def forward(self, x) -> list:
        x = self.conv_in(self.unshuffle(x))
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


class T2IAdapter(nn.Module):
    kind = "T2I-Adapter"

    def __init__(self, config: T2IAdapterConfig):
        super().__init__()
        self.config = config
        self.adapter = FullAdapterXL(config)

    @property
    def dtype(self):
        return compute_dtype(self.adapter.conv_in)

    @property
    def device(self):
        return self.adapter.conv_in.weight.device

    def forward(self, x: torch.Tensor) -> list:
        """[B, in_channels, H, W] in [0, 1] (H, W multiples of downscale_factor) -> one feature map per UNet
        encoder level and one for its middle block: UNet2DConditionModel.forward's
        down_intrablock_additional_residuals."""
        return self.adapter(x)


def load_t2i_adapter(path, dtype=torch.float32, device="cpu", variant=None) -> T2IAdapter:
    """An SDXL T2I-Adapter from a diffusers folder (config.json + diffusion_pytorch_model[.fp16]
    .safetensors, e.g. TencentARC/t2i-adapter-canny-sdxl-1.0) or one file with diffusers' keys."""
    file, cj = component_file(path, variant, dtype)
    kind = cj.get("adapter_type", "full_adapter_xl")
    if kind != "full_adapter_xl":
        raise CheckpointError(
            f"{path}: adapter_type {kind!r} is a Stable Diffusion 1.x adapter; SDXL's T2I-Adapters are full_adapter_xl"
        )
    sd = read_state_dict(file)
    if "adapter.conv_in.weight" not in sd or "adapter.body.0.resnets.0.block1.weight" not in sd:
        raise CheckpointError(f"{file} is not a T2I-Adapter (no adapter.conv_in / adapter.body weights)")
    base = T2IAdapterConfig(downscale_factor=cj.get("downscale_factor", 16))
    return _build(T2IAdapter, t2i_adapter_config_from_state_dict(sd, base), sd, "T2I-Adapter", dtype, device)
