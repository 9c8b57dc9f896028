"""LoRA adapters, merged into the weights: = diffusers' load_lora_weights / set_adapters /
delete_adapters / unload_lora_weights, and a call's cross_attention_kwargs={"scale": s}.

A LoRA holds, per Linear or Conv2d it adapts, a pair `down` [r, in(, kh, kw)], `up` [out, r(, 1, 1)]
and an alpha; the layer's weight becomes W0 + sum over active adapters of weight * alpha / r * up @ down.
LyCORIS adapters build that delta otherwise (below; A1111's networks / LyCORIS' modules, held against peft).
Formats, recognised per key (one file may mix components):
  kohya / sd-scripts  lora_unet_<module>.lora_down.weight / .lora_up.weight / .alpha, the module named
                      the sgm way (input_blocks_4_1_...) or diffusers' (down_blocks_1_...), "_" for ".";
                      lora_te1_ / lora_te_ = CLIP-L, lora_te2_ = bigG (HF names: text_model_encoder_...)
  LyCORIS (kohya names, per module; scale alpha / r, alpha absent = r; dora_scale dropped as for LoRA):
    LoCon Tucker      .lora_down [r, in, 1, 1], .lora_mid [r, r, kh, kw], .lora_up [out, r, 1, 1]: up(mid(down x))
    LoHa              .hada_w1_a/_b, .hada_w2_a/_b (+ .hada_t1/_t2 Tucker cores of a conv): (w1_a @ w1_b) *
                      (w2_a @ w2_b), r = w1_b.shape[0]
    LoKr              .lokr_w1 or .lokr_w1_a/_b, .lokr_w2 or .lokr_w2_a/_b (+ .lokr_t2): kron(w1, w2), r from
                      w1_b, else w2_b; both factors whole: no rank, scale 1 whatever the alpha (= A1111, LyCORIS)
    full              .diff (the weight's delta), .diff_b (the bias'), scale 1
  diffusers (PEFT)    unet.<module>.lora_A.weight / .lora_B.weight (/ .lora_B.bias), text_encoder(_2).<...>;
                      alphas from the safetensors header's lora_adapter_metadata (else alpha = r)
  diffusers (older)   <module>.lora.down/up.weight, attnN.processor.to_q_lora.down/up.weight,
                      <module>.lora_linear_layer.down/up.weight (keys without a component prefix: the UNet)

Why merged rather than a side branch per layer (PEFT): no cost per step, nothing for torch.compile or
CUDA graphs to trace, and state_dict() keys stay diffusers'. Why exact: the original of every adapted
weight is kept, and each change recomputes W0 + sum(...) in fp32 from it, so loading, re-weighting and
unloading in any order never drift (diffusers' unfuse_lora subtracts, which drifts in half precision).
Memory: the original of an adapted weight is kept on the CPU. On the CPU the layer gets a new tensor
and the loaded one stays untouched (for a memory-mapped checkpoint: the file's pages, no extra RAM);
on a GPU the original is copied to the CPU and the layer is rewritten in place (no extra GPU memory,
and CUDA graphs keep their addresses). Unloading puts the original back.
"""

import json
import math
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import (
    CheckpointError,
    _rename,
    diffusers_table,
    read_state_dict,
    require_model,
    safetensors_metadata,
)

