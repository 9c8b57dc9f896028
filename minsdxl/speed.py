"""Speed switches applied to a built model from outside (the model files stay plain PyTorch)."""

import importlib.util

import torch

from . import attention
from .unet import GEGLU, unet_of


def compile(
    model,
    mode: str | None = "auto",
    fullgraph: bool = True,
    attention_backend: str | None = "auto",
    text_encoders: bool = True,
    fused_geglu: bool = False,
    controlnet=None,
):
    """torch.compile the UNet, the VAE decoder and (text_encoders=True) both text encoders in place
    (keys and attributes unchanged), with fullgraph=True: a graph break is an error, not a silent
    slowdown. Shapes stay static across the steps of a run, so each (batch, size) compiles once and is
    reused by later steps and calls; the text encoders once per (prompt batch, clip_skip).

    mode: torch.compile's mode; "auto" = "reduce-overhead" (CUDA graphs: no per-kernel launch cost;
    the sampler marks each step) for a model on a CUDA device, else None (inductor's default).
    attention_backend: "triton" | "sdpa" | "math" for this model (as set_attention(name, model));
    "auto" = "triton" with CUDA graphs when triton is installed, else left as it is.
    fused_geglu: each UNet feed-forward's GEGLU (proj, then h * gelu(gate)) as one Triton GEMM with the
    gelu * mul in its epilogue (minsdxl.kernels.geglu_gemm; Hopper GPUs and the CPU interpreter, PyTorch
    elsewhere). Off by default: not yet timed on a GPU; it can save at most ~1.5 ms per step on an H100.
    controlnet: ControlNets (minsdxl.load_controlnet; one or a list) compiled the same way, in place. Steps
    outside a ControlNet's guidance window run the UNet without its residuals: a second UNet graph,
    compiled once (a scale is passed as a tensor: a new scale reuses the graphs).
    On an H100, SDXL 1024^2, 30 steps, bf16: 31.1 ms per step and 0.996 s end to end with the defaults
    (diffusers + torch.compile: 33.7 ms, 1.109 s); on an H200 40.1 ms per step without CUDA graphs, 31.5
    with them (docs/performance.md)."""
    unet_of(model, "minsdxl.compile")
    graphs_ok = model.unet.device.type == "cuda" and not getattr(model, "offload_device", None)
    if mode == "auto":  # offload moves the weights every call, which CUDA graphs cannot replay
        mode = "reduce-overhead" if graphs_ok else None
    if attention_backend == "auto":
        fast = mode == "reduce-overhead" and importlib.util.find_spec("triton") is not None
        attention_backend = "triton" if fast else None
    nets = list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet] if controlnet else []
    if attention_backend is not None:
        set_attention(attention_backend, model)
        for net in nets:
            _set_backend(net, attention_backend)
    set_fused_geglu(model, fused_geglu)
    parts = [model.unet, *[m for m in (model.vae.decoder,) if m is not None], *nets]  # (a TAESD may have none)
    # eager, the text encoders launch ~15 small kernels per layer (43 layers for SDXL base) for one
    # [1, 77] prompt: host-bound on a GPU, where compiled and replayed as a CUDA graph they are not
    if text_encoders:
        parts += [m for m in (model.text_encoder, model.text_encoder_2) if m is not None]
    for m in parts:
        m.compile(mode=mode, fullgraph=fullgraph)
    # CUDA graphs reuse their output buffers: the sampler tells torch when a step's outputs are dead
    model.cuda_graphs = mode in ("reduce-overhead", "max-autotune")
    return model


def set_attention(backend: str, model=None) -> None:
    """Select the attention: "sdpa" (default), "math", or "triton". With a model, for every attention
    layer of that model (UNet, VAE, text encoders, IP-Adapter image encoder; or of one module, such as
    a ControlNet) only (a module it shares
    with another model through load(share=...) is one object: both see the change); without, the
    process default."""
    attention.check_backend(backend)
    if model is None:
        attention.set_backend(backend)
        return
    if isinstance(model, torch.nn.Module):  # a module of its own (a ControlNet)
        _set_backend(model, backend)
        return
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder"):
        component = getattr(model, name, None)
        if component is not None:
            _set_backend(component, backend)


def _set_backend(module, backend):
    for m in module.modules():
        if hasattr(m, "attention_backend"):
            m.attention_backend = backend


def set_fused_geglu(model, fused: bool) -> None:
    """Turn the Triton GEGLU GEMM on or off for every feed-forward of the model's UNet (each GEGLU's `fused`;
    compile(fused_geglu=...) calls this; eager, it runs the kernel too)."""
    if fused and importlib.util.find_spec("triton") is None:
        raise ImportError(
            "set_fused_geglu(model, True) or minsdxl.compile(fused_geglu=True) needs triton: pip install triton "
            "(or minsdxl[kernels])"
        )
    for m in model.unet.modules():
        if isinstance(m, GEGLU):
            m.fused = fused
