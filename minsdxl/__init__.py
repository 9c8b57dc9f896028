"""minsdxl: Stable Diffusion XL in plain PyTorch, numerically equal to diffusers."""

from . import deepcache, guidance, layerwise, tome  # guider= rules, float8 storage, Token Merging, DeepCache
from .checkpoint import SDXL, CheckpointError, load, load_component
from .controlnet import ControlNetModel, load_controlnet
from .ip_adapter import load_ip_adapter, set_ip_adapter_scale, unload_ip_adapter
from .lora import (
    delete_adapters,
    disable_lora,
    enable_lora,
    get_active_adapters,
    load_lora_weights,
    set_adapters,
    unload_lora_weights,
)
from .prompt import encode_prompt, load_textual_inversion
from .sampler import img2img, inpaint, instruct_pix2pix, text2img
from .schedulers import make_scheduler
from .speed import compile, set_attention
from .t2i_adapter import T2IAdapter, load_t2i_adapter

__version__ = "0.1.0"
__all__ = [
    "SDXL",
    "CheckpointError",
    "load",
    "load_component",
    "encode_prompt",
    "load_textual_inversion",
    "load_lora_weights",
    "set_adapters",
    "get_active_adapters",
    "delete_adapters",
    "disable_lora",
    "enable_lora",
    "unload_lora_weights",
    "load_controlnet",
    "load_t2i_adapter",
    "T2IAdapter",
    "ControlNetModel",
    "load_ip_adapter",
    "set_ip_adapter_scale",
    "unload_ip_adapter",
    "text2img",
    "img2img",
    "inpaint",
    "instruct_pix2pix",
    "make_scheduler",
    "compile",
    "set_attention",
    "guidance",
    "tome",
    "deepcache",
    "layerwise",
    "__version__",
]