ENCODERS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te_": "text_encoder", "lora_te2_": "text_encoder_2"}
# diffusers' key endings (PEFT, then older spellings) -> which part of the pair they hold
_DIFFUSERS_PARTS = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_B.bias": "bias",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".alpha": "alpha",
}
# attention-processor LoRA: attn1.processor.to_q_lora.down.weight -> attn1.to_q (UNet) / self_attn.q_proj (CLIP)
_PROCESSOR = re.compile(r"^(.*?)(?:\.processor)?\.to_(q|k|v|out)_lora\.(down|up)\.weight$")
# kohya's key endings for a plain pair (and LoCon's Tucker middle)
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha"}
# other adapter kinds, told apart by their key endings
_UNSUPPORTED = {
    # LyCORIS parts under other names, e.g. peft's own LoHa / LoKr saves (their alpha is in adapter_config.json)
    r"^(?!lora_(unet|te\d?)_).*\.(hada_\w+|lokr_\w+|lora_mid\.weight|diff|diff_b)$": "a LyCORIS adapter with "
    "diffusers / PEFT module names (minsdxl reads LyCORIS files with kohya names: lora_unet_..., lora_te1_...)",
    r"\.lora_magnitude_vector(\.weight)?$": "DoRA",
    r"\.oft_(blocks|diag)$": "OFT / BOFT (LyCORIS)",
    r"\.[ab][12]\.weight$": "GLoRA (LyCORIS)",
    r"\.[wb]_norm$": "a LyCORIS norm-layer adapter",
}


class _Delta:
    """What _merge needs of one adapted layer: .scale, .bias and .add_to(w, s). A subclass gives .alpha,
    .rank (None: no rank, scale 1) and .delta(device), the fp32 delta before scaling, shaped as the weight
    or as its [out, in * kh * kw] matrix."""

    bias = None

    @property
    def scale(self) -> float:
        return 1.0 if self.rank is None else self.alpha / self.rank

    def add_to(self, w: torch.Tensor, alpha: float) -> None:
        """w += alpha * scale * delta, into a contiguous fp32 weight."""
        w.add_(self.delta(w.device).reshape(w.shape), alpha=alpha * self.scale)


def _f32(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.float32)


