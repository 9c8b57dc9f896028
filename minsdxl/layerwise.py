"""Layerwise casting: weights stored in a narrow dtype (float8), each layer computed in a wider one.

= diffusers' ModelMixin.enable_layerwise_casting (hooks/layerwise_casting.py): every Linear, Conv and Embedding
whose name no skip pattern matches keeps its weight and bias in `storage_dtype` and upcasts them to
`compute_dtype` for its own forward only. The SDXL UNet in float8 holds 2.6 GB of weights instead of 5.1 (bf16)
or 10.3 (fp32); the image changes by the weights' rounding (float8 e4m3 keeps 3 mantissa bits).

diffusers moves the module's parameters with module.to() in a hook before and after each call; here the layer's
class becomes a subclass of its own whose forward casts the two tensors it reads (the same numbers), so keys,
`isinstance` and torch.compile(fullgraph=True) are unaffected and nothing is written during a forward.
"""

import re

import torch
import torch.nn.functional as F
from torch import nn

# = diffusers' DEFAULT_SKIP_MODULES_PATTERN, plus the UNet / VAE / ControlNet's _skip_layerwise_casting_patterns
# ("norm", already in it). re.search over the dotted name: "^proj_in$" only matches a top-level proj_in, so the
# transformers' proj_in / proj_out are cast as in diffusers
DEFAULT_SKIP = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")


class CastLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, *_upcast(self))


class CastConv2d(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, *_upcast(self))


class CastEmbedding(nn.Embedding):
    def forward(self, ids):
        # the looked-up rows upcast: the same numbers as upcasting the table first, without copying it
        return super().forward(ids).to(self.compute_dtype)


CAST = {nn.Linear: CastLinear, nn.Conv2d: CastConv2d, nn.Embedding: CastEmbedding}


def _upcast(layer):
    b = layer.bias
    return layer.weight.to(layer.compute_dtype), None if b is None else b.to(layer.compute_dtype)


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a layer computes in: its weight's, or the compute dtype of a layer stored narrower."""
    return getattr(layer, "compute_dtype", layer.weight.dtype)


def targets(module: nn.Module, skip_modules_pattern=DEFAULT_SKIP) -> list[str]:
    """The names of the layers enable() casts: each Linear / Conv2d / Embedding not under a name a pattern
    matches (= diffusers' _apply_layerwise_casting, which stops descending at a match)."""
    found, skip = [], skip_modules_pattern or ()
    skip = (skip,) if isinstance(skip, str) else tuple(skip)  # one pattern, or None: none

    def walk(m, prefix):
        if prefix and any(re.search(p, prefix) for p in skip):
            return
        if type(m) in CAST:  # exactly: a subclass (MultiheadAttention's out_proj) may read its weight itself
            found.append(prefix)
            return
        for name, child in m.named_children():
            walk(child, f"{prefix}.{name}" if prefix else name)

    walk(module, "")
    return found


def check(storage_dtype, compute, what="layerwise casting") -> None:
    for name, d in (("storage_dtype", storage_dtype), ("the compute dtype", compute)):
        wide = name == "storage_dtype" or (isinstance(d, torch.dtype) and d.itemsize > 1)  # nothing computes in fp8
        if not (isinstance(d, torch.dtype) and d.is_floating_point and wide):
            raise ValueError(
                f"{what}: {name} must be a floating torch dtype (storage: torch.float8_e4m3fn or float8_e5m2; "
                f"compute: float32, bfloat16 or float16), got {d!r}"
            )


def enable(
    module: nn.Module, storage_dtype=torch.float8_e4m3fn, compute_dtype=None, skip_modules_pattern=DEFAULT_SKIP
) -> nn.Module:
    """Store `module`'s layers (targets(module, skip_modules_pattern): regular expressions searched in the dotted
    names, diffusers' argument) in `storage_dtype`, computed in `compute_dtype` (default: the dtype of the module's
    first parameter, as diffusers' model.dtype), in place; returns the module. Casting back would not restore the
    rounded weights: as in diffusers, a module is cast once (load it again to change its storage)."""
    done = [n for n, m in module.named_modules() if type(m) in CAST.values()]
    if done:
        was = module.get_submodule(done[0]).weight.dtype
        raise ValueError(
            f"layerwise casting is already on for this module ({len(done)} layers stored in {was}, e.g. {done[0]}); "
            "casting again would not restore the rounded weights: load the model again to change it"
        )
    if compute_dtype is None:  # = diffusers' self.dtype
        compute_dtype = next(module.parameters(), torch.empty(0)).dtype
    check(storage_dtype, compute_dtype)
    for name in targets(module, skip_modules_pattern):
        layer = module.get_submodule(name)
        for p in layer.parameters(recurse=False):
            p.data = p.data.to(storage_dtype)  # a no-op for weights loaded narrow (checkpoint.load's storage_dtype)
        layer.__class__ = CAST[type(layer)]
        layer.compute_dtype = compute_dtype
    return module
