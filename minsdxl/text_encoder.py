"""SDXL's two text encoders: CLIP-L (OpenAI ViT-L/14's text tower) and OpenCLIP ViT-bigG/14's text
tower. Both are the same pre-LayerNorm causal transformer, configured by a TextConfig
(TEXT_PRESETS["clip_l"]: 12 layers, width 768, quick_gelu; TEXT_PRESETS["bigg"]: 32 layers, width 1280,
20 heads, exact gelu, a 1280x1280 text projection).

SDXL conditions on the penultimate layer's hidden states (no final LayerNorm) of both encoders, and on
bigG's pooled output: final LayerNorm at the EOS position, times `text_projection`. CLIP-L's pooled
output is never used, so CLIP-L stops after the layer SDXL reads.

Module names are the installed transformers' (5.x), so `state_dict()` keys equal theirs:
`CLIPTextModel` has no prefix (`embeddings.token_embedding.weight`, `encoder.layers.N.self_attn.q_proj
.weight`, `final_layer_norm.weight`), `CLIPTextModelWithProjection` nests it under `text_model.` and adds
`text_projection.weight`. `normalize_text_keys` maps older spellings onto these.
Reference: transformers models/clip/modeling_clip.py; sgm FrozenOpenCLIPEmbedder2 for bigG.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .config import TextConfig, VisionConfig
from .layerwise import compute_dtype


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)  # = transformers QuickGELUActivation (OpenAI CLIP)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n, positions = input_ids.shape[1], self.position_embedding.weight.shape[0]
        if n > positions:
            raise ValueError(f"{n} token ids but CLIP has {positions} positions: tokenize with max_length={positions}")
        # a plain slice of the position table, no `position_ids` buffer: nothing to go stale or meta
        x = self.token_embedding(input_ids)
        return x + self.position_embedding.weight[:n].to(x.dtype)  # (.to: a float8-stored table, minsdxl.layerwise)


# The transformer layers below also make the vision tower (image_encoder.py): any config with
# hidden_size, num_attention_heads, intermediate_size, hidden_act and layer_norm_eps.


class CLIPAttention(nn.Module):
    def __init__(self, config: TextConfig | VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.attention_backend: str | None = None  # None: minsdxl.attention's process default

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        o = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, mask, self.attention_backend)
        return self.out_proj(o)


class CLIPMLP(nn.Module):
    def __init__(self, config: TextConfig | VisionConfig):
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unknown hidden_act {config.hidden_act!r}; choose one of {', '.join(ACTIVATIONS)}")
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: TextConfig | VisionConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: TextConfig | VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


def causal_mask(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive [n, n] mask: position i attends to positions <= i (= open_clip build_causal_mask)."""
    return torch.full((n, n), float("-inf"), dtype=dtype, device=device).triu_(1)


class CLIPTextModel(nn.Module):
    """The CLIP text transformer (CLIP-L in SDXL). Keys = transformers 5 CLIPTextModel's."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.embeddings.token_embedding

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.embeddings.token_embedding)

    @property
    def device(self) -> torch.device:
        return self.embeddings.token_embedding.weight.device

    def forward(self, input_ids: torch.Tensor, clip_skip: int | None = None, pool: bool = False):
        """input_ids [B, L] -> (hidden [B, L, width], pooled [B, width] or None).

        hidden = transformers' `hidden_states[-(clip_skip + 2)]` (penultimate layer when clip_skip is
        None or 0), as diffusers' SDXL encode_prompt reads it. With pool=True, pooled = final_layer_norm
        of the last layer at the EOS position; otherwise the layers after `hidden` are skipped."""
        n = len(self.encoder.layers)
        skip = clip_skip or 0
        if not 0 <= skip < n:
            raise ValueError(f"clip_skip={clip_skip} is out of range for a {n}-layer text encoder: use 0..{n - 1}")
        # hidden_states[k] is the output after k layers (hidden_states[0] = embeddings), and there are
        # n + 1 of them, so hidden_states[-(skip + 2)] is the output after `n - 1 - skip` layers
        stop = n - 1 - skip
        x = self.embeddings(input_ids)
        mask = causal_mask(input_ids.shape[1], x.dtype, x.device)
        hidden = x
        for i, layer in enumerate(self.encoder.layers[: n if pool else stop]):
            x = layer(x, mask)
            if i + 1 == stop:
                hidden = x
        if not pool:
            return hidden, None
        x = self.final_layer_norm(x)
        # EOS position = first argmax of the ids (49407 is the largest id in CLIP's vocabulary). This is
        # transformers' path for SDXL's shipped configs (eos_token_id=2) and open_clip's pool_type="argmax"
        # as sgm uses it; a textual-inversion token (id >= 49408) therefore moves it, in all three.
        eos = input_ids.argmax(dim=-1)
        return hidden, x[torch.arange(x.shape[0], device=x.device), eos]


class CLIPTextModelWithProjection(nn.Module):
    """bigG in SDXL: the transformer under `text_model.` plus a bias-free `text_projection`
    (keys = transformers 5 CLIPTextModelWithProjection's)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        assert config.projection_dim, "CLIPTextModelWithProjection needs config.projection_dim"
        self.config = config
        self.text_model = CLIPTextModel(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.text_model.token_embedding

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.dtype

    @property
    def device(self) -> torch.device:
        return self.text_model.device

    def forward(self, input_ids: torch.Tensor, clip_skip: int | None = None):
        """input_ids [B, L] -> (hidden_states[-(clip_skip + 2)] [B, L, width], text_embeds [B, projection_dim])."""
        hidden, pooled = self.text_model(input_ids, clip_skip=clip_skip, pool=True)
        return hidden, self.text_projection(pooled)


def build_text_encoder(config: TextConfig) -> nn.Module:
    """CLIP-L (no projection) -> CLIPTextModel; bigG (projection_dim set) -> CLIPTextModelWithProjection.
    Both are called as `encoder(input_ids, clip_skip=None) -> (hidden, pooled or None)`."""
    return CLIPTextModelWithProjection(config) if config.projection_dim else CLIPTextModel(config)


def normalize_text_keys(sd: dict, with_projection: bool) -> dict:
    """Map a CLIPTextModel(WithProjection) state dict in any transformers spelling onto our keys.

    transformers < 5 saved CLIPTextModel with a `text_model.` prefix, 5.x without; WithProjection has
    it in both. `position_ids` buffers (int64 or float in old files) are dropped: we don't keep one.
    CLIP-L files that carry a `text_projection` lose it: SDXL never uses CLIP-L's pooled output."""
    out = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        if k == "text_projection.weight":
            if with_projection:
                out[k] = v
            continue
        k = k.removeprefix("text_model.")
        out[f"text_model.{k}" if with_projection else k] = v
    return out


__all__ = [
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "build_text_encoder",
    "normalize_text_keys",
    "causal_mask",
]