@dataclass
class Pair(_Delta):
    """One adapted layer: weight += scale * up @ down (bias += scale * bias, when the LoRA has one); a
    LyCORIS LoCon conv may have a Tucker middle `mid` [r, r, kh, kw] (then down, up are 1x1)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None
    bias: torch.Tensor | None = None
    mid: torch.Tensor | None = None
    what = "LoRA"
    parts = {"down", "up", "bias", "mid"}

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def _matrices(self, device):
        # a conv's kernel is in `down`: [out, r] @ [r, in * kh * kw]
        up, down = _f32(self.up, device), _f32(self.down, device)
        return up.reshape(up.shape[0], down.shape[0]), down.flatten(1)

    def delta(self, device) -> torch.Tensor:
        up, down = self._matrices(device)
        if self.mid is None:
            return up @ down
        # = A1111's lyco_helpers.rebuild_cp_decomposition: LyCORIS runs it as up(mid(down(x)))
        return torch.einsum("n m k l, i n, m j -> i j k l", _f32(self.mid, device), up, down)

    def add_to(self, w: torch.Tensor, alpha: float) -> None:
        if self.mid is not None:
            return super().add_to(w, alpha)
        # one fused GEMM, no delta tensor
        w.view(w.shape[0], -1).addmm_(*self._matrices(w.device), alpha=alpha * self.scale)

    @classmethod
    def read(cls, p: dict, alpha):
        if "down" not in p or "up" not in p:
            raise ValueError("both down and up weights")
        return cls(p["down"], p["up"], alpha, p.get("bias"), p.get("mid"))


def _factor(p: dict, a: str, b: str, t: str | None = None, whole: str | None = None) -> tuple:
    """One LyCORIS factor as the file holds it: (whole,), (a, b), or (a, b, t) with t a Tucker core."""
    if whole in p and not {a, b, t} & p.keys():
        return (p[whole],)
    if a in p and b in p and whole not in p:
        return (p[a], p[b]) + ((p[t],) if t in p else ())
    raise ValueError(f"{whole + ' alone, or ' if whole else ''}{a} and {b}" + (f" (and an optional {t})" if t else ""))


def _rebuild(factor: tuple, device) -> torch.Tensor:
    """A factor's fp32 matrix or conv kernel: as stored, a @ b (flattened as A1111's rebuild_conventional
    reads them), or a Tucker core t [r, r, kh, kw] between a [r, out] and b [r, in] (= peft's and A1111's
    make_weight_cp)."""
    f = [_f32(x, device) for x in factor]
    if len(f) == 1:
        return f[0]
    if len(f) == 2:
        return f[0].flatten(1) @ f[1].flatten(1)
    a, b, t = f
    return torch.einsum("i j k l, i p, j r -> p r k l", t, a, b)


@dataclass
class Hadamard(_Delta):
    """LoHa (LyCORIS): delta = rebuild(w1) * rebuild(w2), element-wise (= peft's LoHaLayer.get_delta_weight,
    A1111's network_hada); r = w1_b.shape[0] (A1111's dim)."""

    w1: tuple
    w2: tuple
    alpha: float | None
    what = "LoHa (LyCORIS)"
    parts = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}

    @property
    def rank(self) -> int:
        return self.w1[1].shape[0]

    def delta(self, device) -> torch.Tensor:
        return _rebuild(self.w1, device) * _rebuild(self.w2, device)

    @classmethod
    def read(cls, p: dict, alpha):
        w1 = _factor(p, "hada_w1_a", "hada_w1_b", "hada_t1")
        return cls(w1, _factor(p, "hada_w2_a", "hada_w2_b", "hada_t2"), alpha)


@dataclass
class Kronecker(_Delta):
    """LoKr (LyCORIS): delta = kron(w1, w2), a conv's kernel in w2 (= peft's make_kron, A1111's network_lokr).
    r = w1_b.shape[0] when w1 is decomposed, else w2_b.shape[0]; with both factors whole there is no rank and
    the scale is 1 whatever the file's alpha, as LyCORIS' LokrModule and A1111 have it (peft scales every
    LoKr by alpha / r, a config value such a file does not hold)."""

    w1: tuple
    w2: tuple
    alpha: float | None
    what = "LoKr (LyCORIS)"
    parts = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}

    @property
    def rank(self) -> int | None:
        return next((f[1].shape[0] for f in (self.w1, self.w2) if len(f) > 1), None)

    def delta(self, device) -> torch.Tensor:
        w1, w2 = _rebuild(self.w1, device), _rebuild(self.w2, device)
        return torch.kron(w1[:, :, None, None] if w2.ndim == 4 else w1, w2)

    @classmethod
    def read(cls, p: dict, alpha):
        w1 = _factor(p, "lokr_w1_a", "lokr_w1_b", whole="lokr_w1")
        return cls(w1, _factor(p, "lokr_w2_a", "lokr_w2_b", "lokr_t2", whole="lokr_w2"), alpha)


@dataclass
class Full(_Delta):
    """LyCORIS 'full': the weight's whole delta `diff` (and the bias' `diff_b`), scale 1 (A1111's network_full)."""

    diff: torch.Tensor
    bias: torch.Tensor | None = None
    alpha: float | None = None  # a file's alpha is ignored, as A1111 does
    what = "full diff (LyCORIS)"
    parts = {"diff", "diff_b"}
    rank = None

    def delta(self, device) -> torch.Tensor:
        return _f32(self.diff, device)

    @classmethod
    def read(cls, p: dict, alpha):
        if "diff" not in p:
            raise ValueError("diff")
        return cls(p["diff"], p.get("diff_b"), alpha)


def _adapter(p: dict) -> _Delta:
    """One layer's tensors, by part name -> its Pair / Hadamard / Kronecker / Full (alpha None when the file
    has none); ValueError saying what is missing or does not belong together."""
    kinds = [c for c in (Pair, Hadamard, Kronecker, Full) if c.parts & p.keys()]
    if len(kinds) != 1:
        what = " and ".join(c.what for c in kinds) + " at once" if kinds else "no weights"
        raise ValueError(f"has {sorted(p)}: {what}")
    try:
        return kinds[0].read(p, float(p["alpha"]) if "alpha" in p else None)
    except ValueError as e:
        raise ValueError(f"has {kinds[0].what} parts {sorted(p)} but needs {e}") from None


@dataclass
class Adapter:
    name: str
    pairs: dict  # (component, module name) -> Pair / Hadamard / Kronecker / Full
    weight: float = 1.0
    active: bool = True
    source: str = ""


@dataclass
class LoRAs:
    """A model's adapters and the original of every weight they touch."""

    adapters: dict = field(default_factory=dict)  # name -> Adapter, in load order
    originals: dict = field(default_factory=dict)  # (component, parameter name) -> the original tensor
    enabled: bool = True  # disable_lora() / enable_lora()


def _state(model) -> LoRAs:
    if getattr(model, "lora", None) is None:
        model.lora = LoRAs()
    return model.lora


# ------------------------------------------------------------------------------------------------
# Reading a LoRA file into (component, module) -> Pair


def _layers(model) -> dict:
    """(component, module name without "text_model.") -> (the Linear / Conv2d, its name in the model)."""
    out = {}
    for comp in ENCODERS:
        m = getattr(model, comp, None)
        for name, mod in m.named_modules() if m is not None else ():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                out[(comp, name.removeprefix("text_model."))] = (mod, name)
    return out


def _kohya_names(model, layers: dict) -> dict:
    """kohya's flat names -> (component, module): the UNet's in its sgm and its diffusers spelling, the
    text encoders' in transformers' (text_model.encoder..., text_projection)."""
    unet = getattr(model, "unet", None)
    rows = diffusers_table({"unet": unet.state_dict()}) if unet is not None else {}
    flat = lambda s: s.replace(".", "_")  # noqa: E731
    out = {}
    for (comp, name), (_, full) in layers.items():
        if comp == "unet":
            out["lora_unet_" + flat(name)] = (comp, name)
            sgm, _ = _rename(f"unet.{name}.weight", rows)
            if sgm is not None:
                sgm = sgm.removeprefix("model.diffusion_model.").removesuffix(".weight")
                out["lora_unet_" + flat(sgm)] = (comp, name)
            continue
        hf = full if full.startswith("text_model.") or full == "text_projection" else "text_model." + full
        for prefix in (p for p, c in _KOHYA.items() if c == comp):
            out[prefix + flat(hf)] = (comp, name)
    return out


def _metadata(path) -> dict:
    """diffusers' lora_adapter_metadata from a .safetensors header ({} when absent)."""
    if isinstance(path, dict) or Path(path).suffix != ".safetensors":
        return {}
    raw = safetensors_metadata(path).get("lora_adapter_metadata")
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}


