"""Speed switches applied to a built model from outside (the model files stay plain PyTorch)."""

from . import attention


def compile(model, mode: str | None = None, fullgraph: bool = True, attention_backend: str | None = None):
    """torch.compile the UNet and the VAE decoder in place (keys and attributes unchanged), with
    fullgraph=True: a graph break is an error, not a silent slowdown. Shapes stay static across the
    steps of a run, so each (batch, size) compiles once and is reused by later steps and calls.
    attention_backend: "triton" | "sdpa" | "math", as minsdxl.attention.set_backend."""
    if attention_backend is not None:
        attention.set_backend(attention_backend)
    model.unet.compile(mode=mode, fullgraph=fullgraph)
    model.vae.decoder.compile(mode=mode, fullgraph=fullgraph)
    return model


def set_attention(backend: str) -> None:
    """Select the attention backend for every model: "sdpa" (default), "math", or "triton"."""
    attention.set_backend(backend)
