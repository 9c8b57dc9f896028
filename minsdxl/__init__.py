"""minsdxl: Stable Diffusion XL in plain PyTorch, numerically equal to diffusers."""

from .checkpoint import SDXL, CheckpointError, load, load_component

__version__ = "0.1.0"
__all__ = ["SDXL", "CheckpointError", "load", "load_component", "__version__"]