def _meta_alpha(meta: dict, comp: str, name: str, rank: int) -> float:
    """alpha for a module from PEFT's LoraConfig fields (r, lora_alpha, alpha_pattern, use_rslora);
    a pattern matches a module whose name ends with it, as PEFT's get_pattern_key does."""
    lora_alpha = meta.get(f"{comp}.lora_alpha")
    if lora_alpha is None:
        return float(rank)
    for pattern, a in (meta.get(f"{comp}.alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", name) or re.fullmatch(rf"(.*\.)?({pattern})", "text_model." + name):
            lora_alpha = a
            break
    if meta.get(f"{comp}.use_rslora"):
        return float(lora_alpha) * rank**0.5  # rsLoRA scales by alpha / sqrt(r): alpha' = alpha * sqrt(r)
    return float(lora_alpha)


def _split(key: str):
    """A diffusers-format key -> (component, module name, part) or None."""
    comp, key = "unet", key.removeprefix("base_model.model.")  # a raw PEFT save of the UNet
    for c in ("text_encoder_2", "text_encoder", "unet"):
        if key.startswith(c + "."):
            comp, key = c, key[len(c) + 1 :]
            break
    if m := _PROCESSOR.match(key):
        stem, which, part = m.groups()
        if comp == "unet":
            module = f"{stem}.to_{which}" + (".0" if which == "out" else "")
        else:
            module = f"{stem}.{which}_proj"
        return comp, module.removeprefix("text_model."), part
    for suffix, part in _DIFFUSERS_PARTS.items():
        if key.endswith(suffix):
            return comp, key[: -len(suffix)].removeprefix("text_model."), part
    return None


def _lora_file(path: Path, weight_name: str | None) -> Path:
    """= diffusers' lora_state_dict for local paths: a file as it is (weight_name unused); in a folder,
    weight_name, else its pytorch_lora_weights.safetensors, else its one .safetensors (_best_guess_weight_name;
    where diffusers would pick the first of several in directory order, minsdxl asks for weight_name)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"no LoRA file at {path}; pass the path of a .safetensors LoRA (or its folder)")
    if weight_name is not None:
        if not (path / weight_name).is_file():
            raise CheckpointError(f"no {weight_name} in {path}; its files: {sorted(os.listdir(path))}")
        return path / weight_name
    files = sorted(
        f
        for f in os.listdir(path)
        if f.endswith(".safetensors") and not any(s in f for s in ("scheduler", "optimizer", "checkpoint"))
    )
    files = [f for f in files if f.endswith("pytorch_lora_weights.safetensors")] or files
    if len(files) != 1:
        which = f"several .safetensors files {files}" if files else "no .safetensors LoRA"
        raise CheckpointError(f"{path} holds {which}: pass the file itself, or weight_name=")
    return path / files[0]


def read_lora(model, lora, weight_name: str | None = None) -> dict:
    """A LoRA file, a folder holding one (weight_name, default diffusers' pytorch_lora_weights.safetensors)
    or a state dict -> {(component, module): Pair / Hadamard / Kronecker / Full}, every name and shape
    checked against `model` before anything changes."""
    if isinstance(lora, dict):
        where, sd, meta = "the LoRA state dict", dict(lora), {}
    else:
        lora = _lora_file(Path(lora), weight_name)
        where, sd, meta = str(lora), read_state_dict(lora), _metadata(lora)
    for key in sd:
        for mark, what in _UNSUPPORTED.items():
            if re.search(mark, key):
                raise CheckpointError(
                    f"{where} is {what} (key {key!r}); minsdxl merges LoRA (up/down pairs, optional alpha) and "
                    "LyCORIS LoCon / LoHa / LoKr / full only. Convert it to a plain LoRA (e.g. with kohya's "
                    "resize/extract tools) first"
                )
    if any(k.endswith(".dora_scale") for k in sd):
        # = diffusers' StableDiffusionXLLoraLoaderMixin.lora_state_dict: drops them and loads the rest
        warnings.warn(
            f"{where} is a DoRA (it has dora_scale keys); as diffusers does for SDXL, the magnitudes are "
            "ignored and it is applied as a plain LoRA / LoHa / LoKr (A1111 applies them)",
            stacklevel=3,
        )
        sd = {k: v for k, v in sd.items() if not k.endswith(".dora_scale")}
    bad = [k for k, t in sd.items() if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.isfinite().all()]
    if bad:  # (merged, one NaN would make every image black)
        raise CheckpointError(f"{where} holds NaN / Inf in {len(bad)} tensors ({', '.join(bad[:3])}): a damaged LoRA")
    layers = _layers(model)
    kohya = None
    parts, unknown, skipped = {}, [], set()
    for key, t in sd.items():
        if key.startswith(tuple(_KOHYA)):
            kohya = kohya or _kohya_names(model, layers)
            flat, _, rest = key.partition(".")
            comp = next(c for p, c in _KOHYA.items() if flat.startswith(p))
            module = kohya.get(flat, (comp, None))[1]
            part = _KOHYA_PARTS.get(rest, rest if rest in Hadamard.parts | Kronecker.parts | Full.parts else None)
        else:
            comp, module, part = _split(key) or ("unet", None, None)
        if getattr(model, comp, None) is None:
            skipped.add(comp)  # e.g. a base LoRA's CLIP-L part on the refiner, which has no CLIP-L
        elif part is None or (comp, module) not in layers:
            unknown.append(key)
        else:
            parts.setdefault((comp, module), {})[part] = t
    if unknown:
        raise CheckpointError(
            f"{where}: {len(unknown)} key(s) name no layer of this SDXL {getattr(model, 'kind', '')} model, e.g. "
            f"{unknown[:3]}. A LoRA fits the model it was trained for (an SDXL base LoRA does not fit the refiner; "
            "SD 1.x and Flux LoRAs fit no SDXL), or this is not a LoRA at all"
        )
    if not parts:
        raise CheckpointError(
            f"{where} holds no LoRA weights for this model (no lora_down/up, lora_A/B, hada_, lokr_ or diff keys)"
        )
    pairs = {}
    for (comp, module), p in parts.items():
        bad = {k: type(t).__name__ for k, t in p.items() if not isinstance(t, torch.Tensor)}
        if bad or p.get("alpha", torch.ones(1)).numel() != 1:
            what = f"non-tensor values {bad}" if bad else f"an alpha of shape {tuple(p['alpha'].shape)}"
            raise CheckpointError(f"{where}: {comp}.{module} has {what}; the file is damaged or not a LoRA")
        try:
            a = _adapter(p)
        except ValueError as e:
            raise CheckpointError(f"{where}: {comp}.{module} {e}") from None
        layer = layers[(comp, module)][0]
        w = layer.weight
        try:  # the delta's shape, built on the meta device: no memory, no time
            shape = tuple(a.delta("meta").shape)
        except (RuntimeError, IndexError):  # factors that do not multiply
            shape = None
        if shape not in (tuple(w.shape), (w.shape[0], math.prod(w.shape[1:]))) or a.rank == 0:
            have = ", ".join(f"{k} {tuple(t.shape)}" for k, t in sorted(p.items()) if k != "alpha")
            raise CheckpointError(
                f"{where}: {comp}.{module} has {a.what} {have}, which do not fit its weight {tuple(w.shape)}: "
                "this LoRA was made for a different model"
            )
        if a.bias is not None and (layer.bias is None or a.bias.shape != layer.bias.shape):
            theirs = None if layer.bias is None else tuple(layer.bias.shape)
            raise CheckpointError(
                f"{where}: {comp}.{module} has a {'lora_B bias' if isinstance(a, Pair) else 'diff_b'} "
                f"{tuple(a.bias.shape)}, but the layer's bias is {theirs}: this LoRA was made for a different model"
            )
        if a.alpha is None:
            a.alpha = _meta_alpha(meta, comp, module, a.rank) if a.rank else 1.0
        pairs[(comp, module)] = a
    if skipped:
        warnings.warn(f"{where} also adapts {sorted(skipped)}, which this model does not have: skipped", stacklevel=3)
    return pairs


# ------------------------------------------------------------------------------------------------
# Merging


@torch.no_grad()
def _merge(model, keys, multiplier: float = 1.0, state: LoRAs | None = None) -> None:
    """Recompute the layers `keys` = {(component, module)} from their originals: W0 + sum over the
    active adapters of multiplier * weight * delta (and the same for a bias a LoRA adapts). A layer no
    adapter touches any more gets its original tensor back. `state`: the adapters' owner (default: the
    model's own; another model's for a module shared with it)."""
    state, layers = state or _state(model), _layers(model)
    for comp, module in keys:
        layer = layers[(comp, module)][0]
        using = [a for a in state.adapters.values() if (comp, module) in a.pairs]
        for kind in ("weight", "bias"):
            key, p = (comp, f"{module}.{kind}"), getattr(layer, kind)
            adapts = using if kind == "weight" else [a for a in using if a.pairs[(comp, module)].bias is not None]
            if not adapts:
                if key in state.originals:
                    _restore(p, state.originals.pop(key))
                continue
            if key not in state.originals:
                if p.device.type == "cpu":  # the original stays untouched (maybe memory-mapped: the file's pages)
                    state.originals[key] = p.data
                    p.data = torch.empty_like(p.data)
                else:  # a CPU copy (GPU memory is the scarce one); writes go in place: CUDA graphs keep addresses
                    state.originals[key] = p.data.cpu()
            w = state.originals[key].to(p.device, torch.float32, memory_format=torch.contiguous_format, copy=True)
            for a in (a for a in adapts if a.active and a.weight and state.enabled):
                pair, s = a.pairs[(comp, module)], multiplier * a.weight
                if kind == "weight":
                    pair.add_to(w, s)
                else:
                    w.add_(pair.bias.to(device=w.device, dtype=torch.float32), alpha=s * pair.scale)
            p.data.copy_(w)


def _restore(p: torch.nn.Parameter, original: torch.Tensor) -> None:
    if original.device == p.device and original.dtype == p.dtype:
        p.data = original  # the very tensor loaded
    else:
        p.data.copy_(original)  # on a GPU (or after model.to(...)): in place


def _owned(model, pairs) -> None:
    """A module shared with another model (load(share=...)) may carry only one model's adapters."""
    for comp in {c for c, _ in pairs}:
        owner = getattr(getattr(model, comp), "_lora_owner", None)
        if owner is not None and owner is not _state(model):
            raise ValueError(
                f"{comp} is shared with another loaded model that has LoRA adapters on it; load this LoRA "
                "into that model, or unload_lora_weights() there first"
            )


def _claim(model) -> None:
    state = _state(model)
    touched = {c for a in state.adapters.values() for c, _ in a.pairs}
    for comp in ENCODERS:
        mod = getattr(model, comp, None)
        if mod is not None and (comp in touched or getattr(mod, "_lora_owner", None) is state):
            mod._lora_owner = state if comp in touched else None


def load_lora_weights(
    model, lora, adapter_name: str | None = None, weight: float = 1.0, weight_name: str | None = None
) -> str:
    """Load a LoRA (a file, a folder with weight_name, or a state dict; kohya, diffusers-PEFT or older
    diffusers keys) into the UNet and text encoders and merge it with `weight`. As in diffusers, the
    adapter just loaded is then the only active one: combine several with set_adapters(model, [names],
    [weights]). Returns its name ("default_0", "default_1", ... unless given, as diffusers names them)."""
    require_model(model, "load_lora_weights")
    state = _state(model)
    if adapter_name is None:
        adapter_name = f"default_{len(state.adapters)}"
        while adapter_name in state.adapters:
            adapter_name += "_"
    if adapter_name in state.adapters:
        raise ValueError(
            f"an adapter named {adapter_name!r} is already loaded; pass another adapter_name= or "
            "delete_adapters(model, name) first"
        )
    _check_weight(weight)
    pairs = read_lora(model, lora, weight_name)  # every check before the first change
    _owned(model, pairs)
    source = "" if isinstance(lora, dict) else str(lora)
    for a in state.adapters.values():
        a.active = False  # = diffusers (PEFT's inject_adapter sets the new adapter as the active one)
    state.adapters[adapter_name] = Adapter(adapter_name, pairs, float(weight), True, source)
    _merge(model, {k for a in state.adapters.values() for k in a.pairs})
    _claim(model)
    return adapter_name


def _check_weight(w):
    if isinstance(w, dict):
        raise TypeError("per-component / per-block adapter weights are not supported: pass one number per adapter")
    _finite_number(w, "an adapter weight")


def _finite_number(v, what: str) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise TypeError(f"{what} must be a number, got {v!r}")
    if not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number, got {v!r}")


def _names(model, names) -> list[str]:
    state = _state(model)
    names = [names] if isinstance(names, str) else list(names)
    missing = [n for n in names if n not in state.adapters]
    if missing:
        raise ValueError(f"no adapter named {missing[0]!r}; loaded: {list(state.adapters) or 'none'}")
    return names


def set_adapters(model, adapter_names, adapter_weights=None) -> None:
    """= diffusers' set_adapters: only these adapters are active, with these weights (default 1.0 each)."""
    names = _names(model, adapter_names)
    weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} adapter names but {len(weights)} weights: pass one weight per adapter")
    weights = [1.0 if w is None else w for w in weights]
    for w in weights:
        _check_weight(w)
    state = _state(model)
    for a in state.adapters.values():
        a.active = a.name in names
    for n, w in zip(names, weights):
        state.adapters[n].weight = float(w)
    _merge(model, {k for a in state.adapters.values() for k in a.pairs})


def get_active_adapters(model) -> list[str]:
    """= diffusers' get_active_adapters: the names of the adapters that apply now."""
    return [a.name for a in _state(model).adapters.values() if a.active]


def disable_lora(model) -> None:
    """= diffusers' disable_lora: the model runs as loaded, the adapters stay (enable_lora brings them back)."""
    _enable(model, False)


def enable_lora(model) -> None:
    """= diffusers' enable_lora: undo disable_lora, the active adapters apply again."""
    _enable(model, True)


def _enable(model, on: bool) -> None:
    state = _state(model)
    state.enabled = on
    _merge(model, {k for a in state.adapters.values() for k in a.pairs})


def delete_adapters(model, adapter_names) -> None:
    """Remove these adapters; weights they alone touched get their original tensors back. As in diffusers
    (PEFT's delete_adapter): when no active adapter is left but others are loaded, the first of those by
    name becomes active, with a warning; with none left, a disable_lora() is forgotten."""
    state = _state(model)
    keys = set()
    for n in _names(model, adapter_names):
        keys |= set(state.adapters.pop(n).pairs)
    if state.adapters and not any(a.active for a in state.adapters.values()):
        first = sorted(state.adapters)[0]
        warnings.warn(f"the active LoRA adapter was deleted; {first!r} is active now (as in diffusers)", stacklevel=2)
        state.adapters[first].active = True
        keys |= set(state.adapters[first].pairs)
    if not state.adapters:
        state.enabled = True  # diffusers' disabled flag lives on the adapter layers, which are gone
    _merge(model, keys)
    _claim(model)


def unload_lora_weights(model) -> None:
    """Remove every adapter: the model is exactly as loaded again."""
    delete_adapters(model, list(_state(model).adapters))


@contextmanager
def scaled(model, scale, components=ENCODERS):
    """Within the block every active adapter counts `scale` times in `components` (= diffusers' lora_scale:
    a pipeline call's cross_attention_kwargs={"scale": s} for the UNet and text encoders, encode_prompt's
    lora_scale for the text encoders). Costs two merges of the adapted layers; set_adapters() weights
    are the way to change it for many calls. One deliberate difference: after a call with scale 0, diffusers'
    unscale_lora_layers sets every active adapter's weight to 1, forgetting set_adapters; here they stay."""
    if scale is not None:
        _finite_number(scale, "a LoRA scale")
    if scale is None or scale == 1.0:
        yield
        return
    # the adapters on these components, whoever loaded them: a refiner loaded with share=base runs the
    # base's LoRA in the text_encoder_2 they share (diffusers scales that module too)
    owners = {}
    for comp in components:
        state = getattr(getattr(model, comp, None), "_lora_owner", None)
        if state is not None:
            keys = owners.setdefault(id(state), (state, set()))[1]
            keys |= {k for a in state.adapters.values() for k in a.pairs if k[0] == comp}
    for state, keys in owners.values():
        _merge(model, keys, multiplier=float(scale), state=state)
    try:
        yield
    finally:
        for state, keys in owners.values():
            _merge(model, keys, state=state)
